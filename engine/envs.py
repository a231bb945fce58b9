"""Batched CartPole / LunarLander environments with DreamerV3 "embodied" step semantics.

Every call returns a dict of arrays over all N environments. An episode's first observation has
is_first=True and reward 0; once an observation has is_last=True, the next `step` returns the first
observation of that environment's new episode and ignores the action given for it. Both backends
(envpool and gymnasium's vector envs with NEXT_STEP autoreset) behave this way natively.

With the gymnasium backend, `processes=True` steps each environment in its own worker process
(gymnasium's AsyncVectorEnv; frames are rendered and shrunk inside the workers, so only 64x64
images cross the pipes): for machines with cores to spare, such as the GPU machine where envpool
is not installed. The same seed gives the same observations either way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import warnings

import numpy as np

TASKS = ("CartPole-v1", "LunarLander-v3")
BACKENDS = ("envpool", "gymnasium")

_NUM_ACTIONS = {"CartPole-v1": 2, "LunarLander-v3": 4}
_VECTOR_DIM = {"CartPole-v1": 4, "LunarLander-v3": 8}
_LUNAR_FRAME_HEIGHT = 400  # gymnasium renders LunarLander at 400 x 600; frames are only shrunk


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a SLURM
    allocation), not the machine's count; under torchrun, this rank's share of them (the ranks
    on one host, LOCAL_WORLD_SIZE, share its cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    return max(1, cores // local_ranks())


def local_ranks() -> int:
    """Processes torchrun started on this host (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


class EnvError(Exception):
    """A setup problem, with a one-line message meant for a human."""


def make_env(
    task: str,
    backend: str,
    num_envs: int,
    seed: int,
    image_size: int | None = 64,
    use_vector: bool = True,
    max_episode_steps: int | None = None,
    processes: bool = False,
) -> VecEnv:
    """Build `num_envs` copies of `task` on `backend`.

    `max_episode_steps` overrides the task's time limit (500 for CartPole, 1000 for LunarLander).
    `processes` (gymnasium only) runs one worker process per environment.
    """
    if task not in TASKS:
        raise EnvError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if backend not in BACKENDS:
        raise EnvError(f"unknown env backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if num_envs < 1:
        raise EnvError(f"num_envs must be at least 1, got {num_envs}")
    if image_size is not None and image_size < 1:
        raise EnvError(f"image_size must be positive or None, got {image_size}")
    if processes and backend != "gymnasium":
        raise EnvError(
            "env.processes needs the gymnasium backend (envpool steps its envs on its own threads)"
        )
    if backend == "envpool":
        return EnvpoolVecEnv(task, num_envs, seed, image_size, use_vector, max_episode_steps)
    return GymnasiumVecEnv(
        task, num_envs, seed, image_size, use_vector, max_episode_steps, processes
    )


class VecEnv:
    """Backend-independent bookkeeping; subclasses provide _reset, _step and _render_native."""

    def __init__(self, task: str, num_envs: int, image_size: int | None, use_vector: bool):
        self.task = task
        self.num_envs = num_envs
        self.num_actions = _NUM_ACTIONS[task]
        self.vector_dim = _VECTOR_DIM[task]
        self.image_size = image_size
        self.use_vector = use_vector
        # Both backends' CartPole renders draw the cart at a fixed pixel height meant for 600x400
        # (envpool's 64x64 frames are all white), so CartPole is drawn from the state instead.
        draw = task == "CartPole-v1" and image_size is not None
        self._cartpole = CartPoleRenderer(image_size) if draw else None
        self._is_last: np.ndarray | None = None  # per env: did the last returned obs end an episode
        self.stepping = "gymnasium in this process"  # how the envs are stepped (the run says it)

    def reset(self) -> dict[str, np.ndarray]:
        state = self._reset()
        n = self.num_envs
        self._is_last = np.zeros(n, bool)
        reward, is_first = np.zeros(n, np.float32), np.ones(n, bool)
        return self._obs(state, reward, is_first, np.zeros(n, bool), np.zeros(n, bool))

    def step(self, action: np.ndarray) -> dict[str, np.ndarray]:
        if self._is_last is None:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        state, reward, terminated, truncated = self._step(action)
        is_first = self._is_last
        terminated = np.asarray(terminated, bool)
        self._is_last = terminated | np.asarray(truncated, bool)
        reward = np.where(is_first, 0.0, reward).astype(np.float32)
        # is_last is copied because we keep it and callers may edit what we return.
        return self._obs(state, reward, is_first, self._is_last.copy(), terminated)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_action(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action)
        if action.shape != (self.num_envs,) or not np.issubdtype(action.dtype, np.integer):
            raise ValueError(
                f"actions must be integers of shape ({self.num_envs},), got {action!r}"
            )
        if action.min() < 0 or action.max() >= self.num_actions:
            raise ValueError(f"actions must lie in [0, {self.num_actions}), got {action}")
        return action

    def _obs(self, state, reward, is_first, is_last, is_terminal) -> dict[str, np.ndarray]:
        obs = {
            "reward": reward,
            "is_first": is_first,
            "is_last": is_last,
            "is_terminal": is_terminal,
        }
        if self.use_vector:
            obs["vector"] = np.asarray(state, np.float32)
        if self.image_size is not None:
            obs["image"] = self._image(state)
        return obs

    def _image(self, state: np.ndarray) -> np.ndarray:
        if self._cartpole is not None:
            return self._cartpole(state)
        return self._render_native()


class EnvpoolVecEnv(VecEnv):
    def __init__(self, task, num_envs, seed, image_size, use_vector, max_episode_steps):
        super().__init__(task, num_envs, image_size, use_vector)
        try:
            import envpool
        except ImportError as e:
            raise EnvError("env backend 'envpool' is not installed: pip install envpool") from e
        kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
        if image_size is not None and task != "CartPole-v1":
            kwargs.update(
                render_mode="rgb_array", render_width=image_size, render_height=image_size
            )
        # One stepping thread per available core at most (envpool's default is one per env:
        # 16 threads on a 2-core machine, competing with the learner's).
        kwargs["num_threads"] = min(num_envs, available_cores())
        self._env = envpool.make_gymnasium(task, num_envs=num_envs, seed=seed, **kwargs)
        self.stepping = f"envpool {kwargs['num_threads']} threads"
        with warnings.catch_warnings():
            # envpool gives float32 spaces float64 bounds, which gymnasium warns about when the
            # space is built; it is built lazily on first use and then cached, so build it now.
            warnings.filterwarnings("ignore", message=".*precision lowered by casting")
            _ = self._env.observation_space
        self._ids = np.arange(num_envs)

    def _reset(self) -> np.ndarray:
        obs, _ = self._env.reset()
        return obs

    def _step(self, action):
        obs, reward, terminated, truncated, info = self._env.step(action.astype(np.int32))
        # Our is_first (previous is_last) must agree with envpool's own auto-reset, and rows must be
        # in env-id order (true in sync mode), else images and bookkeeping would go to wrong envs.
        if not (
            np.array_equal(info["elapsed_step"] == 0, self._is_last)
            and np.array_equal(info["env_id"], self._ids)
        ):
            raise RuntimeError("envpool's auto-reset or env order disagrees with is_last tracking")
        return obs, reward, terminated, truncated

    def _render_native(self) -> np.ndarray:
        return self._env.render(env_ids=self._ids)


class GymnasiumVecEnv(VecEnv):
    def __init__(
        self, task, num_envs, seed, image_size, use_vector, max_episode_steps, processes=False
    ):
        super().__init__(task, num_envs, image_size, use_vector)
        try:
            import gymnasium as gym
        except ImportError as e:
            raise EnvError("env backend 'gymnasium' is not installed: pip install gymnasium") from e
        native_render = image_size is not None and task != "CartPole-v1"
        if native_render and importlib.util.find_spec("pygame") is None:
            raise EnvError(
                f"rendering {task} with gymnasium needs pygame: pip install 'gymnasium[box2d]'"
            )
        if native_render and image_size > _LUNAR_FRAME_HEIGHT:
            raise EnvError(f"image_size for {task} with gymnasium is at most {_LUNAR_FRAME_HEIGHT}")
        kwargs = {"render_mode": "rgb_array"} if native_render else {}
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        make = functools.partial(_make_small_render_env, task, kwargs, processes)
        if processes:
            self.stepping = f"gymnasium, {num_envs} worker processes"
        try:
            if processes:
                # spawn, not fork: the parent holds torch's and envpool's threads.
                self._env = gym.vector.AsyncVectorEnv(
                    [make] * num_envs,
                    context="spawn",
                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
                )
            else:
                # In-process by default: workers would compete with the learner for few cores.
                self._env = gym.vector.SyncVectorEnv(
                    [make] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP
                )
        except gym.error.DependencyNotInstalled as e:
            raise EnvError(f"{task} needs Box2D: pip install 'gymnasium[box2d]'") from e
        self._seed = seed

    def _reset(self) -> np.ndarray:
        # Sub-env i gets seed + i; later resets continue each env's RNG stream, as envpool's do.
        obs, _ = self._env.reset(seed=self._seed)
        self._seed = None
        return obs

    def _step(self, action):
        obs, reward, terminated, truncated, _ = self._env.step(action.astype(np.int64))
        return obs, reward, terminated, truncated

    def _render_native(self) -> np.ndarray:
        return np.stack(self._env.call("render_small", self.image_size))

    def close(self) -> None:
        try:
            self._env.close()
        except (BrokenPipeError, EOFError, ConnectionResetError):
            # The worker processes are already gone: a signal to the whole process group (GNU
            # timeout, Ctrl-C in a shell) ends them too, and gymnasium's close then writes to a
            # dead pipe. End what is left, without another traceback over the run's own exit.
            for proc in self._env.processes:
                if proc.is_alive():
                    proc.terminate()
                proc.join()
            self._env.closed = True


def _make_small_render_env(task: str, kwargs: dict, in_worker: bool):
    """One gymnasium env whose `render_small(S)` gives its frame shrunk to S x S: in a worker
    process that happens there, so only small frames cross the pipe. LunarLander renders
    400x600; the whole frame is squashed to S x S (as envpool does) rather than cropped, because
    the lander may fly anywhere across the full width. A worker leaves Ctrl-C to the parent,
    which stops the workers through close()."""
    import gymnasium as gym

    class SmallRender(gym.Wrapper):
        def render_small(self, size: int) -> np.ndarray:
            return _box_resize(self.env.render(), size)

    if in_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return SmallRender(gym.make(task, **kwargs))


def _box_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Shrink an (H, W, 3) uint8 frame to (size, size, 3) by averaging blocks of
    (H // size) x (W // size) pixels, after evenly dropping the H % size rows and W % size
    columns that do not fit (3x faster than exact area weights via np.add.reduceat, measured)."""
    h, w = frame.shape[:2]
    bh, bw = h // size, w // size
    rows = np.arange(size * bh) * h // (size * bh)
    cols = np.arange(size * bw) * w // (size * bw)
    sums = frame[rows].reshape(size, bh, w * 3).sum(1, dtype=np.uint32)
    sums = sums.reshape(size, w, 3)[:, cols].reshape(size, size, bw, 3).sum(2)
    return ((sums + bh * bw // 2) // (bh * bw)).astype(np.uint8)


# CartPole drawing, in units of the frame size S except where noted. Gymnasium's world is
# 2 * x_threshold = 4.8 units wide with a 1.0-unit pole; its pixel sizes are chosen for 600 px
# and vanish at 64, so cart and pole are drawn thicker here (at S=64: 7x4 px cart, 2.2 px pole).
_WORLD_WIDTH = 4.8
_POLE_LENGTH = 1.0  # world units
_CART_WIDTH, _CART_HEIGHT = 0.11, 0.06
_POLE_WIDTH, _MIN_POLE_WIDTH_PX = 0.035, 2.0
_TRACK_Y = 0.75  # track and cart bottom; room above for the pole, below for a pole hanging down
_POLE_COLOR = (202, 152, 101)
_AXLE_COLOR = (129, 132, 203)


class CartPoleRenderer:
    """Draws CartPole states (N, 4) = (x, x_dot, theta, theta_dot) as (N, S, S, 3) uint8 frames,
    anti-aliased so that sub-pixel moves of cart and pole still change the image."""

    def __init__(self, size: int):
        self.size = size
        self._scale = np.float32(size / _WORLD_WIDTH)
        self._cart_half_width = _CART_WIDTH * size / 2
        self._pole_length = _POLE_LENGTH * size / _WORLD_WIDTH
        pole_radius = max(_MIN_POLE_WIDTH_PX, _POLE_WIDTH * size) / 2
        self._edge = np.float32(pole_radius + 0.5)  # coverage = edge - distance, clipped to [0, 1]
        track_y = _TRACK_Y * size
        hinge_y = track_y - _CART_HEIGHT * size
        self._centers = np.arange(size, dtype=np.float32) + np.float32(0.5)
        track = _overlap(self._centers, track_y, track_y + max(1.0, size / 64))
        self._background = np.repeat(np.round(255 * (1 - track)).astype(np.uint8), 3 * size)
        self._background = self._background.reshape(size, size, 3)
        # Only a band of rows around the hinge can differ from the white-and-track background.
        reach = int(np.ceil(self._pole_length + pole_radius)) + 1
        self._rows = slice(max(0, int(hinge_y) - reach), min(size, int(hinge_y) + reach + 1))
        row_centers = self._centers[self._rows]
        self._dy = (row_centers - np.float32(hinge_y))[None, :, None]  # (1, R, 1) from the hinge
        self._cart_rows = _overlap(row_centers, hinge_y, track_y)[None, :, None]
        self._track_rows = track[self._rows][None, :, None]
        self._scratch = np.empty((5, 0, len(row_centers), size), np.float32)

    def __call__(self, state: np.ndarray) -> np.ndarray:
        state = np.asarray(state, np.float32)
        n = len(state)
        if self._scratch.shape[1] != n:
            self._scratch = np.empty((5, n, *self._scratch.shape[2:]), np.float32)
        # All the per-pixel work is done in place in these (N, R, S) arrays, kept between calls:
        # with fresh arrays per operation, page faults on new memory made it ~3x slower (measured).
        axle, pole, black, a, b = self._scratch
        cart_x = self.size / 2 + state[:, 0, None] * self._scale  # (N, 1)
        dx = (self._centers - cart_x)[:, None, :]  # (N, 1, S) from the hinge
        self._draw_pole(state[:, 2, None, None], dx, pole, axle, a)
        cols = _overlap(
            self._centers, cart_x - self._cart_half_width, cart_x + self._cart_half_width
        )
        np.multiply(self._cart_rows, cols[:, None, :], out=black)
        np.maximum(black, self._track_rows, out=black)

        frame = np.empty((n, self.size, self.size, 3), np.uint8)
        frame[:] = self._background
        _composite(black, pole, axle, frame[:, self._rows], a, b)
        return frame

    def _draw_pole(self, theta, dx, pole, axle, proj) -> None:
        """Pole and axle coverage into `pole` and `axle`; `proj` is scratch."""
        np.add(dx * dx, self._dy * self._dy, out=axle)  # squared distance to the hinge
        # Positive theta leans the pole right, as in gymnasium's renderer; image rows grow downward.
        np.add(dx * np.sin(theta), self._dy * -np.cos(theta), out=proj)  # along the pole
        np.clip(proj, 0.0, self._pole_length, out=pole)  # nearest pole point's distance up it
        # squared distance to that point: |d|^2 - 2 * nearest * proj + nearest^2
        proj *= -2.0
        proj += pole
        proj *= pole
        proj += axle
        np.maximum(proj, 0.0, out=proj)  # float32 rounding can dip just below zero
        _soft_disc(proj, self._edge, out=pole)
        _soft_disc(axle, self._edge, out=axle)


def _soft_disc(dist2: np.ndarray, edge: np.float32, out: np.ndarray) -> None:
    """Approximate pixel coverage of everything within `edge - 0.5` px, from squared distances."""
    np.sqrt(dist2, out=out)
    np.subtract(edge, out, out=out)
    np.clip(out, 0.0, 1.0, out=out)


def _composite(black, pole, axle, band, a, b) -> None:
    """Paint white <- black <- pole <- axle into the uint8 `band`; every float input is consumed.

    Channel planes are written one at a time because float ops broadcast over a trailing RGB
    axis of 3 measured ~10x slower than on these (N, R, S) planes."""
    np.subtract(1.0, axle, out=a)
    pole *= a  # pole colour's weight: the part the axle does not cover
    a -= pole  # weight left for what lies under the pole: 1 - axle - pole weight
    black *= -255.0
    black += 255.0
    black *= a
    black += 0.5  # rounds on the float -> uint8 cast below
    for c in range(3):
        np.multiply(pole, _POLE_COLOR[c], out=a)
        np.multiply(axle, _AXLE_COLOR[c], out=b)
        a += b
        a += black
        band[..., c] = a


def _overlap(centers: np.ndarray, lo, hi) -> np.ndarray:
    """Fraction of each unit pixel (given by its center) inside [lo, hi]."""
    return np.clip(np.minimum(hi, centers + 0.5) - np.maximum(lo, centers - 0.5), 0.0, 1.0)
