"""Golden-value tests of the DreamerV3 distribution helpers (world_models/distributions.py)."""

import math

import pytest
import torch

from world_models.distributions import (
    TwoHot,
    bernoulli_nll,
    categorical_entropy,
    categorical_kl,
    index_onehot,
    one_hot,
    onehot_mode,
    sample_index,
    sample_onehot,
    symexp,
    symlog,
    unimix,
    unimix_probs,
)


def test_one_hot_equals_torch_one_hot_in_the_given_dtype():
    index = torch.tensor([[0, 3], [2, 1]])
    out = one_hot(index, 4, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2, 4)
    assert torch.equal(out.float(), torch.nn.functional.one_hot(index, 4).float())


def test_symlog_symexp_values_and_inverse():
    x = torch.tensor([0.0, 1.0, -1.0, math.e - 1.0, -(math.e**2 - 1.0)])
    expected = torch.tensor([0.0, math.log(2.0), -math.log(2.0), 1.0, -2.0])
    torch.testing.assert_close(symlog(x), expected)
    torch.testing.assert_close(
        symexp(torch.tensor([1.0, -2.0])), torch.tensor([1.718282, -6.389056])
    )
    y = torch.tensor([-1e6, -3.5, -1e-3, 0.0, 2e-4, 7.0, 1e6], dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(y)), y)


def test_twohot_bins_are_symmetric_and_exact():
    th = TwoHot()
    assert th.bins.shape == (255,)
    assert th.bins[0] == -20.0 and th.bins[127] == 0.0 and th.bins[254] == 20.0
    assert torch.equal(th.bins, -th.bins.flip(0))
    torch.testing.assert_close(th.bins[128] - th.bins[127], torch.tensor(40.0 / 254))


def test_twohot_encode_golden_weights():
    th = TwoHot(bins=5, low=-2.0, high=2.0)  # centres [-2, -1, 0, 1, 2] in symlog space
    x = torch.tensor(
        [
            math.exp(0.25) - 1.0,  # symlog 0.25: between bins 2 (0) and 3 (1)
            -(math.exp(1.5) - 1.0),  # symlog -1.5: halfway between bins 0 and 1
            math.e - 1.0,  # symlog 1: exactly on bin 3
            100.0,  # symlog 4.6 > 2: edge bin 4
            -100.0,  # edge bin 0
        ]
    )
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.75, 0.25, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(th.encode(x), expected)
    assert th.encode(torch.zeros(2, 3)).shape == (2, 3, 5)


def test_twohot_decode_roundtrip_and_zero_logits():
    th = TwoHot()
    x = torch.tensor([0.0, 0.3, -1.0, 12.5, -250.0, 3e4], dtype=torch.float64)
    logits = torch.log(th.encode(x))  # -inf off the two neighbouring bins
    torch.testing.assert_close(th.decode(logits), x, rtol=1e-4, atol=1e-6)
    # a zero-initialised head (uniform softmax) decodes to exactly 0, not ~1e-7
    assert torch.equal(th.decode(torch.zeros(4, 255)), torch.zeros(4))
    # out of range clamps to the edge: symexp(20)
    big = th.decode(torch.log(th.encode(torch.tensor([1e12]))))
    torch.testing.assert_close(big, torch.tensor([math.exp(20.0) - 1.0]))


def test_twohot_loss_golden():
    th = TwoHot(bins=5, low=-2.0, high=2.0)
    target = torch.tensor([math.exp(0.25) - 1.0])
    # uniform logits: cross-entropy log 5 whatever the target
    torch.testing.assert_close(th.loss(torch.zeros(1, 5), target), torch.tensor([math.log(5.0)]))
    # logits equal to the target's log-weights: the loss is the entropy of (0.75, 0.25)
    logits = torch.log(th.encode(target).clamp(min=1e-30))
    torch.testing.assert_close(th.loss(logits, target), torch.tensor([0.562335]), atol=1e-5, rtol=0)


