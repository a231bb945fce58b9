"""Open-loop dream videos: how far the world model's imagination stays true to the real episode.

The first `context` frames are filtered with the posterior (they see the observations); from
there on the model imagines with the prior alone, fed only the actions that were really taken.
The GIF shows truth | prediction | error side by side, with a red top bar on imagined frames.

`python -m engine.dream RUN_DIR [--steps 50] [--context 5] [--out FILE]`
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from engine import dists
from engine.checkpoint import atomic_write

if TYPE_CHECKING:
    from engine.agent import Agent

DREAM_SEED = 0
"""Latent samples in open_loop come from this fixed seed in a forked RNG: the same model and
episode give the same video, and the training RNG stream is left untouched (a run with dreams
at evaluation stays identical to one without)."""
ERROR_GAIN = 4
"""The error panel shows |truth - prediction| x this gain, so errors of a few levels show."""
DECODE_CHUNK = 64
"""Frames decoded per call: bounds decoder activation memory for long episodes at d256."""
SEPARATOR = 2
"""Grey columns between the three panels (pixels, not scaled)."""
MARK_HEIGHT = 3
HEADER_HEIGHT = 12
OBSERVED_COLOR = (40, 170, 60)
IMAGINED_COLOR = (220, 40, 40)
SEPARATOR_COLOR = (128, 128, 128)
HEADER_BG = (24, 24, 24)


class DreamError(Exception):
    """A dream that cannot be made (missing Pillow, bad run directory): one-line message."""


# --------------------------------------------------------------------------------------------
# Open-loop prediction.


def _eager(fn: Callable) -> Callable:
    """The uncompiled function behind a torch.compile wrapper: a batch of one would otherwise
    trigger a recompile (minutes on a CPU) of the training graphs' step functions."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


@contextlib.contextmanager
def _fixed_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seeded sampling inside, the caller's CPU and device RNG states restored after."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def open_loop(agent: Agent, obs: dict[str, Tensor], actions: Tensor, context: int = 5) -> Tensor:
    """Predicted frames (T, H, W, 3) uint8 on the CPU for ONE episode.

    obs: the episode's observations with a leading time dim T ("image" (T, H, W, 3) uint8,
    "vector" (T, D), optional "is_first" (T,)), actions (T,) long, action[t] taken at step t.
    Frames 0..context-1 are posterior reconstructions; frames context..T-1 are imagined from the
    prior with the real actions, so they depend on no observation after context-1.
    """
    wm = agent.wm
    obs = {k: torch.as_tensor(v) for k, v in obs.items()}  # numpy arrays from an env work too
    actions = torch.as_tensor(actions)
    if not wm.use_image:
        raise ValueError("open_loop needs a world model with an image decoder (env.image = true)")
    if actions.dim() != 1:
        raise ValueError(f"actions must have shape (T,), got {tuple(actions.shape)}")
    T = actions.shape[0]
    if T < 1 or context < 1:
        raise ValueError(f"need T >= 1 and context >= 1, got T={T}, context={context}")
    if "image" not in obs or obs["image"].shape[0] != T:
        shape = tuple(obs["image"].shape) if "image" in obs else None
        raise ValueError(f"obs['image'] must have T={T} frames, got {shape}")
    if wm.use_vector and ("vector" not in obs or obs["vector"].shape[0] != T):
        raise ValueError(f"obs['vector'] must have T={T} rows (the model uses the state vector)")
    context = min(context, T)
    device = next(wm.parameters()).device
    keys = ["image"] + (["vector"] if wm.use_vector else [])
    seen = {k: obs[k][:context].to(device) for k in keys}
    is_first = obs.get("is_first")
    if is_first is None:
        is_first = torch.zeros(context, dtype=torch.bool)
    is_first = is_first[:context].to(device=device, dtype=torch.bool).clone()
    is_first[0] = True  # the filter starts from a zero state, as in training
    act = dists.onehot(actions.to(device).long(), wm.num_actions)  # (T, A)
    encode, obs_step, img_step = _eager(wm.encode), _eager(wm.obs_step), _eager(wm.img_step)

    deters, stochs = [], []
    with _fixed_rng(device, DREAM_SEED):
        tokens = encode(seen)  # (context, E)
        deter, stoch = wm.initial(1, device)
        prev = torch.zeros_like(act[:1])
        for t in range(context):
            deter, stoch, _ = obs_step(deter, stoch, prev, tokens[t : t + 1], is_first[t : t + 1])
            prev = act[t : t + 1]
            deters.append(deter)
            stochs.append(stoch)
        for t in range(context, T):
            deter, stoch = img_step(deter, stoch, act[t - 1 : t])
            deters.append(deter)
            stochs.append(stoch)
    deter, stoch = torch.cat(deters).float(), torch.cat(stochs).float().flatten(1)
    frames = []
    for i in range(0, T, DECODE_CHUNK):
        x = wm.image_decoder(deter[i : i + DECODE_CHUNK], stoch[i : i + DECODE_CHUNK]).float()
        x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        frames.append(x.permute(0, 2, 3, 1).cpu())
    return torch.cat(frames)


