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


def _replay(envs: int = 2) -> Replay:
    return Replay(capacity=envs * 30, num_envs=envs, spec=SPEC, device=torch.device("cpu"))


def test_a_replay_file_is_staged_until_its_checkpoint_commits_it(tmp_path):
    from engine.checkpoint import ReplayFile

    src, file = _replay(), ReplayFile(tmp_path, rank=0)
    fill(src, 9)
    file.stage(src.state_dict(), step=3, env_steps=18)
    assert not file.path.exists() and file.staged.name == "replay.pt.next"
    file.commit()
    assert file.path.is_file() and not file.staged.exists()
    dst = _replay()
    assert file.restore(dst, 3, 18) == (file.path, None)
    assert dst.count == 9 and torch.equal(dst.data["t"], src.data["t"])
    # Rank r's shard has its own file.
    assert ReplayFile(tmp_path, rank=2).path.name == "replay.rank2.pt"


def test_a_replay_file_of_another_checkpoint_is_not_loaded(tmp_path):
    from engine.checkpoint import ReplayFile

    src, file = _replay(), ReplayFile(tmp_path, rank=0)
    fill(src, 4)
    assert file.restore(_replay(), 0, 0)[1] == "no replay.pt beside the checkpoint"
    file.stage(src.state_dict(), step=5, env_steps=40)
    file.commit()
    dst = _replay()
    # During the bootstrap every checkpoint is at update 0: the env steps tell them apart.
    why = file.restore(dst, 5, 48)[1]
    assert why == "replay.pt holds update 5 (env step 40), the checkpoint 5 (48)"
    assert dst.count == 0
    assert (
        file.restore(_replay(envs=3), 5, 40)[1]
        == "replay.pt does not fit this replay (num_envs 2 != 3)"
    )
    file.path.write_bytes(b"not a checkpoint")
    assert file.restore(dst, 5, 40)[1] == "replay.pt unreadable (RuntimeError)"


def test_a_staged_replay_is_committed_only_for_the_checkpoint_just_loaded(tmp_path):
    """A run killed between latest.pt and the replay's rename: its staged replay belongs to the
    checkpoint on disk and is committed; one staged for a checkpoint never written is dropped
    and the committed one of the checkpoint loaded is restored."""
    from engine.checkpoint import ReplayFile

    file = ReplayFile(tmp_path, rank=0)
    old, new = _replay(), _replay()
    fill(old, 3), fill(new, 7)
    file.stage(old.state_dict(), step=10, env_steps=80)
    file.commit()
    file.stage(new.state_dict(), step=20, env_steps=160)
    dst = _replay()
    assert file.restore(dst, 20, 160) == (file.path, None)  # killed after latest.pt
    assert dst.count == 7 and not file.staged.exists()
    file.stage(old.state_dict(), step=30, env_steps=240)  # killed before latest.pt
    dst = _replay()
    assert file.restore(dst, 20, 160) == (file.path, None)
    assert dst.count == 7 and not file.staged.exists()


def test_a_population_member_resumed_alone_restores_its_slice(tmp_path):
    """A member directory resumed as a single run reads its envs of the population's replay."""
    from engine.checkpoint import ReplayFile, save

    pop = tmp_path / "pop"
    save(pop / "checkpoints" / "population.pt", {"config": {"population": {"size": 2}}})
    both = _replay(envs=4)  # 2 members x 2 envs
    fill(both, 6)
    ReplayFile(pop / "checkpoints", 0).stage(both.state_dict(), 4, 24)
    ReplayFile(pop / "checkpoints", 0).commit()
    member = pop / "member_01"
    file, dst = ReplayFile(member / "checkpoints", 0), _replay(envs=2)
    assert file.restore(dst, 4, 24) == (file.path, "no replay.pt beside the checkpoint")
    assert file.restore(dst, 4, 24, member_dir=member) == (pop / "checkpoints" / "replay.pt", None)
    assert torch.equal(dst.data["env"][:6], both.data["env"][:6, 2:])
