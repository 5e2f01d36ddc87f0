"""VQ tokenizer: shapes, codebook lookup, straight-through gradients, learning, LPIPS guard."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from agents.config import ConfigError
from world_models.tokenizer import Tokenizer

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]], dtype=torch.uint8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions: one thread is faster on the shared 2 cores (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer(size: int = 64, **overrides) -> Tokenizer:
    base = OmegaConf.load("configs/world_model/transformer.yaml")
    small = {
        "vocab_size": 16,
        "embed_dim": 8,
        "tokens_per_frame": 16,
        "tokenizer_channels": 8,
        "tokenizer_res_blocks": 0,
    }
    return Tokenizer(OmegaConf.merge(base, small, overrides), (size, size, 3), "world_model.")


def squares(n: int, size: int) -> torch.Tensor:
    """n images uint8 [n, size, size, 3]: a 4x4 grid of cells, each one of 4 flat colours."""
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 4, (n, 4, 4), generator=g)
    cell = size // 4
    return COLOURS[cells].repeat_interleave(cell, 1).repeat_interleave(cell, 2).contiguous()


def test_encode_decode_shapes_and_dtypes():
    tok = make_tokenizer()
    images = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 3, 16) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 16
    frames = tok.decode(tokens)
    assert frames.shape == (2, 3, 64, 64, 3) and frames.dtype == torch.uint8
    loss, metrics, flat = tok.loss(images.flatten(0, 1))
    assert loss.shape == () and flat.shape == (6, 16)
    assert 1.0 <= metrics["tokenizer/codebook_perplexity"] <= 16.0


def test_quantize_picks_the_nearest_code():
    tok = make_tokenizer()
    with torch.no_grad():
        tok.codebook.weight.copy_(torch.eye(16, 8) * 2.0)  # code i = 2 e_i (i < 8), 0 after
    z = torch.zeros(1, 8, 4, 4)
    z[0, 3, 0, 1] = 1.5  # nearest: code 3 (distance 0.25) rather than a zero code (2.25)
    z[0, 5, 2, 2] = 0.9  # nearest: a zero code (0.81), not code 5 (1.21) -> first zero code 8
    tokens, z_q = tok.quantize(z)
    assert tokens[0, 1] == 3 and tokens[0, 2 * 4 + 2] == 8 and tokens[0, 0] == 8
    assert torch.equal(z_q[0, :, 0, 1], tok.codebook.weight[3])


def test_straight_through_gradient_reaches_the_encoder():
    tok = make_tokenizer()
    images = squares(2, 64)
    x = tok.preprocess(images)
    _, _, recon, _ = tok(images)
    (recon - x).abs().mean().backward()  # reconstruction only: no commitment term
    grad = sum(p.grad.abs().sum() for p in tok.encoder.parameters() if p.grad is not None)
    assert grad > 0
    assert tok.codebook.weight.grad is None  # the lookup itself passes no gradient to codes


def test_commitment_and_codebook_losses_route_gradients_apart():
    tok = make_tokenizer(recon_weight=0.0, commitment_beta=0.0)  # codebook term only
    loss, _, _ = tok.loss(squares(2, 64))
    loss.backward()
    assert tok.codebook.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tok.encoder.parameters())


@pytest.mark.slow
def test_small_autoencoder_learns_coloured_squares():
    """16 frames of 4x4 flat-colour cells (32x32, 8x8 cells): after 200 Adam steps the mean
    absolute pixel error is below 30 / 255 (predicting the mean image: 114; measured ~19)."""
    torch.manual_seed(0)
    tok = make_tokenizer(size=32)
    images = squares(16, 32)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    for _ in range(200):
        loss, metrics, _ = tok.loss(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    error = (tok.decode(tok.encode(images)).float() - images.float()).abs().mean()
    assert error < 30.0
    assert metrics["tokenizer/codebook_usage"] >= 4 / 16  # at least one code per colour


def test_dead_code_count_after_unused_batches():
    tok = make_tokenizer(dead_code_after=2)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    tokens[0, 1] = 5
    tok._usage(tokens)
    m = tok._usage(tokens)  # codes other than 0 and 5 unused for 2 batches
    assert m["tokenizer/dead_codes"] == 14
    assert m["tokenizer/codebook_usage"] == 2 / 16
    p = torch.tensor([15 / 16, 1 / 16])
    assert torch.isclose(m["tokenizer/codebook_perplexity"], (-(p * p.log()).sum()).exp())


def test_dead_codes_restart_on_encoder_outputs():
    """A collapsed codebook (one code for every frame) is revived by restarts."""
    tok = make_tokenizer(dead_code_after=1, restart_dead_codes=True)
    images = squares(8, 64)
    with torch.no_grad():
        tok.codebook.weight.zero_()
        tok.codebook.weight[0] = 10.0  # far away: never chosen, like a collapsed codebook
        z = tok.encoder(tok.preprocess(images))  # [8, E, 4, 4]
    assert tok.encode(images).unique().numel() == 1
    tok.loss(images)  # every code but the chosen one is dead after one batch: restarted
    flat = z.permute(0, 2, 3, 1).reshape(-1, tok.embed_dim)
    book = tok.codebook.weight.detach()
    moved = (book[:, None] - flat[None]).abs().amax(-1).min(1).values < 1e-5  # [V]
    assert moved.sum() >= tok.vocab_size - 1
    assert tok.encode(images).unique().numel() > 1
    assert (tok.code_age == 0).all()
    with pytest.raises(ConfigError, match="restart_dead_codes"):
        make_tokenizer(restart_dead_codes="yes")


def test_perceptual_loss_without_weights_is_a_clear_error():
    with pytest.raises(ConfigError, match="perceptual_weights"):
        make_tokenizer(perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="no such file"):
        make_tokenizer(perceptual_weight=1.0, perceptual_weights="/nonexistent/lpips.pt")


def test_bad_token_grid_names_the_key():
    with pytest.raises(ConfigError, match="world_model.tokens_per_frame"):
        make_tokenizer(tokens_per_frame=12)
    with pytest.raises(ConfigError, match="world_model.tokens_per_frame"):
        make_tokenizer(size=48, tokens_per_frame=16)  # 48 = 4 * 12, not 4 * 2^n
