"""Tests of the DreamerV3 RSSM world model, its building blocks and its configs."""

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from agents.config import ConfigError
from world_models import make_world_model
from world_models.base import flatten_state
from world_models.distributions import sample_index
from world_models.networks import (
    MLP,
    ConvDecoder,
    ConvEncoder,
    MultiDecoder,
    MultiEncoder,
    OneHotFeatures,
    linear_onehot,
    map_features,
    stack_features,
)
from world_models.rssm import RSSM, kl_losses

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"deter": 32, "stoch": 4, "classes": 4, "units": 32, "layers": 1, "cnn_depth": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is faster and fair to a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(**overrides):
    cfg = OmegaConf.load(CONFIGS / "world_model" / "rssm.yaml")
    cfg.merge_with({**TINY, **overrides})
    return cfg


def vector_space(dim=3):
    return gym.spaces.Dict({"vector": gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)})


def image_space(size=16):
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
            "vector": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
        }
    )


def make_batch(space, b=2, t=6, a=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "action": F.one_hot(torch.randint(0, a, (b, t), generator=g), a).float(),
        "reward": torch.randint(0, 3, (b, t), generator=g).float(),
        "is_first": torch.zeros(b, t, dtype=torch.bool),
        "is_terminal": torch.zeros(b, t, dtype=torch.bool),
    }
    batch["is_first"][:, 0] = True
    batch["reward"][:, 0] = 0.0
    for key, sp in space.spaces.items():
        if key == "image":
            batch[key] = torch.randint(0, 256, (b, t, *sp.shape), generator=g, dtype=torch.uint8)
        else:
            batch[key] = torch.randn(b, t, *sp.shape, generator=g)
    return batch


# ------------------------------------------------------------------ KL balancing, free bits
def _logits_with_kl(num):
    """num categoricals, each with KL(post || prior) = KL([.5,.5] || [.25,.75]) = 0.143841."""
    post = torch.tensor([0.5, 0.5]).log().expand(num, 2).clone().requires_grad_()
    prior = torch.tensor([0.25, 0.75]).log().expand(num, 2).clone().requires_grad_()
    return post, prior


def test_free_bits_clamp_after_summing_over_categoricals():
    per = 0.143841
    # 8 categoricals: each KL < 1 nat but the sum 1.15 > 1 -> not clamped, gradients flow
    post, prior = _logits_with_kl(8)
    dyn, rep, raw = kl_losses(post, prior, free_nats=1.0)
    torch.testing.assert_close(dyn, torch.tensor(8 * per), atol=1e-5, rtol=0)
    torch.testing.assert_close(rep, torch.tensor(8 * per), atol=1e-5, rtol=0)
    dyn.backward()
    assert prior.grad.abs().sum() > 0
    # 4 categoricals: sum 0.575 < 1 -> clamped to exactly 1 nat with zero gradient
    # (clamping each categorical separately would give 4 nats)
    post, prior = _logits_with_kl(4)
    dyn, rep, raw = kl_losses(post, prior, free_nats=1.0)
    assert dyn.item() == 1.0 and rep.item() == 1.0
    torch.testing.assert_close(raw, torch.tensor(4 * per), atol=1e-5, rtol=0)
    (dyn + rep).backward()
    assert prior.grad.abs().sum() == 0 and post.grad.abs().sum() == 0


def test_kl_gradient_routing_on_logits():
    post, prior = _logits_with_kl(8)
    dyn, rep, _ = kl_losses(post, prior, free_nats=0.0)
    dyn.backward(retain_graph=True)
    assert post.grad is None and prior.grad.abs().sum() > 0  # dyn moves only the prior
    prior.grad = None
    rep.backward()
    assert prior.grad is None and post.grad.abs().sum() > 0  # rep moves only the posterior


def _grad_norms(wm, term):
    wm.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)

    def norm(module):
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    return {
        "prior": norm(wm.prior_net),
        "post": norm(wm.post_net),
        "encoder": norm(wm.encoder),
    }


def test_kl_gradient_routing_in_the_model():
    # T = 1 from the initial state: h_1 does not depend on the encoder, so the routing is exact
    wm = RSSM(make_cfg(free_nats=0.0), vector_space(), 2)
    batch = make_batch(vector_space(), b=3, t=1)
    post = wm.observe(batch)
    dyn, rep, _ = kl_losses(post["logits"], wm.prior_logits(post["deter"]), 0.0)
    g = _grad_norms(wm, dyn.mean())
    assert g["prior"] > 0 and g["post"] == 0 and g["encoder"] == 0
    g = _grad_norms(wm, rep.mean())
    assert g["prior"] == 0 and g["post"] > 0 and g["encoder"] > 0


