"""IRIS world model: a VQ tokenizer plus a causal Transformer over [frame tokens, action] blocks.

Micheli et al., "Transformers are Sample-Efficient World Models" (ICLR 2023). A frame becomes
K tokens (``world_models/tokenizer.py``); a trajectory becomes the sequence of blocks
``[z_t^1 .. z_t^K, a_t]`` (``world_models/transformer.py``). Trained with the replay row
convention (action[t] is taken AT obs[t]), block t predicts:

- inside frame t: token i+1 from the positions up to token i (intra-frame autoregression);
- at the action position: token 1 of frame t+1, reward[t+1] and is_terminal[t+1].

Attention never crosses an ``is_first`` boundary (a per-row segment mask), and cross-block
targets whose next row is an ``is_first`` row are masked out of the loss.

States (a flat dict, leading dims [N] or [B, T]):

- ``tokens`` long [N, K]: the current frame's tokens;
- ``hidden`` [N, D]: the Transformer's output at the frame's last token: it has read every
  visible frame and action so far, so it is the Markov summary the actor reads (``features``);
- ``hist_tokens`` long [N, C, K], ``hist_actions`` [N, C, A], ``hist_valid`` bool [N, C]: the
  last C = ``history_blocks`` complete blocks, to (re)build the KV cache (absent when C = 0);
- after the first dream/observe step also ``kv`` [N, L, 2, h, M, d] (a batch-first view of the
  [L, 2, N, h, M, d] cache storage, written in place) and ``valid`` bool [N, P] (which cached
  positions each row may attend to; its length P is the cache fill level, so the fill level
  is known from shapes without reading a tensor on the host).

``imagine_step`` writes into the cache of the state it is given: the old state stays readable
(``features``) but must not be stepped twice. To branch (planning), clone first:
``state_map(state, torch.clone)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agents.config import ConfigError, check_bool, check_choice, check_float, check_int
from world_models.base import State, WorldModel
from world_models.distributions import TwoHot, sample_index
from world_models.tokenizer import Tokenizer
from world_models.transformer import KVCache, Transformer, attention_mask, segment_mask


def _head(width: int, out: int) -> nn.Module:
    """IRIS heads: Linear-ReLU-Linear on the Transformer output, [..., D] -> [..., out]."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


def _push_history(
    state: State, tokens: torch.Tensor, action: torch.Tensor, valid: torch.Tensor
) -> None:
    """Drop the oldest history block and append (tokens [N,K], action [N,A], valid [N])."""
    if "hist_tokens" not in state:  # history_blocks = 0: states carry no history
        return
    for key, item in (("hist_tokens", tokens), ("hist_actions", action), ("hist_valid", valid)):
        state[key] = torch.cat([state[key][:, 1:], item[:, None]], 1)


