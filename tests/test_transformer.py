"""IRIS Transformer and world model: KV cache exactness, causality, learning, dream shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces
from omegaconf import OmegaConf

from agents.config import ConfigError
from world_models.base import flatten_state
from world_models.iris import IrisWorldModel
from world_models.transformer import Transformer, attention_mask, segment_mask

A = 3  # actions


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread is faster, and the 2 cores are shared (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**overrides):
    """The iris_cpu preset shrunk further (32x32 frames are not used: 64x64 as in the env)."""
    base = OmegaConf.load("configs/world_model/transformer.yaml")
    preset = OmegaConf.load("configs/preset/iris_cpu.yaml").world_model
    small = {
        "tokenizer_channels": 8,
        "tokenizer_res_blocks": 0,
        "context_blocks": 4,
        "tokens_per_frame": 4,
        "history_blocks": 0,
    }
    return OmegaConf.merge(base, preset, small, overrides)


def make_model(**overrides) -> IrisWorldModel:
    space = spaces.Dict({"image": spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    return IrisWorldModel(tiny_cfg(**overrides), space, A)


def random_batch(b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, generator=g),
        "action": F.one_hot(torch.randint(0, A, (b, t), generator=g), A).float(),
        "reward": torch.randint(-1, 2, (b, t), generator=g).float(),
        "is_first": torch.zeros(b, t, dtype=torch.bool),
        "is_terminal": torch.zeros(b, t, dtype=torch.bool),
    }
    batch["is_first"][:, 0] = True
    return batch


def test_kv_cache_matches_full_recomputation():
    """Feeding one position at a time through the cache gives the full forward's outputs."""
    torch.manual_seed(0)
    net = Transformer(width=32, layers=3, heads=4, dropout=0.1).eval()  # dropout off in eval
    n, s = 3, 23
    x = torch.randn(n, s, 32)
    valid = torch.ones(n, s, dtype=torch.bool)
    with torch.no_grad():
        full = net(x, attention_mask(valid, s))  # [N, S, D]
        cache = net.new_cache(n, capacity=30)
        steps = [
            net(x[:, i : i + 1], attention_mask(valid[:, : i + 1], 1), cache, i) for i in range(s)
        ]
        # also a chunked prefill (7 positions) followed by single steps
        cache2 = net.new_cache(n, capacity=30)
        head = net(x[:, :7], attention_mask(valid[:, :7], 7), cache2, 0)
        tail = [
            net(x[:, i : i + 1], attention_mask(valid[:, : i + 1], 1), cache2, i)
            for i in range(7, s)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([head, *tail], 1), full, atol=1e-5, rtol=0)
    assert cache.data.shape == (3, 2, n, 4, 30, 8)  # [L, 2, N, h, M, d]
    assert cache.data[:, :, :, :, s:].abs().sum() == 0  # nothing written past the prefix