# ------------------------------------------------------------------ model behaviour
def test_zero_init_reward_head_predicts_exactly_zero():
    wm = RSSM(make_cfg(), vector_space(), 2)
    assert torch.count_nonzero(wm.reward_head.out.weight) == 0
    state = wm.initial(5)
    _, reward, cont = wm.imagine_step(state, torch.zeros(5, 2))
    assert torch.equal(reward, torch.zeros(5))
    assert ((cont > 0) & (cont < 1)).all()


def test_loss_outputs_shapes_and_detached_metrics():
    space = image_space()
    wm = RSSM(make_cfg(), space, 3)
    batch = make_batch(space, b=2, t=5, a=3)
    loss, metrics, post = wm.loss(batch)
    assert loss.shape == () and loss.requires_grad
    assert post["deter"].shape == (2, 5, 32)
    assert post["stoch"].shape == (2, 5, 4, 4) and post["logits"].shape == (2, 5, 4, 4)
    assert wm.features(post).shape == (2, 5, wm.feature_dim) and wm.feature_dim == 32 + 16
    for key in ("image_loss", "vector_loss", "reward_loss", "cont_loss", "dyn_loss", "kl"):
        assert isinstance(metrics[key], torch.Tensor) and not metrics[key].requires_grad
    # uniform zero reward head: two-hot cross-entropy is log(255) whatever the target
    torch.testing.assert_close(metrics["reward_loss"], torch.tensor(math.log(255.0)))
    # free bits: both KL terms are at least 1 nat
    assert metrics["dyn_loss"] >= 1.0 and metrics["rep_loss"] >= 1.0
    loss.backward()


def test_observe_step_matches_loss_posterior_and_resets():
    space = vector_space()
    wm = RSSM(make_cfg(), space, 2)
    batch = make_batch(space, b=3, t=7)
    batch["is_first"][1, 3] = True  # an episode starts mid-sequence in row 1
    torch.manual_seed(1)
    _, _, post = wm.loss(batch)
    torch.manual_seed(1)
    state = wm.initial(3)
    steps = []
    for t in range(7):
        prev = batch["action"][:, t - 1] if t > 0 else torch.zeros(3, 2)
        state = wm.observe_step(
            state, prev, {"vector": batch["vector"][:, t]}, batch["is_first"][:, t]
        )
        steps.append(state)
    for key in ("deter", "stoch", "logits"):
        torch.testing.assert_close(torch.stack([s[key] for s in steps], 1), post[key])

    # the reset row forgets everything before its is_first
    changed = {k: v.clone() for k, v in batch.items()}
    changed["vector"][1, :3] += 5.0
    changed["action"][1, :3] = 1.0 - changed["action"][1, :3]
    torch.manual_seed(1)
    post2 = wm.observe(changed)
    torch.testing.assert_close(post2["deter"][1, 3:], post["deter"][1, 3:])
    assert not torch.allclose(post2["deter"][1, :3], post["deter"][1, :3])
    torch.testing.assert_close(post2["deter"][0], post["deter"][0])  # other rows untouched


def test_imagine_step_from_every_posterior_state():
    space = vector_space()
    wm = RSSM(make_cfg(), space, 2)
    b, t = 3, 4
    with torch.no_grad():
        _, _, post = wm.loss(make_batch(space, b=b, t=t))
    state = flatten_state(post)
    n = b * t
    assert state["deter"].shape == (n, 32)
    action = F.one_hot(torch.randint(0, 2, (n,)), 2).float()
    nxt, reward, cont = wm.imagine_step(state, action)
    assert nxt["deter"].shape == (n, 32) and nxt["stoch"].shape == (n, 4, 4)
    assert nxt["logits"].shape == (n, 4, 4)
    assert reward.shape == (n,) and cont.shape == (n,)
    assert wm.features(nxt).shape == (n, wm.feature_dim)
    torch.testing.assert_close(nxt["stoch"].sum(-1), torch.ones(n, 4))