# --------------------------------------------------------------------------------------------
# The GIF.


def _frames(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] < 1:
        raise ValueError(f"{name} must be frames of shape (T, H, W, 3), got {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {a.dtype}")
    return a


def _hot(v: np.ndarray) -> np.ndarray:
    """[0, 1] -> black, red, yellow: a zero error stays black, small ones turn red, saturated
    ones yellow (not white, which would read as the white CartPole background)."""
    rgb = np.stack([2 * v, 2 * v - 1, np.zeros_like(v)], -1)
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def compose_frames(
    truth: np.ndarray, pred: np.ndarray, scale: int = 2, context: int = 5
) -> np.ndarray:
    """(T, height, width, 3) uint8 canvases: a marker bar (green observed, red imagined), a
    label row, then truth | prediction | error, each `scale` x enlarged, grey separators."""
    from PIL import Image, ImageDraw, ImageFont

    truth, pred = _frames(truth, "truth"), _frames(pred, "pred")
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} differ in shape")
    if scale < 1 or context < 0:
        raise ValueError(f"need scale >= 1 and context >= 0, got {scale}, {context}")
    T, H, W, _ = truth.shape
    err = np.abs(truth.astype(np.int16) - pred.astype(np.int16)).max(-1)
    heat = _hot(np.clip(err * (ERROR_GAIN / 255.0), 0.0, 1.0))
    panels = [np.repeat(np.repeat(p, scale, 1), scale, 2) for p in (truth, pred, heat)]
    ph, pw = H * scale, W * scale
    top = MARK_HEIGHT + HEADER_HEIGHT
    width = 3 * pw + 2 * SEPARATOR
    canvas = np.empty((T, top + ph, width, 3), np.uint8)
    canvas[:] = SEPARATOR_COLOR
    canvas[:, MARK_HEIGHT:top] = HEADER_BG
    for i, panel in enumerate(panels):
        x0 = i * (pw + SEPARATOR)
        canvas[:, top:, x0 : x0 + pw] = panel
    font = ImageFont.load_default()
    out = np.empty_like(canvas)
    for t in range(T):
        imagined = t >= context
        color = IMAGINED_COLOR if imagined else OBSERVED_COLOR
        canvas[t, :MARK_HEIGHT] = color
        img = Image.fromarray(canvas[t])
        draw = ImageDraw.Draw(img)
        # The step number also keeps every frame distinct: Pillow merges identical GIF frames.
        labels = (
            (f"truth {t}", (230, 230, 230)),
            ("imagined" if imagined else "observed", color),
            (f"error x{ERROR_GAIN}", (230, 230, 230)),
        )
        for i, (text, fill) in enumerate(labels):
            draw.text((i * (pw + SEPARATOR) + 2, MARK_HEIGHT), text, fill=fill, font=font)
        out[t] = np.asarray(img)
    return out


def write_gif(
    path: str | Path,
    truth: np.ndarray,
    pred: np.ndarray,
    scale: int = 2,
    fps: int = 10,
    context: int = 5,
) -> None:
    """Write truth | prediction | error as a looping GIF (atomically); frames from `context`
    on are marked as imagined."""
    try:
        from PIL import Image
    except ImportError:
        raise DreamError("engine.dream needs Pillow: pip install Pillow") from None
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    canvas = compose_frames(truth, pred, scale, context)
    images = [Image.fromarray(c) for c in canvas]
    path = Path(path)

    def save(tmp: Path) -> None:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(20, round(1000 / fps)),
            loop=0,
        )

    atomic_write(path, save)


