import re

import pytest
import torch

from engine.replay import Replay

SPEC = {
    "t": ((), torch.int64),
    "env": ((), torch.int64),
    "is_first": ((), torch.bool),
    "image": ((4, 4, 3), torch.uint8),
}


def fill(replay: Replay, steps: int, episode_len: int = 7) -> None:
    n = replay.num_envs
    for t in range(steps):
        replay.add(
            {
                "t": torch.full((n,), t),
                "env": torch.arange(n),
                "is_first": torch.full((n,), t % episode_len == 0),
                "image": torch.full((n, 4, 4, 3), t % 256, dtype=torch.uint8),
            }
        )


def test_sequences_are_consecutive_steps_of_one_env():
    replay = Replay(capacity=3 * 50, num_envs=3, spec=SPEC, device=torch.device("cpu"))
    fill(replay, 40)
    torch.manual_seed(0)
    b = replay.sample(64, 10)
    assert b["t"].shape == (64, 10) and b["image"].shape == (64, 10, 4, 4, 3)
    assert b["image"].dtype == torch.uint8
    assert (b["t"][:, 1:] - b["t"][:, :-1] == 1).all()
    assert (b["env"] == b["env"][:, :1]).all()
    assert (b["image"][..., 0, 0, 0].long() == b["t"] % 256).all()


def test_sequences_cross_episode_boundaries_with_is_first_inside():
    replay = Replay(capacity=2 * 100, num_envs=2, spec=SPEC, device=torch.device("cpu"))
    fill(replay, 100, episode_len=7)
    torch.manual_seed(0)
    b = replay.sample(256, 16)
    inside = b["is_first"][:, 1:]
    assert inside.any(), "16-step windows over 7-step episodes must contain episode starts"
    torch.testing.assert_close(b["is_first"], b["t"] % 7 == 0)


def test_wrap_around_never_crosses_the_write_head():
    slots, length = 30, 8
    replay = Replay(capacity=2 * slots, num_envs=2, spec=SPEC, device=torch.device("cpu"))
    fill(replay, 95)  # wrapped three times; the newest 30 steps (65..94) are held
    assert len(replay) == 2 * slots
    torch.manual_seed(0)
    b = replay.sample(4000, length)
    assert (b["t"][:, 1:] - b["t"][:, :-1] == 1).all()  # consecutive: no jump at the head
    assert b["t"].min() == 95 - slots and b["t"].max() == 94
    # Uniform over the 23 valid starts 65..87: every start appears, none is starved.
    counts = torch.bincount(b["t"][:, 0] - 65, minlength=slots - length + 1)
    assert len(counts) == slots - length + 1 and counts.min() > 4000 / 23 * 0.6


def test_partially_filled_buffer_samples_only_written_steps():
    replay = Replay(capacity=100, num_envs=1, spec=SPEC, device=torch.device("cpu"))
    fill(replay, 12)
    assert replay.can_sample(12) and not replay.can_sample(13)
    torch.manual_seed(0)
    b = replay.sample(500, 5)
    assert b["t"].min() == 0 and b["t"].max() == 11


def test_sampling_does_not_sync_with_the_host(monkeypatch):
    replay = Replay(capacity=64, num_envs=2, spec=SPEC, device=torch.device("cpu"))
    fill(replay, 40)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in replay sampling")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    replay.sample(8, 5)


def _samples(replay: Replay) -> dict:
    return replay.sample(64, 6, generator=torch.Generator().manual_seed(3))


def test_a_saved_replay_loads_back_the_same_rows_and_write_head(tmp_path):
    for steps in (23, 95):  # partly filled; wrapped (the head is mid-buffer)
        src = Replay(capacity=2 * 30, num_envs=2, spec=SPEC, device=torch.device("cpu"))
        fill(src, steps)
        torch.save(src.state_dict(), tmp_path / "r.pt")
        dst = Replay(capacity=2 * 30, num_envs=2, spec=SPEC, device=torch.device("cpu"))
        dst.load_state_dict(torch.load(tmp_path / "r.pt", mmap=True, weights_only=True))
        assert dst.count == steps and len(dst) == len(src)
        for k, v in _samples(src).items():
            assert torch.equal(_samples(dst)[k], v), k
        # Writing goes on where it stopped: the next step lands in the same row in both.
        fill(src, 1), fill(dst, 1)
        for k in SPEC:
            assert torch.equal(src.data[k], dst.data[k]), k


def test_a_partly_filled_replay_saves_only_its_rows(tmp_path):
    big = Replay(capacity=4000, num_envs=1, spec=SPEC, device=torch.device("cpu"))
    fill(big, 10)
    torch.save(big.state_dict(), tmp_path / "r.pt")
    # 10 rows of 64 bytes, not the 4000 preallocated rows (~260 kB).
    assert (tmp_path / "r.pt").stat().st_size < 20_000
    # ... and without copying them: a copy of a nearly full replay beside the replay itself
    # does not fit in memory (a 12 GB LunarLander population on 24 GB was killed for it).
    for k, v in big.state_dict()["data"].items():
        assert v.shape[0] == 10 and v.data_ptr() == big.data[k].data_ptr(), k
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k


def test_a_replay_of_another_size_or_layout_is_refused():
    src = Replay(capacity=60, num_envs=2, spec=SPEC, device=torch.device("cpu"))
    fill(src, 5)
    state = src.state_dict()
    for capacity, envs, spec, words in (
        (120, 2, SPEC, "slots 30 != 60"),
        (60, 3, SPEC, "slots 30 != 20"),
        (60, 2, {**SPEC, "image": ((8, 8, 3), torch.uint8)}, "image: (5, 2, 4, 4, 3)"),
        (60, 2, {k: v for k, v in SPEC.items() if k != "image"}, "fields"),
    ):
        dst = Replay(capacity=capacity, num_envs=envs, spec=spec, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=re.escape(words)):
            dst.load_state_dict(state)
        assert dst.count == 0