def test_world_model_sampler_picks_the_method_of_its_latent_draws():
    """world_model.sampler: the prior sample of imagine_step is sample_index by that method
    (same weights and seed, different draws for icdf and gumbel)."""
    space = vector_space()
    icdf = RSSM(make_cfg(), space, 2)
    gumbel = RSSM(make_cfg(sampler="gumbel"), space, 2)
    gumbel.load_state_dict(icdf.state_dict())
    with torch.no_grad():
        _, _, post = icdf.loss(make_batch(space, b=3, t=4))
    state = flatten_state(post)
    action = F.one_hot(torch.randint(0, 2, (12,)), 2).float()
    draws = {}
    for method, wm in (("icdf", icdf), ("gumbel", gumbel)):
        torch.manual_seed(9)
        with torch.no_grad():
            nxt, _, _ = wm.imagine_step(state, action)
            logits = wm.prior_logits(nxt["deter"])
        torch.manual_seed(9)
        expected = sample_index(logits, method=method).squeeze(-1)  # [12, S]
        assert torch.equal(nxt["index"], expected), method
        draws[method] = nxt["index"]
    assert not torch.equal(draws["icdf"], draws["gumbel"])


def test_one_hot_fast_path_equals_the_dense_heads():
    """Where no gradient must reach z the RSSM's img_in, reward and cont heads gather weight
    columns by the latent's class indices (linear_onehot); the results equal the dense path's."""
    space = vector_space()
    wm = RSSM(make_cfg(), space, 2)
    with torch.no_grad():
        for head in (wm.reward_head.out, wm.cont_head.out):
            head.weight.normal_(0.0, 0.02)  # the reward head starts at zero: make it read its input
        _, _, post = wm.loss(make_batch(space, b=3, t=4))
    state = flatten_state(post)
    assert state["index"].dtype == torch.int64 and state["index"].shape == (12, 4)
    assert torch.equal(F.one_hot(state["index"], 4).float(), state["stoch"])
    action = F.one_hot(torch.randint(0, 2, (12,)), 2).float()
    torch.manual_seed(3)
    with torch.no_grad():
        fast = wm.imagine_step(state, action)
    torch.manual_seed(3)
    assert isinstance(wm.head_features(state), OneHotFeatures)
    # a z that needs its gradient (straight-through) takes the dense concatenated features
    state = {**state, "stoch": state["stoch"].clone().requires_grad_()}
    assert isinstance(wm.head_features(state), torch.Tensor)
    dense = wm.imagine_step(state, action)
    torch.testing.assert_close(fast[0]["deter"], dense[0]["deter"].detach())
    assert torch.equal(fast[0]["index"], dense[0]["index"])
    torch.testing.assert_close(fast[1], dense[1].detach())
    torch.testing.assert_close(fast[2], dense[2].detach())
    assert fast[1].std() > 0.01  # the heads did read the features (rows differ)


def test_linear_onehot_equals_linear_of_the_assembled_input():
    layer = torch.nn.Linear(3 + 2 * 4 + 5, 6)
    index = torch.randint(0, 4, (7, 2))
    dense = torch.randn(7, 8)
    onehot = F.one_hot(index, 4).float().flatten(-2)  # [7, 8]
    for start in (0, 3, 8):  # one-hot block first, in the middle, last
        full = torch.cat([dense[:, :start], onehot, dense[:, start:]], -1)
        got = linear_onehot(layer, dense, index, 4, start)
        torch.testing.assert_close(got, layer(full))


def test_mlp_reads_one_hot_features_as_their_dense_form_with_the_same_gradients():
    """MLP(OneHotFeatures) = MLP(to_dense()) in value and in every weight's gradient (the
    critic and actor train on one-hot features)."""
    torch.manual_seed(0)
    mlp = MLP(5 + 3 * 4, 7, 16, 2)
    feat = OneHotFeatures(torch.randn(6, 2, 5), torch.randint(0, 4, (6, 2, 3)), 4, 5)
    dense = feat.to_dense()  # [6, 2, 17]
    assert dense.shape == (6, 2, 17)
    assert torch.equal(dense[..., 5:].reshape(6, 2, 3, 4).argmax(-1), feat.index)
    grads = []
    for x in (feat, dense):
        mlp.zero_grad()
        out = mlp(x)
        (out * torch.arange(7.0)).sum().backward()
        grads.append([p.grad.clone() for p in mlp.parameters()])
        if x is feat:
            first = out.detach()
    torch.testing.assert_close(first, mlp(dense).detach())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # stacking and mapping keep the parts together; a mix of forms stacks dense
    stacked = stack_features([feat, feat.map(lambda v: v.flip(0))], 1)
    assert isinstance(stacked, OneHotFeatures) and stacked.index.shape == (6, 2, 2, 3)
    torch.testing.assert_close(stacked.to_dense(), torch.stack([dense, dense.flip(0)], 1))
    mixed = stack_features([feat, dense], 0)
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed, torch.stack([dense, dense]))
    torch.testing.assert_close(map_features(feat, lambda v: v[:, 0]).to_dense(), dense[:, 0])


