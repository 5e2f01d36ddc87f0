"""Replay: contiguous sequences, FIFO eviction, dtypes, and chunk-file persistence."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.replay import Replay, ReplayError


def counter_step(t: int, num_envs: int, first_every: int = 7) -> dict[str, np.ndarray]:
    """Row t of every stream: `count` = stream * 10_000 + t identifies stream and position."""
    streams = np.arange(num_envs)
    return {
        "count": (streams * 10_000 + t).astype(np.int64),
        "is_first": np.full(num_envs, t % first_every == 0),
        "reward": np.full(num_envs, t, np.float32),
    }


def fill(replay: Replay, start: int, stop: int, first_every: int = 7) -> None:
    for t in range(start, stop):
        replay.add(counter_step(t, replay.num_envs, first_every))


def snapshot(replay: Replay) -> dict[str, np.ndarray]:
    """The rows held now, oldest first: key -> [N, W, ...] (read through sample-free slicing)."""
    w = min(replay._count, replay.stream_capacity)
    slots = np.arange(replay._count - w, replay._count) % replay.stream_capacity
    return {k: a[:, slots] for k, a in replay._store.items()}


def check_sequences(batch: dict[str, np.ndarray], count: int, window: int) -> None:
    c = batch["count"]  # [B, T]
    stream, t = np.divmod(c, 10_000)
    assert np.all(stream == stream[:, :1])  # one stream per sequence
    assert np.all(np.diff(t, axis=1) == 1)  # consecutive rows
    assert t.min() >= count - window and t.max() < count  # held rows only


def test_sequences_are_contiguous_from_one_stream_and_cover_all_starts():
    replay = Replay(capacity=3 * 50, num_envs=3, seed=1)
    fill(replay, 0, 130)
    assert len(replay) == 150 and replay.total_added == 390
    assert replay.can_sample(50) and not replay.can_sample(51)
    starts = set()
    for _ in range(40):
        batch = replay.sample(64, 10)
        assert batch["count"].shape == (64, 10)
        check_sequences(batch, 130, 50)
        starts.update(batch["count"][:, 0].tolist())
    # every (stream, start) with 10 held rows is drawn: rows 80..120 of each stream
    assert starts == {s * 10_000 + t for s in range(3) for t in range(80, 121)}


def test_is_first_forced_at_sequence_start_and_kept_elsewhere():
    replay = Replay(capacity=64, num_envs=2, seed=0)
    fill(replay, 0, 40, first_every=5)
    before = snapshot(replay)
    batch = replay.sample(32, 6)
    t = batch["count"] % 10_000
    assert batch["is_first"].dtype == np.bool_
    assert np.all(batch["is_first"][:, 0])
    np.testing.assert_array_equal(batch["is_first"][:, 1:], t[:, 1:] % 5 == 0)
    assert not np.all(t[:, 0] % 5 == 0)  # so forcing did something
    # the stored rows are untouched by forcing
    np.testing.assert_array_equal(snapshot(replay)["is_first"], before["is_first"])


def test_fifo_eviction_keeps_the_newest_rows():
    replay = Replay(capacity=20, num_envs=2, seed=0)  # 10 rows per stream
    fill(replay, 0, 1)
    nbytes = replay.nbytes
    assert nbytes == 2 * 10 * (8 + 1 + 4)  # int64 count, bool is_first, float32 reward
    fill(replay, 1, 35)
    assert len(replay) == 20 and replay.total_added == 70 and replay.nbytes == nbytes
    held = snapshot(replay)["count"]
    np.testing.assert_array_equal(held, [np.arange(25, 35), 10_000 + np.arange(25, 35)])
    # a full-window sequence is exactly the 10 newest rows of one stream (wraps the ring)
    batch = replay.sample(8, 10)
    np.testing.assert_array_equal(batch["count"] % 10_000, np.tile(np.arange(25, 35), (8, 1)))


def test_dtypes_and_shapes_kept_exactly():
    n = 2
    replay = Replay(capacity=16, num_envs=n)
    for t in range(6):
        replay.add(
            {
                "image": np.full((n, 8, 8, 3), t, np.uint8),
                "vector": np.full((n, 5), t, np.float32),
                "action": np.full(n, t, np.int64),
                "cont_action": np.zeros((n, 2), np.float32),
                "reward": np.zeros(n, np.float32),
                "is_first": np.zeros(n, bool),
                "is_terminal": np.zeros(n, bool),
                "is_truncated": np.zeros(n, bool),
                "is_last": np.zeros(n, bool),
            }
        )
    batch = replay.sample(3, 4)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (3, 4, 8, 8, 3)
    assert batch["vector"].dtype == np.float32 and batch["vector"].shape == (3, 4, 5)
    assert batch["action"].dtype == np.int64 and batch["action"].shape == (3, 4)
    assert batch["cont_action"].shape == (3, 4, 2)
    assert batch["is_last"].dtype == np.bool_
    np.testing.assert_array_equal(batch["image"][:, :, 0, 0, 0], batch["action"])
    row = 8 * 8 * 3 + 5 * 4 + 8 + 2 * 4 + 4 + 4
    assert replay.nbytes == 16 * row
    assert replay._store["image"].dtype == np.uint8  # never a float copy


def test_add_rejects_bad_rows():
    replay = Replay(capacity=8, num_envs=2)
    with pytest.raises(ValueError, match=r"'x' has shape \(3,\), expected \[2, \.\.\.\]"):
        replay.add({"x": np.zeros(3)})
    replay.add({"x": np.zeros(2, np.uint8)})
    with pytest.raises(ValueError, match="keys"):
        replay.add({"y": np.zeros(2)})
    with pytest.raises(TypeError):  # a float into uint8 storage is not silently truncated
        replay.add({"x": np.full(2, 0.5)})
    with pytest.raises(ValueError, match="cannot sample sequences of 5 rows"):
        replay.sample(1, 5)


@given(
    num_envs=st.integers(1, 4),
    per_stream=st.integers(1, 12),
    steps=st.integers(1, 40),
    seq_len=st.integers(1, 12),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None)
def test_contiguity_property(num_envs, per_stream, steps, seq_len, seed):
    replay = Replay(capacity=num_envs * per_stream + num_envs - 1, num_envs=num_envs, seed=seed)
    fill(replay, 0, steps)
    window = min(steps, per_stream)
    assert len(replay) == window * num_envs
    assert replay.can_sample(seq_len) == (seq_len <= window)
    if replay.can_sample(seq_len):
        check_sequences(replay.sample(16, seq_len), steps, window)


# ------------------------------------------------------------------ persistence


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def npz_files(directory):
    return sorted(p.name for p in directory.glob("*.npz"))


def test_resume_restores_rows_and_sampling(tmp_path):
    kw = dict(capacity=2 * 20, num_envs=2, chunk_size=8, seed=3)
    ref = Replay(**kw)  # uninterrupted, in memory only
    run = Replay(**kw, directory=tmp_path)
    for r in (ref, run):
        fill(r, 0, 45)  # evictions: rows 25..44 held
        for _ in range(3):
            r.sample(4, 5)  # advance the sampler RNG
    state = roundtrip(run.state_dict())  # flushes the 5-row tail of chunk 5
    assert state["rows_per_stream"] == 45 and isinstance(state["rng"]["state"]["state"], int)
    # the run goes on, flushes newer rows and "crashes" before its next checkpoint
    fill(run, 1000, 1030)
    run.flush()
    assert "s0000_c0000000007.npz" in npz_files(tmp_path)

    resumed = Replay(**kw, directory=tmp_path)
    resumed.load_state_dict(state)
    assert len(resumed) == len(ref) and resumed.total_added == ref.total_added
    for key, held in snapshot(ref).items():
        np.testing.assert_array_equal(snapshot(resumed)[key], held)
    # files for rows after the checkpoint are gone; chunks 3..5 hold rows 24..44
    assert npz_files(tmp_path) == [f"s{s:04d}_c{c:010d}.npz" for s in range(2) for c in (3, 4, 5)]
    for _ in range(3):
        a, b = ref.sample(6, 7), resumed.sample(6, 7)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # both go on identically, through another checkpoint and load
    fill(ref, 45, 70)
    fill(resumed, 45, 70)
    again = Replay(**kw, directory=tmp_path)
    again.load_state_dict(roundtrip(resumed.state_dict()))
    for _ in range(3):
        a, b = ref.sample(5, 20), again.sample(5, 20)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_load_into_an_empty_replay_with_images(tmp_path):
    run = Replay(capacity=30, num_envs=3, directory=tmp_path, chunk_size=4)
    for t in range(13):
        run.add({"image": np.full((3, 4, 4, 3), t, np.uint8), "is_first": np.zeros(3, bool)})
    state = roundtrip(run.state_dict())
    loaded = Replay(capacity=30, num_envs=3, directory=tmp_path, chunk_size=4)
    loaded.load_state_dict(state)
    assert loaded._store["image"].dtype == np.uint8
    np.testing.assert_array_equal(loaded._store["image"], run._store["image"])
    assert loaded.nbytes == run.nbytes == 3 * 10 * (48 + 1)


def test_chunk_size_larger_than_a_stream_is_clamped(tmp_path):
    replay = Replay(capacity=12, num_envs=2, directory=tmp_path, chunk_size=100)
    assert replay.chunk_size == 6
    fill(replay, 0, 6)
    assert npz_files(tmp_path) == ["s0000_c0000000000.npz", "s0001_c0000000000.npz"]
    with np.load(tmp_path / "s0001_c0000000000.npz") as data:
        np.testing.assert_array_equal(data["count"], 10_000 + np.arange(6))


def test_missing_and_corrupt_chunks_name_the_file(tmp_path):
    run = Replay(capacity=32, num_envs=2, directory=tmp_path, chunk_size=4)
    fill(run, 0, 10)
    state = run.state_dict()
    bad = tmp_path / "s0001_c0000000001.npz"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # torn write
    with pytest.raises(ReplayError, match=r"s0001_c0000000001\.npz is corrupt"):
        Replay(capacity=32, num_envs=2, directory=tmp_path, chunk_size=4).load_state_dict(state)
    bad.unlink()
    with pytest.raises(ReplayError, match=r"s0001_c0000000001\.npz is missing"):
        Replay(capacity=32, num_envs=2, directory=tmp_path, chunk_size=4).load_state_dict(state)
    bad.write_bytes(good)
    # a tail with fewer rows than the checkpoint counted is refused too
    np.savez(tmp_path / "s0000_c0000000002.npz", **counter_step(8, 1))
    with pytest.raises(ReplayError, match=r"s0000_c0000000002\.npz holds 1 rows"):
        Replay(capacity=32, num_envs=2, directory=tmp_path, chunk_size=4).load_state_dict(state)
    with pytest.raises(ReplayError, match="saved with capacity=32"):
        Replay(capacity=64, num_envs=2, directory=tmp_path, chunk_size=4).load_state_dict(state)


def test_disk_stays_bounded_under_eviction(tmp_path):
    n, per_stream, chunk = 2, 20, 4
    replay = Replay(capacity=n * per_stream, num_envs=n, directory=tmp_path, chunk_size=chunk)
    most = 0
    for t in range(600):
        replay.add(counter_step(t, n))
        most = max(most, len(npz_files(tmp_path)))
    # no checkpoint to protect: only chunks overlapping the 20-row window (at most 6 per stream)
    assert most <= n * (per_stream // chunk + 1)
    assert npz_files(tmp_path)[0] == "s0000_c0000000145.npz"  # rows 580..583, window 580..599
    # with a checkpoint every 50 steps, the last checkpoint's window is kept as well
    for t in range(600, 1200):
        replay.add(counter_step(t, n))
        if t % 50 == 0:
            replay.state_dict()
        most = max(most, len(npz_files(tmp_path)))
    assert most <= n * ((per_stream + 50) // chunk + 2)
    assert not list(tmp_path.glob(".*.tmp"))


def test_online_sequences_are_served_once_oldest_first_then_uniform(tmp_path):
    replay = Replay(capacity=2 * 100, num_envs=2, seed=0, online=5, directory=tmp_path)
    fill(replay, 0, 12)  # online sequences: rows 0..4 and 5..9 of both streams (10, 11 wait)
    batch = replay.sample(3, 5)
    check_sequences(batch, 12, 100)
    # the front of the batch: stream 0 rows 0..4, stream 1 rows 0..4, stream 0 rows 5..9
    assert batch["count"][:, 0].tolist() == [0, 10_000, 5]
    state = roundtrip(replay.state_dict())
    resumed = Replay(capacity=2 * 100, num_envs=2, seed=0, online=5, directory=tmp_path)
    resumed.load_state_dict(state)
    for r in (replay, resumed):
        nxt = r.sample(4, 5)["count"][:, 0].tolist()
        assert nxt[0] == 10_005  # the last pending one; the other 3 are uniform
        fill(r, 12, 15)  # rows 10..14 complete the next online sequence of each stream
        assert r.sample(4, 5)["count"][:, 0].tolist()[:2] == [10, 10_010]
    # another length is never served online; without online the draw is the plain uniform one
    plain = Replay(capacity=2 * 100, num_envs=2, seed=0)
    other = Replay(capacity=2 * 100, num_envs=2, seed=0, online=5)
    fill(plain, 0, 15)
    fill(other, 0, 15)
    np.testing.assert_array_equal(plain.sample(4, 6)["count"], other.sample(4, 6)["count"])


def test_online_sequences_overwritten_before_serving_are_skipped():
    replay = Replay(capacity=20, num_envs=1, seed=0, online=4)
    fill(replay, 0, 30)  # rows 10..29 held: the sequences from 0, 4 and 8 are (partly) gone
    batch = replay.sample(8, 4)
    check_sequences(batch, 30, 20)
    starts = batch["count"][:, 0].tolist()
    assert starts[:4] == [12, 16, 20, 24]  # 28..31 is not complete yet; then 4 uniform draws