def test_world_model_dream_logits_match_full_recomputation():
    """After K+1 cached dream passes, hidden/obs/reward logits equal a full forward's."""
    torch.manual_seed(0)
    model = make_model().eval()
    batch = random_batch(2, 3)
    _, _, post = model.loss(batch)
    start = flatten_state(post)  # N = 6
    action = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), A).float()
    state, reward, cont = model.imagine_step(dict(start), action)
    # full recomputation over [frame tokens, action, sampled tokens] from position 0
    k = model.K
    with torch.no_grad():
        seq = torch.cat(
            [
                model.token_emb(start["tokens"]),
                model.action_emb(action)[:, None],
                model.token_emb(state["tokens"]),
            ],
            1,
        )  # [N, 2K+1, D]
        seq = seq + model._positions(0, 2 * k + 1, seq.device)
        valid = torch.ones(6, 2 * k + 1, dtype=torch.bool)
        out = model.transformer(seq, attention_mask(valid, 2 * k + 1))
    torch.testing.assert_close(state["hidden"], out[:, -1], atol=1e-5, rtol=0)
    probs = torch.softmax(model.reward_head(out[:, k]), -1)
    torch.testing.assert_close(reward, probs[:, 2] - probs[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cont, torch.softmax(model.end_head(out[:, k]), -1)[:, 0])
    assert state["valid"].shape == (6, 2 * k + 1)  # fill level readable from the shape


def test_causal_mask_later_token_does_not_change_earlier_outputs():
    torch.manual_seed(0)
    net = Transformer(width=16, layers=2, heads=2, dropout=0.0).eval()
    x = torch.randn(1, 10, 16)
    y = x.clone()
    y[:, 6] = torch.randn(16)  # (a constant shift would be undone by LayerNorm)
    mask = attention_mask(torch.ones(1, 10, dtype=torch.bool), 10)
    a, b = net(x, mask), net(y, mask)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_segment_mask_blocks_attention_across_episode_starts():
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    m = segment_mask(seg)[0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    # a masked key that is the query itself stays visible: no empty softmax row
    am = attention_mask(torch.tensor([[False, True, False]]), 2)[0]
    assert torch.equal(am, torch.tensor([[0, 1, 0], [0, 1, 1]], dtype=torch.bool))


def test_tiny_transformer_overfits_a_token_sequence():
    """Next-token cross-entropy on one 32-token sequence falls below 0.05 nats in 100 steps
    (from ln 16 = 2.77 at initialisation; 0.013 measured at step 100)."""
    torch.manual_seed(0)
    vocab, s, d = 16, 32, 32
    tokens = torch.randint(0, vocab, (1, s))
    emb, pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(s, d)
    net = Transformer(width=d, layers=2, heads=2, dropout=0.0)
    head = torch.nn.Linear(d, vocab)
    params = [*emb.parameters(), *pos.parameters(), *net.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    mask = attention_mask(torch.ones(1, s, dtype=torch.bool), s)
    for _ in range(100):
        logits = head(net(emb(tokens) + pos.weight, mask))  # [1, S, V]
        loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_loss_masks_across_episode_starts():
    """Rewards and terminals on is_first rows are never targets; other rows are."""
    torch.manual_seed(0)
    model = make_model(dropout=0.0)
    batch = random_batch(2, 4)
    batch["is_first"][0, 2] = True
    loss0, m0, _ = model.loss(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["reward"][0, 2] = 5.0  # reset row: reward 0 by contract, must be ignored
    changed["is_terminal"][0, 2] = True
    torch.manual_seed(0)
    loss1, m1, _ = model.loss(changed)
    assert m1["world_model/reward_loss"] == m0["world_model/reward_loss"]
    assert m1["world_model/end_loss"] == m0["world_model/end_loss"]
    changed["reward"][0, 3] = -batch["reward"][0, 3] + 1.0  # an ordinary row: it counts
    loss2, m2, _ = model.loss(changed)
    assert m2["world_model/reward_loss"] != m0["world_model/reward_loss"]


def test_history_window_respects_episode_starts():
    model = make_model(history_blocks=2)
    tokens = torch.arange(4).view(1, 4, 1).expand(1, 4, model.K)
    actions = torch.zeros(1, 4, A)
    is_first = torch.tensor([[True, False, True, False]])
    hist = model._history(tokens, actions, is_first)
    assert hist["hist_tokens"][0, :, :, 0].tolist() == [[0, 0], [0, 0], [0, 1], [1, 2]]
    valid = [[False, False], [False, True], [False, False], [False, True]]
    assert hist["hist_valid"][0].tolist() == valid


@pytest.mark.parametrize("history_blocks", [0, 1])
def test_imagination_shapes_device_and_refill(history_blocks):
    """N = B*T starts, horizon H longer than the cache: shapes stay fixed, cache refills."""
    torch.manual_seed(0)
    model = make_model(history_blocks=history_blocks)
    b, t, h = 2, 3, 6
    _, _, post = model.loss(random_batch(b, t))
    state = flatten_state(post)
    feats, rewards, conts, storage = [model.features(state)], [], [], set()
    for _ in range(h):  # cache holds 4 blocks: refills happen inside the horizon
        action = F.one_hot(torch.randint(0, A, (b * t,)), A).float()
        state, r, c = model.imagine_step(state, action)
        storage.add(state["kv"].data_ptr())
        feats.append(model.features(state))
        rewards.append(r)
        conts.append(c)
    feats, rewards, conts = torch.stack(feats), torch.stack(rewards), torch.stack(conts)
    assert feats.shape == (h + 1, b * t, model.feature_dim)
    assert rewards.shape == conts.shape == (h, b * t)
    assert state["tokens"].shape == (b * t, model.K) and state["tokens"].dtype == torch.long
    assert state["kv"].shape[0] == b * t
    assert len(storage) == 1  # refills rewrite the one cache, never allocate another
    assert all(x.device.type == "cpu" for x in (feats, rewards, conts))
    assert torch.isfinite(feats).all() and ((conts >= 0) & (conts <= 1)).all()
    assert (rewards.abs() <= 1).all()  # sign head: expectation of {-1, 0, 1}
    assert not feats.requires_grad


@pytest.mark.parametrize("history_blocks", [0, 1])
def test_recomputing_the_prefix_dreams_and_filters_exactly_what_the_kv_cache_does(history_blocks):
    """world_model.kv_cache=false (the throughput baseline) runs the Transformer over the whole
    prefix at every position; acting and dreaming (refills included) must give the cache's
    tokens, rewards, continues and features."""
    torch.manual_seed(0)
    cached = make_model(history_blocks=history_blocks).eval()
    plain = make_model(history_blocks=history_blocks, kv_cache=False).eval()
    plain.load_state_dict(cached.state_dict())
    batch = random_batch(2, 3)
    _, _, post = cached.loss(batch)
    start = flatten_state(post)
    actions = F.one_hot(torch.randint(0, A, (6, 6)), A).float()  # [H, N, A]
    first = torch.tensor([[True] * 2, [False, True], [False, False]])  # per acting step [N]
    runs = []
    for model in (cached, plain):
        torch.manual_seed(1)  # the same token samples, if the logits are the same
        state, out = dict(start), []
        for action in actions:  # 6 steps through a 4-block cache: refills on the way
            state, reward, cont = model.imagine_step(state, action)
            out += [state["tokens"], reward, cont, model.features(state)]
        act = model.initial(2)
        for t in range(3):
            act = model.observe_step(act, actions[t, :2], {"image": batch["image"][:, t]}, first[t])
            out += [act["tokens"], act["valid"], model.features(act)]
        runs.append(out)
    assert "seq" in state and "kv" not in state  # the plain model kept no cache
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_observe_step_resets_rows_and_matches_a_fresh_start():
    """A row with is_first=True ends up exactly like the same frame in a fresh state's cache."""
    torch.manual_seed(0)
    model = make_model().eval()
    img = random_batch(2, 3)["image"]
    act = torch.zeros(2, A)
    state = model.initial(2)
    state = model.observe_step(state, act, {"image": img[:, 0]}, torch.tensor([True, True]))
    state = model.observe_step(state, act, {"image": img[:, 1]}, torch.tensor([False, True]))
    fresh = model.observe_step(
        model.initial(2), act, {"image": img[:, 1]}, torch.tensor([True, True])
    )
    # row 1 was reset: only its new frame is visible; positions differ, so compare masks
    assert state["valid"][1].tolist() == [False] * (model.K + 1) + [True] * model.K
    assert state["valid"][0].all()
    assert torch.equal(state["tokens"][1], fresh["tokens"][1])
    assert model.features(state).shape == (2, model.feature_dim)


def test_twohot_reward_head_and_token_features():
    model = make_model(reward_head="twohot", features="tokens")
    loss, metrics, post = model.loss(random_batch(2, 3))
    assert torch.isfinite(loss)
    assert model.features(post).shape == (2, 3, model.K * model.width) == (2, 3, model.feature_dim)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="world_model.history_blocks"):
        make_model(history_blocks=3)  # context_blocks 4 leaves room for 2
    with pytest.raises(ConfigError, match="world_model.reward_head"):
        make_model(reward_head="mse")
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ConfigError, match="world_model.tokenizer_updates"):
            make_model(tokenizer_updates=bad)
    space = spaces.Dict({"vector": spaces.Box(-1, 1, (4,), np.float32)})
    with pytest.raises(ConfigError, match="image"):
        IrisWorldModel(tiny_cfg(), space, A)


def test_param_groups_cover_every_parameter_once():
    model = make_model()
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[1]["weight_decay"] == 0.01 and groups[2]["weight_decay"] == 0.0


def _tokenizer_step(model, opt, batch) -> tuple[dict, list]:
    """One optimiser step on model.loss(batch); returns (metrics, tokenizer grads)."""
    loss, metrics, _ = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [q.grad for q in model.tokenizer.parameters()]
    opt.step()
    return metrics, grads


def test_tokenizer_freezes_after_tokenizer_updates_and_stays_frozen_when_resumed():
    """After N training loss calls: no tokenizer gradient, restart or token change; the count
    survives state_dict / load_state_dict; no-grad and eval calls are not counted."""
    torch.manual_seed(0)
    n = 3
    model = make_model(tokenizer_updates=n, tokenizer_batch=4)  # 4 of the 8 frames train it
    opt = torch.optim.AdamW(model.param_groups())
    batch, probe = random_batch(2, 4), random_batch(1, 1)["image"][0]  # probe [1, 64, 64, 3]
    probe[0, 20:40] = 255  # not a frame of the batch
    seen = [model.tokenizer.encode(probe)]
    for i in range(n):
        with torch.no_grad():
            model.loss(batch)  # no gradient: not an update, not counted
        model.eval()
        model.loss(batch)
        model.train()
        assert int(model.tokenizer_steps) == i
        metrics, grads = _tokenizer_step(model, opt, batch)
        assert metrics["tokenizer/frozen"] == 0.0 and "tokenizer/recon_loss" in metrics
        assert all(g is not None for g in grads)
        seen.append(model.tokenizer.encode(probe))
    assert int(model.tokenizer_steps) == n
    assert any(not torch.equal(seen[0], s) for s in seen[1:])  # the ids did move while training

    model.tokenizer.code_age.fill_(10**6)  # every code dead: a restart would move them all
    tok_before = [q.detach().clone() for q in model.tokenizer.parameters()]
    dyn_before = [q.detach().clone() for q in model.transformer.parameters()]
    for _ in range(3):
        metrics, grads = _tokenizer_step(model, opt, batch)
        assert metrics["tokenizer/frozen"] == 1.0 and "tokenizer/recon_loss" not in metrics
        assert all(g is None for g in grads)
        assert torch.equal(model.tokenizer.encode(probe), seen[-1])
    assert int(model.tokenizer_steps) == n
    assert all(torch.equal(a, q) for a, q in zip(tok_before, model.tokenizer.parameters()))
    assert any(not torch.equal(a, q) for a, q in zip(dyn_before, model.transformer.parameters()))

    state = model.state_dict()
    assert int(state["tokenizer_steps"]) == n
    torch.manual_seed(1)
    resumed = make_model(tokenizer_updates=n, tokenizer_batch=4)
    resumed.load_state_dict(state)
    assert int(resumed.tokenizer_steps) == n
    metrics, grads = _tokenizer_step(resumed, torch.optim.AdamW(resumed.param_groups()), batch)
    assert metrics["tokenizer/frozen"] == 1.0 and all(g is None for g in grads)

    # a checkpoint from before the counter loads; its tokenizer gets N more updates
    old = {k: v for k, v in state.items() if k != "tokenizer_steps"}
    resumed.load_state_dict(old)
    assert int(resumed.tokenizer_steps) == 0
    assert resumed.loss(batch)[1]["tokenizer/frozen"] == 0.0


def test_code_ages_count_every_frame_not_only_the_tokenizer_subset():
    """With tokenizer_batch < B*T a code used only by frames outside the subset stays alive."""
    torch.manual_seed(0)
    model = make_model(tokenizer_batch=1, dead_code_after=10**6, tokenizer_updates=0)
    batch = random_batch(2, 4)
    for i in range(8):  # every frame a distinct constant colour: several codes in use
        batch["image"].view(8, -1)[i] = 30 * i
    model.tokenizer.code_age.fill_(5)
    used = torch.zeros(model.vocab, dtype=torch.bool)
    used[model.tokenizer.encode(batch["image"]).flatten()] = True
    _, metrics, _ = model.loss(batch)
    assert metrics["tokenizer/frozen"] == 0.0
    age = model.tokenizer.code_age
    assert (age[used] == 0).all() and (age[~used] == 6).all()
    assert metrics["tokenizer/codebook_usage"] == used.float().mean()