def test_tiny_rssm_overfits_a_fixed_sequence():
    """200 Adam steps on one (2 x 10) batch: model loss 9.8 -> < 1.2 (~8 s on one idle core)."""
    space = vector_space()
    wm = RSSM(make_cfg(), space, 2)
    batch = make_batch(space, b=2, t=10)
    batch["is_terminal"][0, -1] = True
    opt = torch.optim.Adam(wm.parameters(), 3e-3)
    for _ in range(200):
        loss, metrics, post = wm.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["model_loss"] < 1.2
    assert metrics["vector_loss"] < 0.15
    assert metrics["cont_loss"] < 0.01
    assert metrics["reward_loss"] < 0.5
    with torch.no_grad():
        reward = wm.twohot.decode(wm.reward_head(wm.features(post)))
    assert (reward - batch["reward"]).abs().max() < 0.3


# ------------------------------------------------------------------ networks
def test_conv_encoder_decoder_shapes_and_scale():
    enc = ConvEncoder((64, 64, 3), depth=4)
    image = torch.full((2, 5, 64, 64, 3), 255, dtype=torch.uint8)
    feat = enc(image)
    assert feat.shape == (2, 5, 32 * 4 * 4) and enc.out_dim == 512
    dec = ConvDecoder(10, (64, 64, 3), depth=4)
    assert dec(torch.randn(2, 5, 10)).shape == (2, 5, 64, 64, 3)
    with pytest.raises(ValueError, match="minres"):
        ConvEncoder((48, 48, 3), depth=4, minres=4)  # 48 -> 24 -> 12 -> 6 -> 3


def test_multi_encoder_decoder_losses():
    space = image_space(16)
    enc = MultiEncoder(space, depth=4, units=8, layers=1)
    obs = {"image": torch.zeros(3, 16, 16, 3, dtype=torch.uint8), "vector": torch.zeros(3, 2)}
    assert enc(obs).shape == (3, enc.out_dim) and enc.out_dim == 8 * 4 * 4 + 8
    dec = MultiDecoder(6, space, depth=4, units=8, layers=1)
    losses = dec.loss(torch.randn(3, 6), obs)
    assert set(losses) == {"image", "vector"} and losses["image"].shape == (3,)
    with pytest.raises(ValueError, match="unsupported observation key"):
        MultiEncoder(gym.spaces.Dict({"rgb": gym.spaces.Box(0, 1, (2,))}), 4, 8, 1)


# ------------------------------------------------------------------ configs
def test_factory_and_config_errors():
    wm = make_world_model(make_cfg(), vector_space(), 2)
    assert isinstance(wm, RSSM)
    with pytest.raises(ConfigError, match=r"world_model.name must be one of \['rssm'"):
        make_world_model(make_cfg(name="dreamer"), vector_space(), 2)
    with pytest.raises(ConfigError, match="world_model.deter"):
        RSSM(make_cfg(deter=-3), vector_space(), 2)
    with pytest.raises(ConfigError, match="world_model.norm"):
        RSSM(make_cfg(norm="batch"), vector_space(), 2)
    with pytest.raises(ConfigError, match="world_model.sampler"):
        RSSM(make_cfg(sampler="multinomial"), vector_space(), 2)
    with pytest.raises(ConfigError, match="world_model.loss_scales.reward"):
        RSSM(make_cfg(loss_scales={"reward": "high"}), vector_space(), 2)
    cfg = make_cfg()
    del cfg["free_nats"]
    with pytest.raises(ConfigError, match="missing config key 'world_model.free_nats'"):
        RSSM(cfg, vector_space(), 2)
    with pytest.raises(ConfigError, match="unknown config key 'world_model.detr'"):
        RSSM(make_cfg(detr=64), vector_space(), 2)
    with pytest.raises(ConfigError, match="unknown config key 'world_model.loss_scales.rew'"):
        RSSM(make_cfg(loss_scales={"rew": 1.0}), vector_space(), 2)


@pytest.mark.parametrize("size", ["xs", "s", "m", "l"])
def test_presets_only_override_known_world_model_keys(size):
    base = OmegaConf.load(CONFIGS / "world_model" / "rssm.yaml")
    preset = OmegaConf.load(CONFIGS / "preset" / f"dreamer_{size}.yaml")
    assert set(preset.world_model) <= set(base)
    assert preset.world_model.stoch == 32 and preset.world_model.classes == 32