def test_unimix_probabilities():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, -float("inf")]])
    probs = unimix(logits, 0.01).exp()
    expected = torch.tensor([[0.2525, 0.7475], [0.995, 0.005]])
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(unimix(logits[:1], 0.0).exp(), torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(unimix_probs(logits, 0.01), expected)
    torch.testing.assert_close(unimix_probs(logits[:1], 0.0), torch.tensor([[0.25, 0.75]]))


def test_given_probabilities_sample_and_route_gradients_as_the_softmax_would():
    """sample_index/index_onehot with ``probs`` = softmax(logits): the same draws, and the
    straight-through gradient reaching the raw logits is the same (the RSSM passes its
    unimixed probabilities instead of re-taking softmax of their logs)."""
    raw = torch.randn(500, 6, requires_grad=True)
    probs = unimix_probs(raw, 0.01)  # [500, 6]
    logits = probs.log()
    picks = [sample_index(logits, torch.Generator().manual_seed(4), p) for p in (None, probs)]
    assert (picks[0] != picks[1]).float().mean() < 0.01  # a tie at a CDF edge may differ
    weights = torch.randn(6)
    grads = []
    for p in (None, probs):
        onehot = index_onehot(picks[0], logits, straight_through=True, probs=p)
        (grad,) = torch.autograd.grad((onehot * weights).sum(), raw, retain_graph=True)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_twohot_loss_equals_cross_entropy_with_encode_including_edges():
    th = TwoHot()  # 255 bins over [-20, 20]
    target = torch.tensor([0.0, 1.0, -3.7, 250.0, symexp(torch.tensor(25.0)).item(), -1e12])
    target = torch.cat([target, symexp(th.bins[[3, 128, 200]])])  # exactly on bin centres
    logits = torch.randn(len(target), 255, requires_grad=True)
    dense = -(th.encode(target) * torch.log_softmax(logits, -1)).sum(-1)
    (g_dense,) = torch.autograd.grad(dense.sum(), logits)
    loss = th.loss(logits, target)
    (g_loss,) = torch.autograd.grad(loss.sum(), logits)
    torch.testing.assert_close(loss, dense)
    torch.testing.assert_close(g_loss, g_dense)


@pytest.mark.parametrize("method", ["icdf", "gumbel"])
def test_sample_frequencies_and_zero_probability_classes(method):
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    samples = sample_onehot(logits, straight_through=False, generator=gen, method=method)
    assert torch.equal(samples.sum(-1), torch.ones(20000))
    assert set(samples.unique().tolist()) == {0.0, 1.0}
    freq = samples.mean(0)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)  # ~3 std at n=20000
    again = sample_onehot(
        logits, straight_through=False, generator=torch.Generator().manual_seed(0), method=method
    )
    assert torch.equal(samples, again)
    # a class of probability 0 is never drawn, wherever it sits
    logits = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0]).log().expand(20000, 5)
    picks = sample_onehot(logits, straight_through=False, generator=gen, method=method).sum(0)
    assert picks[[0, 1, 4]].sum() == 0 and picks[2] > 9000 and picks[3] > 9000


def test_both_samplers_match_the_probabilities_of_many_categoricals():
    """RSSM-like latents (32 rows x 16 categoricals x 16 unimixed classes, every row its own
    distribution): per categorical, the chi-square of 4,000 draws against its probabilities
    averages K - 1 = 15 for both methods, and the methods draw different samples."""
    gen = torch.Generator().manual_seed(3)
    probs = 0.99 * torch.softmax(3 * torch.randn(32, 16, 16, generator=gen), -1) + 0.01 / 16
    logits, n = probs.log(), 4000
    draws = {}
    for method in ("icdf", "gumbel"):
        gen = torch.Generator().manual_seed(5)
        counts = torch.zeros(32, 16, 16, dtype=torch.float64)
        for _ in range(n):
            index = sample_index(logits, gen, probs if method == "icdf" else None, method)
            counts.scatter_add_(-1, index, torch.ones(32, 16, 1, dtype=torch.float64))
        chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum(-1)  # [32, 16]
        assert 14.0 < chi2.mean().item() < 16.0, method  # 512 categoricals: mean 15 +- 0.25
        draws[method] = counts
    assert not torch.equal(draws["icdf"], draws["gumbel"])
    with pytest.raises(ValueError, match="icdf"):
        sample_index(logits, method="multinomial")


def test_straight_through_gradient_is_that_of_the_probabilities():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1]], requires_grad=True)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    sample = sample_onehot(logits)
    assert torch.equal(sample.detach().sum(-1), torch.ones(1))
    (sample * weights).sum().backward()
    grad_st = logits.grad.clone()
    logits.grad = None
    (torch.softmax(logits, -1) * weights).sum().backward()
    torch.testing.assert_close(grad_st, logits.grad)
    mode = onehot_mode(logits.detach())
    assert torch.equal(mode, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_categorical_kl_entropy_bernoulli_golden():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    torch.testing.assert_close(categorical_kl(p, q), torch.tensor(0.143841), atol=1e-6, rtol=0)
    assert categorical_kl(q, q).abs() < 1e-7
    torch.testing.assert_close(
        categorical_entropy(torch.zeros(3, 4)), torch.full((3,), math.log(4))
    )
    nll = bernoulli_nll(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(nll, torch.tensor([math.log(2.0), 2.126928]))


@pytest.mark.parametrize("shape", [(3,), (2, 5, 7)])
def test_shapes(shape):
    th = TwoHot(bins=11, low=-5, high=5)
    x = torch.randn(shape)
    assert th.encode(x).shape == (*shape, 11)
    assert th.decode(torch.randn(*shape, 11)).shape == shape
    assert th.loss(torch.randn(*shape, 11), x).shape == shape
