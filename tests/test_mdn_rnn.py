"""M: mixture NLL, temperature sampling, and the VaeMdnRnn WorldModel's row convention."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents.config import ConfigError
from world_models.base import flatten_state
from world_models.mdn_rnn import mdn_moments, mdn_nll, mdn_sample, mdn_split
from world_models.vae_mdnrnn import VaeMdnRnn

CFG = OmegaConf.load("configs/world_model/vae_mdnrnn.yaml")


def _mixture():
    """One latent dim, K=2: pi = [0.3, 0.7], means [0, 2], stds [1, 0.5]."""
    logpi = torch.log(torch.tensor([[0.3, 0.7]]))  # [Z=1, K=2]
    mean = torch.tensor([[0.0, 2.0]])
    logstd = torch.log(torch.tensor([[1.0, 0.5]]))
    return logpi, mean, logstd


def test_mdn_nll_hand_computed():
    logpi, mean, logstd = _mixture()
    nll = mdn_nll(logpi, mean, logstd, torch.tensor([1.0]))
    # -ln(0.3 N(1; 0, 1) + 0.7 N(1; 2, 0.5^2))
    p = 0.3 * math.exp(-0.5) / math.sqrt(2 * math.pi) + 0.7 * math.exp(-2.0) / (
        0.5 * math.sqrt(2 * math.pi)
    )
    assert nll.shape == (1,)
    assert nll.item() == pytest.approx(-math.log(p), abs=1e-5)
    assert nll.item() == pytest.approx(1.9093372, abs=1e-5)


def test_mdn_split_normalises_weights():
    out = torch.randn(4, 3 * 3 * 5)  # [N, Z*3K] with Z=3, K=5
    logpi, mean, logstd = mdn_split(out, 3, 5)
    assert logpi.shape == mean.shape == logstd.shape == (4, 3, 5)
    torch.testing.assert_close(logpi.exp().sum(-1), torch.ones(4, 3))
    torch.testing.assert_close(mean, out.reshape(4, 3, 3, 5)[:, :, 1])


def test_temperature_zero_is_the_mode_of_the_likeliest_component():
    logpi, mean, logstd = _mixture()
    a = mdn_sample(logpi, mean, logstd, 0.0)
    b = mdn_sample(logpi, mean, logstd, 0.0)
    assert a.item() == b.item() == 2.0  # mean of the 0.7 component, no noise


def test_temperature_one_matches_mixture_moments():
    logpi, mean, logstd = _mixture()
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    big = [x.expand(n, 1, 2) for x in (logpi, mean, logstd)]
    z = mdn_sample(*big, 1.0, generator=gen)  # [n, 1]
    m, v = mdn_moments(logpi, mean, logstd)
    # mean 0.7*2 = 1.4; var = 0.3*1 + 0.7*(0.25 + 4) - 1.4^2 = 1.315
    assert m.item() == pytest.approx(1.4, abs=1e-6)
    assert v.item() == pytest.approx(1.315, abs=1e-6)
    assert z.mean().item() == pytest.approx(1.4, abs=0.01)
    assert z.var().item() == pytest.approx(1.315, abs=0.015)


def test_temperature_sharpens_weights_and_scales_std():
    logpi, mean, logstd = _mixture()
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    tau = 0.5
    # components far apart so each sample reveals its component
    far_mean = torch.tensor([[-100.0, 100.0]]).expand(n, 1, 2)
    z = mdn_sample(logpi.expand(n, 1, 2), far_mean, logstd.expand(n, 1, 2), tau, generator=gen)
    frac = (z > 0).float().mean().item()
    expected = 0.7**2 / (0.3**2 + 0.7**2)  # softmax(log pi / 0.5)
    assert frac == pytest.approx(expected, abs=0.005)
    high = z[z > 0] - 100.0  # std 0.5 * sqrt(0.5)
    assert high.std().item() == pytest.approx(0.5 * math.sqrt(tau), rel=0.02)


def _model(obs_space, action_dim=2, **overrides):
    cfg = OmegaConf.merge(
        CFG, {"latent": 3, "hidden": 8, "head_units": 8, "vector_units": 8}, overrides
    )
    return VaeMdnRnn(cfg, obs_space, action_dim)


VEC = gym.spaces.Dict({"vector": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)})


def test_sequence_loss_masks_episode_boundaries_and_resets_lstm():
    torch.manual_seed(0)
    model = _model(VEC)
    b, t = 2, 5
    z = torch.randn(b, t, 3)
    action = torch.randn(b, t, 2)
    is_first = torch.zeros(b, t, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 3] = True  # a new episode starts at row 3 of sequence 0
    zeros = torch.zeros(b, t)
    loss, metrics, post = model.sequence_loss(z, action, zeros, is_first, zeros.bool())
    assert post["z"].shape == (b, t, 3) and post["h"].shape == post["c"].shape == (b, t, 8)
    assert post["h"][0, 3].abs().sum() == 0 and post["h"][0, 0].abs().sum() == 0
    assert post["h"][1, 3].abs().sum() > 0
    # hand-rolled: valid transitions are all (t -> t+1) except 0:2 -> 0:3
    nlls = []
    for i in range(b):
        h = c = torch.zeros(1, 8)
        for s in range(t - 1):
            if is_first[i, s]:
                h = c = torch.zeros(1, 8)
            h, c = model.rnn.step(z[i, s : s + 1], action[i, s : s + 1], (h, c))
            if not is_first[i, s + 1]:
                nlls.append(mdn_nll(*model.rnn.mixture(h), z[i, s + 1 : s + 2]).mean())
    assert len(nlls) == 7
    torch.testing.assert_close(metrics["mdn_nll"], torch.stack(nlls).mean())


def test_mdn_gradient_does_not_reach_the_vae():
    model = _model(VEC)
    batch = {
        "vector": torch.randn(2, 4, 4),
        "action": torch.randn(2, 4, 2),
        "reward": torch.randn(2, 4),
        "is_first": torch.tensor([[True, False, False, False]] * 2),
        "is_terminal": torch.zeros(2, 4, dtype=torch.bool),
    }
    _, _, z = model.vae_loss(batch)
    seq, _, _ = model.sequence_loss(
        z, batch["action"], batch["reward"], batch["is_first"], batch["is_terminal"]
    )
    seq.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert model.rnn.head.weight.grad is not None


def test_loss_and_imagine_step_shapes_for_every_posterior_start():
    image = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    model = _model(image, action_dim=3)
    b, t = 2, 3
    batch = {
        "image": torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8),
        "action": torch.rand(b, t, 3) * 2 - 1,
        "reward": torch.randn(b, t),
        "is_first": torch.tensor([[True, False, False]] * b),
        "is_terminal": torch.zeros(b, t, dtype=torch.bool),
    }
    loss, metrics, post = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert {"vae_loss", "mdn_nll", "reward_loss", "done_loss", "model_loss"} <= metrics.keys()
    start = flatten_state({k: v.detach() for k, v in post.items()})  # N = B*T = 6
    nxt, reward, cont = model.imagine_step(start, torch.zeros(b * t, 3))
    assert nxt["z"].shape == (6, 3) and nxt["h"].shape == nxt["c"].shape == (6, 8)
    assert reward.shape == cont.shape == (6,)
    assert bool(((cont >= 0) & (cont <= 1)).all())
    assert model.features(nxt).shape == (6, model.feature_dim) and model.feature_dim == 11


def test_observe_step_matches_sequence_rollout():
    """Filtering row by row gives the same h/c as the batched sequence loss."""
    model = _model(VEC, sample_z=False)
    obs = torch.randn(1, 4, 4)
    action = torch.randn(1, 4, 2)
    is_first = torch.tensor([[True, False, True, False]])
    z = model.encode({"vector": obs})
    _, _, post = model.sequence_loss(z, action, torch.zeros(1, 4), is_first, is_first)
    state = model.initial(1)
    prev = torch.zeros(1, 2)
    for s in range(4):
        state = model.observe_step(state, prev, {"vector": obs[:, s]}, is_first[:, s])
        prev = action[:, s]
        for key in ("z", "h", "c"):
            torch.testing.assert_close(state[key], post[key][:, s])


def test_imagine_step_at_zero_temperature_is_deterministic():
    model = _model(VEC, temperature=0.0)
    start = model.initial(4)
    start["z"] = torch.randn(4, 3)
    a = model.imagine_step(start, torch.ones(4, 2))
    b = model.imagine_step(start, torch.ones(4, 2))
    for x, y in zip((a[0]["z"], a[1], a[2]), (b[0]["z"], b[1], b[2])):
        torch.testing.assert_close(x, y)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="world_model.mixtures"):
        _model(VEC, mixtures=0)
    small = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)})
    with pytest.raises(ConfigError, match="env.size=64"):
        _model(small)