# --------------------------------------------------------------------------------------------
# Command line.


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def play_episode(
    agent: Agent, env: Any, steps: int, device: torch.device
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One greedy episode in a single env, cut at `steps` observations: obs (T, ...) and the
    action taken at each (the last observation's action is never executed)."""
    obs = env.reset()
    carry = agent.initial_carry(1, device)
    seen, actions = [], []
    for _ in range(steps):
        o = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in obs.items()}
        action, carry = agent.policy(o, carry, greedy=True)
        seen.append(obs)
        actions.append(int(action[0]))
        if obs["is_last"][0]:
            break
        obs = env.step(action.cpu().numpy())
    stacked = {k: np.concatenate([o[k] for o in seen]) for k in seen[0]}
    return stacked, np.array(actions, dtype=np.int64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.dream",
        description="Open-loop dream GIF (truth | prediction | error) from a run's checkpoint.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--steps", type=int, default=50, help="episode frames at most (default 50)")
    p.add_argument(
        "--context", type=int, default=5, help="observed frames before imagining (default 5)"
    )
    p.add_argument(
        "--out",
        help="GIF path (default RUN_DIR/dreams/dream_<step>.gif; the trainer's own videos "
        "are dream_<7-digit step>.gif, so they are never overwritten)",
    )
    p.add_argument(
        "--checkpoint",
        choices=["best", "latest"],
        help="which checkpoint (default best.pt, else latest.pt)",
    )
    p.add_argument("--scale", type=int, default=2, help="pixel enlargement (default 2)")
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--seed", type=int, help="episode seed (default general.seed + 20000)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="overrides general.device")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.context < 1:
        fail(f"--context must be >= 1, got {args.context}")
    if args.steps <= args.context:
        fail(f"--steps ({args.steps}) must exceed --context ({args.context}): nothing to imagine")
    if args.scale < 1 or args.fps < 1:
        fail(f"--scale and --fps must be >= 1, got {args.scale}, {args.fps}")
    from engine.rundir import RunError, load_run

    run_dir = Path(args.run_dir)
    try:
        run = load_run(run_dir, args.checkpoint, args.device, 1, args.seed, 20_000)
    except RunError as err:
        fail(str(err))
    cfg, agent, path = run.cfg, run.agent, run.path
    try:
        if not cfg.env.image:
            fail(f"{run_dir}: the run has env.image = false: there are no frames to dream")
        torch.manual_seed(run.seed)  # the policy's latent samples: same command, same episode
        obs, actions = play_episode(agent, run.env, args.steps, run.device)
    finally:
        run.env.close()
    T = len(actions)
    if T < args.context + 1:
        fail(
            f"the episode ended after {T} frames, fewer than --context + 1 = {args.context + 1}: "
            "nothing to imagine; lower --context",
            code=1,
        )
    tensors = {k: torch.from_numpy(v) for k, v in obs.items()}
    pred = open_loop(agent, tensors, torch.from_numpy(actions), args.context).numpy()
    step = run.step
    out = Path(args.out) if args.out else run_dir / "dreams" / f"dream_{step}.gif"
    try:
        write_gif(out, obs["image"], pred, args.scale, args.fps, context=args.context)
    except DreamError as err:
        fail(str(err))
    except OSError as err:
        fail(f"{out}: {err.strerror or err}")
    mse = ((obs["image"].astype(np.float32) - pred.astype(np.float32)) / 255.0) ** 2
    obs_mse = float(mse[: args.context].mean())
    img_mse = float(mse[args.context :].mean()) if T > args.context else math.nan
    print(
        f"wrote {out}: {T} frames ({args.context} observed, {T - args.context} imagined) from "
        f"{path.name} at step {step}; image MSE per pixel observed {obs_mse:.5f}, "
        f"imagined {img_mse:.5f}"
    )


if __name__ == "__main__":
    main()