class IrisWorldModel(WorldModel):
    """IRIS: discrete autoencoder + autoregressive Transformer with a KV cache for dreaming.

    cfg: the ``world_model`` subtree (see configs/world_model/transformer.yaml).
    obs_space: a gymnasium Dict space (or mapping) with an ``image`` entry of shape [H, W, C].
    action_dim: A, the one-hot size for discrete actions or the vector size for continuous ones.
    """

    differentiable_imagination: bool = False
    """Dream steps run under ``no_grad`` (the cache is written in place): train the actor with
    REINFORCE, as IRIS does, not by backpropagating through the dynamics."""

    def __init__(self, cfg: Any, obs_space: Any, action_dim: int) -> None:
        super().__init__()
        p = "world_model."
        spaces = getattr(obs_space, "spaces", obs_space)
        if "image" not in spaces:
            raise ConfigError(
                "world_model=transformer (IRIS) needs image observations (obs key 'image'); "
                f"got keys {sorted(spaces)}. Use env.from_pixels=true or world_model=rssm."
            )
        image_shape = tuple(spaces["image"].shape)
        self.tokenizer = Tokenizer(cfg, image_shape, prefix=p)
        self.K = self.tokenizer.tokens_per_frame
        self.vocab = self.tokenizer.vocab_size
        if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1:
            raise ConfigError(f"action_dim must be a positive int, got {action_dim!r}")
        self.action_dim = action_dim
        width = check_int(cfg, "width", p)
        layers = check_int(cfg, "layers", p)
        heads = check_int(cfg, "heads", p)
        if width % heads:
            raise ConfigError(f"{p}width ({width}) must be divisible by {p}heads ({heads})")
        dropout = check_float(cfg, "dropout", p, low=0.0, high=1.0)
        self.context_blocks = check_int(cfg, "context_blocks", p, low=2)
        self.history_blocks = check_int(cfg, "history_blocks", p, low=0)
        if self.history_blocks > self.context_blocks - 2:
            raise ConfigError(
                f"{p}history_blocks must be <= context_blocks - 2 = {self.context_blocks - 2} "
                f"(a refilled cache needs room for one more step), got {self.history_blocks}"
            )
        self.tokenizer_batch = check_int(cfg, "tokenizer_batch", p, low=0)
        # Absent from configs saved before the key existed: 0, the tokenizer never freezes.
        self.tokenizer_updates = (
            check_int(cfg, "tokenizer_updates", p, low=0) if "tokenizer_updates" in cfg else 0
        )
        self.reward_head_kind = check_choice(cfg, "reward_head", ["sign", "twohot"], p)
        self.temperature = check_float(cfg, "temperature", p, low=1e-3)
        # false: every position recomputes the whole prefix (the KV cache's measured baseline);
        # absent from configs saved before the key existed
        self.kv_cache = check_bool(cfg, "kv_cache", p) if "kv_cache" in cfg else True
        self._context = "kv" if self.kv_cache else "seq"  # the state entry holding the prefix
        self.feature_kind = check_choice(cfg, "features", ["hidden", "tokens"], p)
        self.weights = {
            k: check_float(cfg, f"{k}_weight", p, low=0.0)
            for k in ("tokenizer", "obs", "reward", "end")
        }
        self.tokenizer_lr = check_float(cfg, "tokenizer_lr", p, low=0.0)
        self.transformer_lr = check_float(cfg, "transformer_lr", p, low=0.0)
        self.weight_decay = check_float(cfg, "weight_decay", p, low=0.0)
        self.grad_clip = check_float(cfg, "grad_clip", p, low=0.0)  # read by the learner

        self.width = width
        self.block_len = self.K + 1
        self.capacity = self.context_blocks * self.block_len  # M positions
        self.token_emb = nn.Embedding(self.vocab, width)
        self.action_emb = nn.Linear(self.action_dim, width, bias=False)  # one-hot = lookup
        self.pos_emb = nn.Embedding(self.capacity, width)
        for emb in (self.token_emb, self.pos_emb):
            nn.init.normal_(emb.weight, 0.0, 0.02)
        self.transformer = Transformer(width, layers, heads, dropout)
        self.obs_head = _head(width, self.vocab)
        reward_out = 3 if self.reward_head_kind == "sign" else 255
        self.reward_head = _head(width, reward_out)
        self.end_head = _head(width, 2)
        self.twohot = TwoHot(255) if self.reward_head_kind == "twohot" else None
        self.feature_dim = width if self.feature_kind == "hidden" else self.K * width
        # Training loss calls that trained the tokenizer (saturates at tokenizer_updates), in
        # the state_dict so that a resumed run stays frozen; mirrored on the host (None: not
        # read yet) so that deciding whether to freeze costs no device sync per update.
        self.register_buffer("tokenizer_steps", torch.zeros((), dtype=torch.long))
        self._tokenizer_steps: int | None = None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # Checkpoints from before the counter: the tokenizer's updates so far are unknown, so
        # it gets tokenizer_updates more (load_state_dict passes a copy of the caller's dict).
        key = prefix + "tokenizer_steps"
        if key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._tokenizer_steps = None  # re-read from the loaded buffer at the next loss call

    @torch.compiler.disable  # host-side count: one graph break instead of a recompile per call
    def _tokenizer_trains(self) -> bool:
        """Whether this loss call trains the tokenizer: False once ``tokenizer_updates`` (> 0)
        training calls (module in training mode, grad enabled) have done so; counts this one."""
        if self._tokenizer_steps is None:
            self._tokenizer_steps = int(self.tokenizer_steps)
        if 0 < self.tokenizer_updates <= self._tokenizer_steps:
            return False
        if self.training and torch.is_grad_enabled():
            self._tokenizer_steps += 1
            self.tokenizer_steps.fill_(self._tokenizer_steps)
        return True

    # ----------------------------------------------------------------------------- embedding
    def _positions(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        return self.pos_emb(torch.arange(start, start + length, device=device))  # [S, D]

    def _embed_blocks(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """tokens [N, nb, K], actions [N, nb, A] -> [N, nb*(K+1), D] without positions."""
        frames = self.token_emb(tokens)  # [N, nb, K, D]
        acts = self.action_emb(actions.to(frames.dtype))[:, :, None]  # [N, nb, 1, D]
        return torch.cat([frames, acts], 2).flatten(1, 2)  # [N, nb*(K+1), D]

    # ------------------------------------------------------------------------------ training
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, State]:
        """Tokenizer loss + Transformer loss on the (detached) tokens of every frame.

        The tokenizer trains on every frame, or on ``tokenizer_batch`` random frames of the
        batch when that is > 0 and smaller than B*T (the decoder is the costly part on CPU);
        its code ages (dead-code restarts) count the tokens of every frame either way. After
        ``tokenizer_updates`` (> 0) training calls it is frozen: no tokenizer loss, gradient
        or code restart, the tokens come from ``tokenizer.encode`` (metric ``tokenizer/frozen``).

        batch: ``image`` uint8 [B,T,H,W,C], ``action`` [B,T,A], ``reward`` [B,T],
        ``is_first``/``is_terminal`` bool [B,T]. The Transformer sees T <= context_blocks blocks.
        """
        image = batch["image"]
        b0, t0 = image.shape[:2]
        ctx, k, kb = self.context_blocks, self.K, self.block_len
        if t0 > ctx and t0 % ctx:
            raise ValueError(
                f"sequence length {t0} must be <= world_model.context_blocks ({ctx}) or a "
                "multiple of it (longer sequences are cut into windows of context_blocks)"
            )
        frames = image.flatten(0, 1)  # [B*T, H, W, C]
        n_tok = self.tokenizer_batch
        train_tokenizer = self._tokenizer_trains()
        tok_loss = None
        if not train_tokenizer:  # frozen: fixed token ids for the Transformer to learn
            tokens0 = self.tokenizer.encode(frames)
            metrics = self.tokenizer._usage(tokens0)  # code ages only: no restarts
        elif 0 < n_tok < frames.shape[0]:
            # The autoencoder trains on a random subset of the frames (IRIS trains it on its
            # own batch); every frame is still encoded (no gradient) for the Transformer, before
            # this call's code restarts (which only move codes none of these tokens use).
            pick = torch.randperm(frames.shape[0], device=frames.device)[:n_tok]
            tokens0 = self.tokenizer.encode(frames)
            tok_loss, metrics, _ = self.tokenizer.loss(frames[pick], usage_tokens=tokens0)
        else:
            tok_loss, metrics, tokens0 = self.tokenizer.loss(frames)
        frozen = float(not train_tokenizer)
        metrics["tokenizer/frozen"] = torch.full((), frozen, device=image.device)  # 0 or 1
        tokens0 = tokens0.view(b0, t0, k)  # [B, T, K], no gradient (discrete)
        actions0 = batch["action"].float()  # [B, T, A]
        is_first0 = batch["is_first"].bool()  # [B, T]
        # Windows of at most context_blocks blocks: [B, T] -> [B', T'] with B'T' = BT.
        t = min(t0, ctx)
        b = b0 * t0 // t
        tokens, actions = tokens0.reshape(b, t, k), actions0.reshape(b, t, -1)
        is_first = is_first0.reshape(b, t)

        x = self._embed_blocks(tokens, actions) + self._positions(0, t * kb, image.device)
        segment = is_first.long().cumsum(1).repeat_interleave(kb, 1)  # [B, T*(K+1)]
        out = self.transformer(x, segment_mask(segment)).view(b, t, kb, -1)  # [B, T, K+1, D]

        # Next-token targets: inside each frame (i -> i+1), and action(t) -> token 0 of t+1.
        logits_in = self.obs_head(out[:, :, : k - 1])  # [B, T, K-1, V]
        ce_in = F.cross_entropy(
            logits_in.flatten(0, 2), tokens[:, :, 1:].flatten(), reduction="sum"
        )
        act_out = out[:, :-1, k]  # [B, T-1, D], action positions that have a next row
        nxt = (~is_first[:, 1:]).float()  # [B, T-1], 0 where the next row starts an episode
        n_next = nxt.sum().clamp_min(1.0)
        ce_next = F.cross_entropy(
            self.obs_head(act_out).flatten(0, 1), tokens[:, 1:, 0].flatten(), reduction="none"
        )  # [B*(T-1)]
        n_in = b * t * (k - 1)
        obs_loss = (ce_in + (ce_next * nxt.flatten()).sum()) / (n_in + n_next)

        reward = batch["reward"].reshape(b, t)[:, 1:].float()  # [B, T-1], on arriving at t+1
        reward_logits = self.reward_head(act_out)  # [B, T-1, 3 | 255]
        if self.twohot is None:
            labels = (torch.sign(reward) + 1).long()  # {-1, 0, 1} -> {0, 1, 2}
            reward_nll = F.cross_entropy(reward_logits.transpose(1, 2), labels, reduction="none")
        else:
            reward_nll = self.twohot.loss(reward_logits, reward)  # [B, T-1]
        reward_loss = (reward_nll * nxt).sum() / n_next
        end_labels = batch["is_terminal"].reshape(b, t)[:, 1:].long()  # [B, T-1]
        end_logits = self.end_head(act_out)  # [B, T-1, 2]
        end_nll = F.cross_entropy(end_logits.transpose(1, 2), end_labels, reduction="none")
        end_loss = (end_nll * nxt).sum() / n_next

        w = self.weights
        dyn_loss = w["obs"] * obs_loss + w["reward"] * reward_loss + w["end"] * end_loss
        loss = dyn_loss if tok_loss is None else w["tokenizer"] * tok_loss + dyn_loss
        with torch.no_grad():
            pred = reward_logits.argmax(-1) - 1 if self.twohot is None else None
            metrics.update(
                {
                    "world_model/loss": loss.detach(),
                    "world_model/obs_loss": obs_loss.detach(),
                    "world_model/reward_loss": reward_loss.detach(),
                    "world_model/end_loss": end_loss.detach(),
                }
            )
            if pred is not None:
                hit = (pred == torch.sign(reward).long()).float()
                metrics["world_model/reward_sign_acc"] = (hit * nxt).sum() / n_next

        posterior = {
            "tokens": tokens0,
            "hidden": out[:, :, k - 1].detach().reshape(b0, t0, -1),  # [B, T, D], last token
            **self._history(tokens0, actions0, is_first0),
        }
        return loss, metrics, posterior

    def _history(self, tokens: torch.Tensor, actions: torch.Tensor, is_first: torch.Tensor):
        """For every row t, blocks t-C .. t-1 of its own episode: [B, T, C, ...] tensors."""
        b, t, k = tokens.shape
        c = self.history_blocks
        if c == 0:  # states carry no history (zero-size tensors would not flatten)
            return {}
        segment = is_first.long().cumsum(1)  # [B, T]
        steps = torch.arange(t, device=tokens.device)
        index = steps[:, None] - c + torch.arange(c, device=tokens.device)  # [T, C]
        inside = index >= 0  # [T, C]
        index = index.clamp_min(0)
        hist_tokens = tokens[:, index]  # [B, T, C, K]
        hist_actions = actions[:, index]  # [B, T, C, A]
        same = segment[:, index] == segment[:, :, None]  # [B, T, C]
        return {
            "hist_tokens": hist_tokens,
            "hist_actions": hist_actions,
            "hist_valid": same & inside,
        }

    def param_groups(self) -> list[dict]:
        """Optimiser groups for ``torch.optim.AdamW``: tokenizer (its own lr, no decay) and
        Transformer (IRIS: lr 1e-4, weight decay 0.01 on Linear weights only)."""
        tok = list(self.tokenizer.parameters())
        tok_ids = {id(q) for q in tok}
        decay, no_decay = [], []
        for mod in self.modules():
            for name, q in mod.named_parameters(recurse=False):
                if id(q) in tok_ids:
                    continue
                (decay if isinstance(mod, nn.Linear) and name == "weight" else no_decay).append(q)
        return [
            {"params": tok, "lr": self.tokenizer_lr, "weight_decay": 0.0},
            {"params": decay, "lr": self.transformer_lr, "weight_decay": self.weight_decay},
            {"params": no_decay, "lr": self.transformer_lr, "weight_decay": 0.0},
        ]

    # --------------------------------------------------------------------------- inference
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """No gradient and no dropout while filtering or dreaming; restores the mode after."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def initial(self, batch_size: int) -> State:
        device = self.pos_emb.weight.device
        c, k, n = self.history_blocks, self.K, batch_size
        state = {
            "tokens": torch.zeros(n, k, dtype=torch.long, device=device),
            "hidden": torch.zeros(n, self.width, device=device),
            self._context: self._empty_context(n, device),
            "valid": torch.zeros(n, 0, dtype=torch.bool, device=device),
        }
        if c > 0:
            state["hist_tokens"] = torch.zeros(n, c, k, dtype=torch.long, device=device)
            state["hist_actions"] = torch.zeros(n, c, self.action_dim, device=device)
            state["hist_valid"] = torch.zeros(n, c, dtype=torch.bool, device=device)
        return state

    def _empty_context(self, n: int, device: torch.device) -> torch.Tensor:
        """An empty prefix for n rows: the KV cache [L, 2, N, h, M, d] as a tensor, or (with
        ``kv_cache: false``) the embedded inputs [N, 0, D] that every pass recomputes."""
        if self.kv_cache:
            return self.transformer.new_cache(n, self.capacity, device).as_state()
        return torch.zeros(n, 0, self.width, device=device)

    def _feed(self, state: State, x: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
        """Append embedded inputs x [N, S, D] to the prefix; returns outputs [N, S, D].

        Updates ``state["valid"]`` to [N, P+S] in place of the dict entry. With the KV cache
        the S positions attend to the cached keys and values of the P before them; without
        (``kv_cache: false``) the Transformer runs over all P+S positions again.
        """
        p, s = state["valid"].shape[1], x.shape[1]
        x = x + self._positions(p, s, x.device)
        key_valid = torch.cat([state["valid"], new_valid], 1)  # [N, P+S]
        if self.kv_cache:
            cache = KVCache.from_state(state["kv"])
            out = self.transformer(x, attention_mask(key_valid, s), cache, p)
        else:
            seq = torch.cat([state["seq"], x.to(state["seq"].dtype)], 1)  # [N, P+S, D]
            out = self.transformer(seq, attention_mask(key_valid, p + s))[:, p:]
            state["seq"] = seq
        state["valid"] = key_valid
        return out

    def _refill(self, state: State) -> State:
        """(Re)build the cache from the history blocks and the current frame, from position 0.

        Used at the first dream step from a posterior state (which carries no cache) and
        whenever the next step would overflow the cache (IRIS resets to the current frame
        alone, i.e. history_blocks = 0). Costs one forward over C*(K+1)+K positions.
        """
        n, k = state["tokens"].shape[0], self.K
        new = dict(state)
        context = state.get(self._context)  # [N, ...]; a cache is reused: 0.. are rewritten
        if context is None or context.shape[0] != n or not self.kv_cache:
            new[self._context] = self._empty_context(n, state["tokens"].device)
        x = self.token_emb(state["tokens"])  # [N, K, D]
        valid = torch.ones(n, k, dtype=torch.bool, device=x.device)  # [N, K]
        if "hist_tokens" in state:
            hist = self._embed_blocks(state["hist_tokens"], state["hist_actions"])  # [N, C(K+1), D]
            hist_valid = state["hist_valid"].repeat_interleave(self.block_len, 1)
            x = torch.cat([hist, x], 1)  # [N, C(K+1)+K, D]
            valid = torch.cat([hist_valid, valid], 1)  # [N, C(K+1)+K]
        new["valid"] = valid[:, :0]
        out = self._feed(new, x, valid)
        new["hidden"] = out[:, -1]
        return new

    def _ensure_room(self, state: State) -> State:
        if self._context not in state or state["valid"].shape[1] + self.block_len > self.capacity:
            return self._refill(state)
        return dict(state)

    def observe_step(
        self,
        state: State,
        prev_action: torch.Tensor,
        obs: dict[str, torch.Tensor],
        is_first: torch.Tensor,
    ) -> State:
        """Encode obs["image"] [N,H,W,C] and append [prev_action, its K tokens] to the cache.

        Rows with is_first [N] forget everything before (their keys are masked out).
        """
        with self._inference():
            tokens = self.tokenizer.encode(obs["image"])  # [N, K]
            state = self._ensure_room(state)
            ones = torch.ones_like(tokens, dtype=torch.bool)
            fresh = state["valid"].shape[1] == 0  # empty cache: the frame alone, at position 0
            keep = ~is_first.bool() & (not fresh)  # [N], False where the past is forgotten
            state["valid"] = state["valid"] & keep[:, None]
            prev_action = prev_action.float() * keep[:, None]
            if fresh:
                out = self._feed(state, self.token_emb(tokens), ones)  # [N, K, D]
            else:  # blocks stay aligned with training: frames start at multiples of K+1
                x = torch.cat([self.action_emb(prev_action)[:, None], self.token_emb(tokens)], 1)
                out = self._feed(state, x, torch.cat([keep[:, None], ones], 1))  # [N, K+1, D]
            if "hist_valid" in state:
                state["hist_valid"] = state["hist_valid"] & keep[:, None]
            _push_history(state, state["tokens"], prev_action, keep)
            state["tokens"], state["hidden"] = tokens, out[:, -1]
            return state

    def imagine_step(
        self, state: State, action: torch.Tensor
    ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """Feed action [N, A], sample the next frame's K tokens one position at a time.

        Every row advances together; each of the K+1 positions is one cached forward pass of
        one position for all N rows. Returns (next state, reward [N], continue prob [N]);
        reward is the expectation under the reward head (sign head: p(+1) - p(-1)).
        """
        with self._inference():
            state = self._ensure_room(state)
            n, k = action.shape[0], self.K
            action = action.float()
            ones = torch.ones(n, 1, dtype=torch.bool, device=action.device)
            h = self._feed(state, self.action_emb(action)[:, None], ones)[:, 0]  # [N, D]
            reward = self._reward_mean(self.reward_head(h))  # [N]
            cont = torch.softmax(self.end_head(h), -1)[:, 0]  # [N], p(not end)
            tokens = []
            for _ in range(k):
                logits = self.obs_head(h) / self.temperature  # [N, V]
                tok = sample_index(logits).squeeze(-1)  # [N]
                tokens.append(tok)
                h = self._feed(state, self.token_emb(tok)[:, None], ones)[:, 0]
            _push_history(state, state["tokens"], action, ones[:, 0])
            state["tokens"], state["hidden"] = torch.stack(tokens, 1), h  # [N, K], [N, D]
            return state, reward, cont

    def _reward_mean(self, logits: torch.Tensor) -> torch.Tensor:
        if self.twohot is not None:
            return self.twohot.decode(logits)
        probs = torch.softmax(logits, -1)  # [N, 3] over {-1, 0, +1}
        return probs[..., 2] - probs[..., 0]

    def features(self, state: State) -> torch.Tensor:
        """``hidden`` [..., D] (default) or the flattened token embeddings [..., K*D]."""
        if self.feature_kind == "hidden":
            return state["hidden"]
        return self.token_emb(state["tokens"]).flatten(-2)

    def decode(self, state: State) -> torch.Tensor:
        """The frame a state holds, reconstructed by the tokenizer: uint8 [..., H, W, C]."""
        return self.tokenizer.decode(state["tokens"])
