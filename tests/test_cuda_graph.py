"""agent.cuda_graph: the Dreamer update is graph-safe, checked on the CPU.

A CUDA graph replays the kernels one call recorded: host syncs cannot be recorded, and Python
state read during the recording is frozen into it. ``make_fx`` records an update the same way
(every tensor op, backward and optimiser step included, Python control flow evaluated once and
baked in) and refuses host syncs, so an update that traces, and whose trace replayed on new
batches equals the eager updates, is one that a CUDA graph can capture and replay.

Adam on the CPU reads its step count on the host (on CUDA the update's Adam/AdamW are fused and
``capturable``: the count stays on the device), so the traced agents step with SGD + momentum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dreamer import BOX, DISCRETE, IMAGE, VECTOR, fake_batch, fake_obs, full_cfg
from torch.fx.experimental.proxy_tensor import make_fx

from agents.config import ConfigError
from agents.cuda_graph import GraphedUpdate
from agents.dreamer import DreamerAgent


def sgd_agent(cfg, obs_space, action_space) -> DreamerAgent:
    torch.manual_seed(0)
    agent = DreamerAgent(cfg, obs_space, action_space)

    def sgd(module):
        return torch.optim.SGD(list(module.parameters()), lr=1e-3, momentum=0.9, foreach=True)

    ac = agent.actor_critic
    agent.model_opt = sgd(agent.world_model)
    ac.actor_opt, ac.critic_opt = sgd(ac.actor), sgd(ac.critic)
    return agent


@pytest.mark.parametrize(
    "obs_space, action_space, overrides",
    [
        (VECTOR, DISCRETE, {}),  # REINFORCE, one-hot features, replay-value loss
        (IMAGE, BOX, {}),  # CNN encoder/decoder, dynamics backprop
        (VECTOR, DISCRETE, {"agent.precision": "bf16", "agent.imag_last": 0}),
    ],
)
def test_update_traces_without_host_syncs_and_its_replays_equal_eager(
    obs_space, action_space, overrides
):
    cfg = full_cfg(**overrides)
    traced, eager = sgd_agent(cfg, obs_space, action_space), sgd_agent(cfg, obs_space, action_space)
    batches = [fake_batch(traced, obs_space, action_space, seed) for seed in range(5)]
    for agent in (traced, eager):  # warm-up (momentum buffers), as GraphedUpdate does
        torch.manual_seed(10)
        agent.update(batches[0])
    static = {k: v.clone() for k, v in batches[1].items()}
    torch.manual_seed(11)
    # fails on any host sync; runs update 2 for real while recording it
    graph = make_fx(lambda batch: traced.update(batch))(static)
    torch.manual_seed(11)
    eager.update(batches[1])
    for i in (2, 3, 4):
        for key, value in batches[i].items():
            static[key].copy_(value)
        torch.manual_seed(10 + i)
        with torch.no_grad():  # the trace holds the backward ops itself
            replayed = graph(static)
        torch.manual_seed(10 + i)
        expected = eager.update(batches[i])
        for key in ("model_loss", "actor_loss", "critic_loss", "actor_grad_norm"):
            assert replayed[key].item() == pytest.approx(expected[key].item(), rel=1e-5), (i, key)
    pairs = ((traced.world_model, eager.world_model), (traced.actor_critic, eager.actor_critic))
    for a, b in pairs:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(p.float(), q.float(), atol=1e-6), name  # slow critic, moments too


@pytest.mark.parametrize("obs_space, action_space", [(VECTOR, DISCRETE), (IMAGE, BOX)])
def test_acting_step_traces_without_host_syncs_and_its_replays_equal_eager(obs_space, action_space):
    """The acting step that ``agent.cuda_graph`` replays on a GPU (filter, actor sample),
    traced once and replayed over steps with episode starts, equals eager acting."""
    torch.manual_seed(0)
    agent = DreamerAgent(full_cfg(), obs_space, action_space)
    step = agent._act_step(explore=True)
    n = 3

    def inputs(t, latent, action):
        obs = fake_obs(obs_space, n, t)
        out = {f"latent.{k}": v for k, v in latent.items()}
        out.update({f"obs.{k}": torch.as_tensor(v) for k, v in obs.items()})
        is_first = torch.tensor([t == 0, t == 2, False])
        return out | {"prev_action": action, "is_first": is_first}

    initial = agent._initial_state(n)
    static = inputs(0, initial["latent"], initial["action"])
    torch.manual_seed(1)
    with torch.no_grad():
        graph = make_fx(step)({k: v.clone() for k, v in static.items()})
        torch.manual_seed(1)
        traced = eager = step(static)
        for t in (1, 2, 3, 4):
            latent = {k[7:]: v for k, v in traced.items() if k.startswith("latent.")}
            new = inputs(t, latent, traced["action"])
            for key, value in new.items():
                static[key].copy_(value)
            torch.manual_seed(1 + t)
            traced = graph(static)
            latent = {k[7:]: v for k, v in eager.items() if k.startswith("latent.")}
            torch.manual_seed(1 + t)
            eager = step(inputs(t, latent, eager["action"]))
            for key in eager:
                assert torch.allclose(traced[key].float(), eager[key].float(), atol=1e-6), (t, key)


def test_the_trace_check_catches_host_syncs_and_frozen_python_state():
    """The premise of the test above: a ``.item()`` fails to trace, and a Python counter read
    during tracing is frozen into the replay (as it would be into a CUDA graph)."""
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="_local_scalar_dense"):
        make_fx(lambda t: t * t.sum().item())(x)
    calls = [0]

    def counted(t):
        calls[0] += 1
        return t * calls[0]

    graph = make_fx(counted)(x)
    assert torch.equal(graph(x), counted(x) / 2)  # the replay still multiplies by 1


def test_cuda_graph_config_is_checked_and_falls_back_to_eager_on_cpu():
    with pytest.raises(ConfigError, match="agent.cuda_graph"):
        DreamerAgent(full_cfg(**{"agent.cuda_graph": "yes"}), VECTOR, DISCRETE)
    with pytest.raises(ConfigError, match="agent.cuda_graph and agent.compile"):
        both = {"agent.cuda_graph": True, "agent.compile": True}
        DreamerAgent(full_cfg(**both), VECTOR, DISCRETE)
    losses = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        if graphed:
            with pytest.warns(UserWarning, match="runs eagerly"):
                agent = DreamerAgent(full_cfg(**{"agent.cuda_graph": True}), VECTOR, DISCRETE)
        else:
            agent = DreamerAgent(full_cfg(), VECTOR, DISCRETE)
        assert agent.graphed is None
        losses[graphed] = agent.update(fake_batch(agent, VECTOR, DISCRETE))["model_loss"].item()
    assert losses[True] == losses[False]


def test_graphed_update_refuses_a_batch_of_another_shape():
    step = GraphedUpdate(lambda batch: batch)
    step.inputs = {"reward": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match=r"batch\['reward'\] was captured as \(4, 8\)"):
        step._copy_in({"reward": torch.zeros(4, 9)})
    with pytest.raises(ValueError, match="batch keys"):
        step._copy_in({"action": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match="warm-up"):
        GraphedUpdate(lambda batch: batch, warmup=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "obs_space, action_space, precision",
    [(VECTOR, DISCRETE, "fp32"), (IMAGE, BOX, "fp32"), (VECTOR, DISCRETE, "bf16")],
)
def test_graphed_update_equals_eager_on_gpu(obs_space, action_space, precision):
    """On a GPU: the captured update and acting step (two env counts: training and
    evaluation) replay the eager ones (same seeds, fused capturable Adam on CUDA)."""
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        cfg = full_cfg(**{"agent.cuda_graph": graphed, "agent.precision": precision})
        agent = DreamerAgent(cfg, obs_space, action_space, "cuda")
        batches = [fake_batch(agent, obs_space, action_space, seed) for seed in range(6)]
        losses = []
        for i, batch in enumerate(batches):
            torch.manual_seed(100 + i)
            metrics = agent.update({k: v.cuda() for k, v in batch.items()})
            losses.append(metrics["model_loss"].item())
        assert (agent.graphed is not None and agent.graphed.captured) == graphed
        acted = []
        for n in (2, 1):  # a graph per env count
            state = None
            for t in range(6):  # 3 eager warm-up steps, the capture, 2 replays
                first = np.array([t == 0, t in (0, 4)])[:n]
                obs = {**fake_obs(obs_space, n, t), "is_first": first}
                torch.manual_seed(200 + t)
                action, state = agent.act(obs, state)
                acted.append(state["latent"]["deter"].float().cpu().reshape(-1))
        assert len(agent._act_graphs) == (2 if graphed else 0)
        results.append((losses, torch.cat(acted)))
        if graphed:  # a checkpoint load drops the update's graph; it is recaptured
            agent.load_state_dict(agent.state_dict())
            assert not agent.graphed.captured
            for batch in batches[:4]:
                metrics = agent.update({k: v.cuda() for k, v in batch.items()})
            assert agent.graphed.captured and torch.isfinite(metrics["model_loss"])
    tol = 1e-4 if precision == "fp32" else 1e-2
    assert results[1][0] == pytest.approx(results[0][0], rel=tol)
    assert torch.allclose(results[1][1], results[0][1], atol=tol)
