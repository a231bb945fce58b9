"""engine.dream: open-loop prediction, the GIF, and the command line on a real tiny run."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import dream
from engine.agent import Agent
from engine.config import load_config
from tests.helpers import run_module, tiny_run

ROOT = Path(__file__).resolve().parent.parent
T, CONTEXT = 12, 5


def tiny_agent(*overrides: str) -> Agent:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "tiny.toml", list(overrides))
    return Agent(cfg, vector_dim=4, num_actions=2)


@pytest.fixture(scope="module")
def agent() -> Agent:
    return tiny_agent()


def episode(seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = {
        "image": torch.randint(0, 256, (T, 64, 64, 3), generator=g, dtype=torch.uint8),
        "vector": torch.randn(T, 4, generator=g),
        "is_first": torch.arange(T) == 0,
        "reward": torch.ones(T),
    }
    return obs, torch.randint(0, 2, (T,), generator=g)


def changed(obs: dict, t: slice | int) -> dict:
    """A copy with observation(s) t replaced by something very different."""
    new = {k: v.clone() for k, v in obs.items()}
    new["image"][t] = 255 - new["image"][t]
    new["vector"][t] = new["vector"][t] * -3 + 2
    return new


def test_shapes_and_dtypes(agent):
    obs, actions = episode()
    pred = dream.open_loop(agent, obs, actions, CONTEXT)
    assert pred.shape == (T, 64, 64, 3) and pred.dtype == torch.uint8
    assert pred.device.type == "cpu"
    assert not pred.requires_grad
    as_numpy = {k: v.numpy() for k, v in obs.items()}
    assert torch.equal(dream.open_loop(agent, as_numpy, actions.numpy(), CONTEXT), pred)


def test_imagined_frames_depend_only_on_the_context(agent):
    obs, actions = episode()
    pred = dream.open_loop(agent, obs, actions, CONTEXT)
    # Later observations are never seen: the whole prediction is unchanged.
    assert torch.equal(dream.open_loop(agent, changed(obs, slice(CONTEXT, None)), actions), pred)
    # An early observation changes the imagined frames, but not the frames filtered before it.
    early = dream.open_loop(agent, changed(obs, 1), actions, CONTEXT)
    assert torch.equal(early[:1], pred[:1])
    assert not torch.equal(early[CONTEXT:], pred[CONTEXT:])
    # The last context frame still counts.
    last = dream.open_loop(agent, changed(obs, CONTEXT - 1), actions, CONTEXT)
    assert torch.equal(last[: CONTEXT - 1], pred[: CONTEXT - 1])
    assert not torch.equal(last[CONTEXT:], pred[CONTEXT:])


def test_actions_lead_to_the_next_frame(agent):
    """action[t] is taken at step t, so it first shows in frame t + 1."""
    obs, actions = episode()
    pred = dream.open_loop(agent, obs, actions, CONTEXT)
    flipped = actions.clone()
    flipped[CONTEXT + 2] = 1 - flipped[CONTEXT + 2]
    other = dream.open_loop(agent, obs, flipped, CONTEXT)
    assert torch.equal(other[: CONTEXT + 3], pred[: CONTEXT + 3])
    assert not torch.equal(other[CONTEXT + 3 :], pred[CONTEXT + 3 :])
    flipped = actions.clone()
    flipped[-1] = 1 - flipped[-1]  # taken after the last frame: no effect
    assert torch.equal(dream.open_loop(agent, obs, flipped, CONTEXT), pred)


def test_deterministic_and_leaves_the_rng_alone(agent):
    obs, actions = episode()
    state = torch.get_rng_state()
    a = dream.open_loop(agent, obs, actions, CONTEXT)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(dream.open_loop(agent, obs, actions, CONTEXT), a)


def test_context_edge_cases(agent):
    obs, actions = episode()
    whole = dream.open_loop(agent, obs, actions, context=T + 10)  # all posterior
    assert whole.shape == (T, 64, 64, 3)
    # The context frames are the same posterior in both; only float rounding differs (the frames
    # are encoded in one batch of T or of CONTEXT rows, 1e-7 apart in the tokens), which can tip
    # a pixel's rounding to uint8 by one level.
    part = dream.open_loop(agent, obs, actions, CONTEXT)[:CONTEXT]
    assert (whole[:CONTEXT].int() - part.int()).abs().max() <= 1
    assert (whole[:CONTEXT] != part).float().mean() < 1e-3
    one = {k: v[:1] for k, v in obs.items()}
    assert dream.open_loop(agent, one, actions[:1], 1).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="context >= 1"):
        dream.open_loop(agent, obs, actions, 0)
    with pytest.raises(ValueError, match="T=12 frames"):
        dream.open_loop(agent, {**obs, "image": obs["image"][:3]}, actions)
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        dream.open_loop(agent, obs, actions[:, None])


def test_without_an_image_decoder_is_a_clear_error():
    agent = tiny_agent("env.image=false")
    obs, actions = episode()
    with pytest.raises(ValueError, match="image decoder"):
        dream.open_loop(agent, obs, actions)


# torch.compile imports inductor, which uses the deprecated torch.jit.script_method itself.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_compiled_step_functions_are_bypassed(agent):
    """A compiled wrapper (set by fast.compile_agent) would recompile for a batch of one."""
    obs, actions = episode()
    pred = dream.open_loop(agent, obs, actions, CONTEXT)
    assert hasattr(torch.compile(agent.wm.img_step), "_torchdynamo_orig_callable")
    wm = agent.wm

    def fake_compiled(original):
        def compiled(*args, **kwargs):
            raise AssertionError("called the compiled wrapper")

        compiled._torchdynamo_orig_callable = original
        return compiled

    try:
        for name in ("encode", "obs_step", "img_step"):
            setattr(wm, name, fake_compiled(getattr(wm, name)))
        assert torch.equal(dream.open_loop(agent, obs, actions, CONTEXT), pred)
    finally:
        for name in ("encode", "obs_step", "img_step"):
            wm.__dict__.pop(name, None)


# ---- The GIF ---------------------------------------------------------------------------------


def gif_frames(path: Path) -> list[np.ndarray]:
    im = Image.open(path)
    out = []
    for k in range(im.n_frames):
        im.seek(k)
        out.append(np.asarray(im.convert("RGB")).astype(int))
    return out


def test_gif_layout_and_markers(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    pred = truth.copy()
    pred[:, 10:20, 10:20] ^= 8  # a small error, visible only amplified
    path = tmp_path / "d.gif"
    dream.write_gif(path, truth, pred, scale=2, fps=5, context=3)
    im = Image.open(path)
    assert im.n_frames == 7
    assert im.info["duration"] == 200
    top = dream.MARK_HEIGHT + dream.HEADER_HEIGHT
    assert im.size == (3 * 64 * 2 + 2 * dream.SEPARATOR, top + 64 * 2)
    frames = gif_frames(path)
    for k, f in enumerate(frames):
        want = dream.IMAGINED_COLOR if k >= 3 else dream.OBSERVED_COLOR
        assert np.abs(f[1, 5] - want).max() <= 8, k
        assert np.abs(f[top + 5, 128] - dream.SEPARATOR_COLOR).max() <= 8  # separator column
        err = f[top:, 2 * (128 + dream.SEPARATOR) :]
        assert err[:20].max() <= 8  # no error: black
        assert err[22:38, 22:38].max() >= 48  # |error| 8 x gain 4 shows red
    assert not [p for p in tmp_path.iterdir() if p.name != "d.gif"]  # no temp file left


def test_gif_keeps_identical_frames(tmp_path):
    """Pillow merges identical consecutive GIF frames; the step label keeps T frames."""
    still = np.full((5, 64, 64, 3), 255, np.uint8)
    dream.write_gif(tmp_path / "still.gif", still, still, scale=1, context=5)
    assert Image.open(tmp_path / "still.gif").n_frames == 5


def test_gif_rejects_bad_input(tmp_path):
    a = np.zeros((4, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        dream.write_gif(tmp_path / "x.gif", a, a[:3])
    with pytest.raises(ValueError, match="uint8"):
        dream.write_gif(tmp_path / "x.gif", a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        dream.write_gif(tmp_path / "x.gif", a[..., 0], a[..., 0])
    with pytest.raises(ValueError, match="fps"):
        dream.write_gif(tmp_path / "x.gif", a, a, fps=0)
    assert not list(tmp_path.iterdir())


# ---- The command line ------------------------------------------------------------------------


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_module(module, *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("dream") / "tiny")


@pytest.mark.slow
def test_cli_writes_the_gif(run_dir):
    done = cli("engine.dream", str(run_dir), "--steps", "30")
    assert done.returncode == 0, done.stderr
    m = re.search(r"wrote (\S+): (\d+) frames \(5 observed, (\d+) imagined\)", done.stdout)
    assert m, done.stdout
    path, frames = Path(m.group(1)), int(m.group(2))
    assert path.parent == run_dir / "dreams" and re.fullmatch(r"dream_\d+\.gif", path.name)
    assert 6 <= frames <= 30 and int(m.group(3)) == frames - 5
    assert Image.open(path).n_frames == frames
    # The same command plays the same episode.
    again = cli("engine.dream", str(run_dir), "--steps", "30", "--out", str(run_dir / "b.gif"))
    assert again.returncode == 0, again.stderr
    assert f"{frames} frames" in again.stdout
    assert Image.open(run_dir / "b.gif").n_frames == frames


@pytest.mark.slow
def test_cli_short_episode_exits_1(run_dir):
    done = cli("engine.dream", str(run_dir), "--steps", "600", "--context", "500")
    assert done.returncode == 1
    assert done.stderr.startswith("error: the episode ended after ")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "3"], "--steps (3) must exceed --context (5)"),
        (["--context", "0"], "--context must be >= 1"),
        (["--checkpoint", "best", "--scale", "0"], "--scale and --fps must be >= 1"),
    ],
)
def test_cli_bad_arguments(run_dir, args, message):
    done = cli("engine.dream", str(run_dir), *args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {message}")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_cli_bad_run_dirs(tmp_path):
    done = cli("engine.dream", str(tmp_path / "nope"))
    assert done.returncode == 2 and done.stderr.strip().endswith("no such run directory")
    (tmp_path / "empty").mkdir()
    done = cli("engine.dream", str(tmp_path / "empty"))
    assert done.returncode == 2 and "no best.pt or latest.pt" in done.stderr
    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "latest.pt").write_bytes(b"not a checkpoint")
    done = cli("engine.dream", str(tmp_path / "bad"))
    assert done.returncode == 2 and "cannot read the checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
