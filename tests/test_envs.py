import os
import subprocess
import sys

import numpy as np
import pytest

from engine.envs import BACKENDS, TASKS, CartPoleRenderer, EnvError, make_env

CASES = [(backend, task) for backend in BACKENDS for task in TASKS]
POLE_COLOR = np.array([202, 152, 101])


def _skip_if_missing(backend: str, task: str, image: bool) -> None:
    pytest.importorskip(backend)
    if backend == "gymnasium" and task == "LunarLander-v3":
        pytest.importorskip("Box2D")
        if image:
            pytest.importorskip("pygame")


@pytest.fixture
def make():
    """make_env that skips when the backend is missing and closes what it opened."""
    opened = []

    def _make(task, backend, num_envs=4, seed=0, **kwargs):
        _skip_if_missing(backend, task, kwargs.get("image_size", 64) is not None)
        env = make_env(task, backend, num_envs, seed, **kwargs)
        opened.append(env)
        return env

    yield _make
    for env in opened:
        env.close()


def _cart_mask(image: np.ndarray) -> np.ndarray:
    """Dark pixels off the track line (rows that are mostly dark)."""
    dark = image.max(-1) < 80
    return dark & (dark.mean(-1, keepdims=True) < 0.5)


def _pole_mask(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - POLE_COLOR).max(-1) < 30


def _lander_mask(image: np.ndarray) -> np.ndarray:
    r, b = image[..., 0].astype(int), image[..., 2].astype(int)
    return (b > 150) & (b - r > 60)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)  # (row, col)


@pytest.mark.parametrize(("backend", "task"), CASES)
def test_keys_shapes_dtypes(make, backend, task):
    env = make(task, backend, num_envs=3)
    dim = {"CartPole-v1": 4, "LunarLander-v3": 8}[task]
    assert (env.num_envs, env.vector_dim, env.image_size) == (3, dim, 64)
    assert env.num_actions == {"CartPole-v1": 2, "LunarLander-v3": 4}[task]
    first = env.reset()
    later = env.step(np.zeros(3, np.int64))
    for obs in (first, later):
        assert set(obs) == {"image", "vector", "reward", "is_first", "is_last", "is_terminal"}
        assert obs["image"].shape == (3, 64, 64, 3) and obs["image"].dtype == np.uint8
        assert obs["vector"].shape == (3, dim) and obs["vector"].dtype == np.float32
        assert obs["reward"].shape == (3,) and obs["reward"].dtype == np.float32
        for key in ("is_first", "is_last", "is_terminal"):
            assert obs[key].shape == (3,) and obs[key].dtype == bool
    assert first["is_first"].all() and not first["is_last"].any()
    assert not first["is_terminal"].any() and (first["reward"] == 0).all()
    assert not later["is_first"].any()


@pytest.mark.parametrize(("backend", "task"), CASES)
def test_switching_image_or_vector_off(make, backend, task):
    no_image = make(task, backend, num_envs=2, image_size=None)
    assert "image" not in no_image.reset() and "image" not in no_image.step(np.zeros(2, int))
    small_no_vector = make(task, backend, num_envs=2, image_size=48, use_vector=False)
    assert small_no_vector.vector_dim == no_image.vector_dim
    for obs in (small_no_vector.reset(), small_no_vector.step(np.zeros(2, int))):
        assert "vector" not in obs and obs["image"].shape == (2, 48, 48, 3)


@pytest.mark.parametrize(("backend", "task"), CASES)
def test_frames_show_the_scene_and_follow_it(make, backend, task):
    env = make(task, backend, num_envs=3)
    # Action 0 (push left / do nothing) keeps every cart and lander in view.
    frames = [env.reset()["image"]] + [env.step(np.zeros(3, int))["image"] for _ in range(12)]
    for image in np.concatenate(frames):
        background = np.all(image == image[0, 0], -1).mean()
        assert 0.01 < 1 - background and len(np.unique(image.reshape(-1, 3), axis=0)) > 2
        if task == "CartPole-v1":
            assert _cart_mask(image).sum() >= 12 and _pole_mask(image).sum() >= 8
    if task == "LunarLander-v3":  # it starts at the top edge and may drift out above it
        visible = _lander_mask(np.stack(frames)).sum((2, 3)) >= 3
        assert visible[0].all() and visible.mean() > 0.5
    for env_frames in np.stack(frames, 1):
        assert not np.array_equal(env_frames[0], env_frames[-1])
        assert len({frame.tobytes() for frame in env_frames}) > len(env_frames) // 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_lunar_lander_frame_is_the_current_state(make, backend):
    env = make("LunarLander-v3", backend, num_envs=2)
    obs = env.reset()
    for _ in range(300):  # doing nothing, landers crash within ~50-120 steps
        prev, obs = obs, env.step(np.zeros(2, int))
        if obs["is_first"].any():
            break
    i = int(np.argmax(obs["is_first"]))
    assert prev["is_last"][i] and prev["is_terminal"][i]
    assert _centroid(_lander_mask(prev["image"][i]))[0] > 32  # crashed, low in the frame
    assert _centroid(_lander_mask(obs["image"][i]))[0] < 8  # new episode, back at the top


def test_cartpole_renderer_geometry():
    render = CartPoleRenderer(64)
    states = np.zeros((6, 4), np.float32)
    states[:, 0] = [-1, 1, 0, 0, 0, 0]
    states[:, 2] = [0, 0, -0.2, 0.2, 0, np.pi]
    frames = render(states)
    carts = [_centroid(_cart_mask(f)) for f in frames]
    poles = [_centroid(_pole_mask(f)) for f in frames]
    scale = 64 / 4.8  # the 4.8-unit world spans the frame
    assert carts[0][1] == pytest.approx(32 - scale, abs=1)
    assert carts[1][1] == pytest.approx(32 + scale, abs=1)
    assert poles[2][1] < carts[2][1] - 0.5 and poles[3][1] > carts[3][1] + 0.5
    assert poles[4][0] < carts[4][0] < poles[5][0]  # up, then hanging down
    for f in frames[4:]:  # upright or hanging down, the whole pole is in the frame
        rows = np.argwhere(_pole_mask(f))[:, 0]
        assert 0 < rows.min() and rows.max() < 63 and rows.max() - rows.min() >= scale - 3
    assert not np.array_equal(frames[2], frames[3])
    tiny = states[4:5] + np.float32([0.02, 0, 0.01, 0])  # sub-pixel moves still show
    assert not np.array_equal(render(tiny)[0], frames[4])


def test_cartpole_renderer_batch_and_sizes():
    states = np.random.default_rng(0).uniform(-0.3, 0.3, (5, 4)).astype(np.float32)
    render = CartPoleRenderer(64)
    batch = render(states)
    assert batch.shape == (5, 64, 64, 3) and batch.dtype == np.uint8
    for state, frame in zip(states, batch, strict=True):
        assert np.array_equal(render(state[None])[0], frame)
    for size in (32, 96):
        frame = CartPoleRenderer(size)(states[:1])[0]
        assert frame.shape == (size, size, 3)
        assert _cart_mask(frame).any() and _pole_mask(frame).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cartpole_auto_reset(make, backend):
    env = make("CartPole-v1", backend, num_envs=4, image_size=None)
    obs = env.reset()
    episodes_ended = np.zeros(4, int)
    for _ in range(80):  # always pushing left ends episodes within ~10 steps
        prev_last, obs = obs["is_last"], env.step(np.zeros(4, int))
        first = obs["is_first"]
        assert np.array_equal(first, prev_last)
        assert (obs["reward"][first] == 0).all() and (obs["reward"][~first] == 1).all()
        assert not (obs["is_last"] | obs["is_terminal"])[first].any()
        assert (np.abs(obs["vector"][first]) <= 0.05).all()  # a fresh reset state
        assert np.array_equal(obs["is_terminal"], obs["is_last"])  # no time limit this early
        episodes_ended += obs["is_last"]
    assert (episodes_ended >= 3).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cartpole_time_limit_is_last_not_terminal(make, backend):
    env = make("CartPole-v1", backend, num_envs=3, image_size=None, max_episode_steps=5)
    obs = env.reset()
    for t in range(1, 13):
        obs = env.step((obs["vector"][:, 2] > 0).astype(int))  # balance: push toward the lean
        assert (obs["is_last"] == (t in (5, 11))).all()
        assert (obs["is_first"] == (t in (6, 12))).all()
        assert not obs["is_terminal"].any()


@pytest.mark.parametrize(("backend", "task"), CASES)
def test_seeding(make, backend, task):
    actions = np.random.default_rng(0).integers(0, 2, (5, 3))

    def rollout(seed):
        env = make(task, backend, num_envs=3, seed=seed)
        return [env.reset()] + [env.step(a) for a in actions]

    first, again, other = rollout(1), rollout(1), rollout(2)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a["vector"], b["vector"]) and np.array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["vector"], other[0]["vector"])
    assert len({tuple(v) for v in first[0]["vector"]}) == 3  # sub-envs are seeded differently


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_worker_processes_give_the_same_episodes(make, task):
    # Short time limits put auto-resets inside the 40 steps; frames come from the workers.
    n, actions = 3, np.random.default_rng(0).integers(0, 2, (40, 3))
    inline = make(task, "gymnasium", n, seed=5, max_episode_steps=15)
    workers = make(task, "gymnasium", n, seed=5, max_episode_steps=15, processes=True)
    a, b = [inline.reset()], [workers.reset()]
    for action in actions:
        a.append(inline.step(action))
        b.append(workers.step(action))
    assert sum(o["is_last"].sum() for o in a) >= 2 * n
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert a[-1]["image"].std() > 0


def test_closing_worker_envs_whose_processes_were_killed_does_not_raise():
    # A SIGTERM to the process group (GNU timeout on the H200 machine) killed the workers first;
    # close() then raised BrokenPipeError over the run's own exit message.
    pytest.importorskip("gymnasium")
    env = make_env("CartPole-v1", "gymnasium", 2, seed=0, processes=True)
    env.reset()
    procs = env._env.processes
    for proc in procs:
        proc.kill()
        proc.join()
    env.close()
    assert not any(proc.is_alive() for proc in procs) and env._env.closed


def test_worker_processes_need_gymnasium():
    with pytest.raises(EnvError, match="gymnasium backend"):
        make_env("CartPole-v1", "envpool", 2, seed=0, processes=True)


@pytest.mark.parametrize(
    ("task", "backend", "num_envs", "named"),
    [
        ("Pong-v5", "envpool", 2, "Pong-v5"),
        ("CartPole-v1", "brax", 2, "brax"),
        ("CartPole-v1", "gymnasium", 0, "num_envs"),
    ],
)
def test_bad_arguments_raise_env_error(task, backend, num_envs, named):
    with pytest.raises(EnvError) as info:
        make_env(task, backend, num_envs, seed=0)
    assert named in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_backend_says_what_to_install(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import backend` fail
    with pytest.raises(EnvError, match=f"pip install {backend}"):
        make_env("CartPole-v1", backend, 2, seed=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_steps(make, backend):
    env = make("CartPole-v1", backend, num_envs=2, image_size=None)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, int))
    env.reset()
    for action in (np.zeros(3, int), np.array([0, 2]), np.zeros(2, np.float32)):
        with pytest.raises(ValueError):
            env.step(action)


def test_envpool_threads_follow_the_available_cores(monkeypatch):
    pytest.importorskip("envpool")
    from engine import envs

    assert 1 <= envs.available_cores() <= (os.cpu_count() or 1)
    monkeypatch.setattr(envs, "available_cores", lambda: 3)
    env = envs.make_env("CartPole-v1", "envpool", 8, 0, image_size=None)
    try:
        assert env._env.config["num_threads"] == 3
    finally:
        env.close()


def test_torchrun_ranks_on_one_host_share_its_cores(monkeypatch):
    from engine import envs

    monkeypatch.setattr(envs.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert envs.available_cores() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert envs.available_cores() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert envs.available_cores() == 1  # never below one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    assert envs.local_ranks() == 1


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_importing_engine_sets_a_passive_openmp_wait_unless_given(given):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(
        [sys.executable, "-c", "import engine, os; print(os.environ['OMP_WAIT_POLICY'])"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == (given or "PASSIVE")


def test_intra_op_threads_auto_pick_one_for_a_small_model_on_a_cpu(monkeypatch):
    """general.threads = 0: OMP_NUM_THREADS when set, one thread on a CPU below d_hidden x
    population size 256 (measured faster there), torch's default above it and on CUDA; a set
    count always wins."""
    import torch

    from engine.config import load_config
    from engine.device import choose_threads, set_threads

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    d64 = load_config("configs/cartpole_d64.toml")
    d256 = load_config("configs/cartpole_d256.toml")
    two = load_config("configs/cartpole_d64.toml", ["general.threads=2"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(d64, cpu) == (1, "auto: d_hidden 64 < 256 updates faster on one")
    assert choose_threads(d256, cpu) == (0, "all available")
    assert choose_threads(d64, cuda) == (0, "all available")
    assert choose_threads(two, cpu) == (2, "general.threads")
    # A population's ops are its K members' at once: d_hidden x K is the width that decides.
    pop = lambda k: load_config("configs/cartpole_d64.toml", [f"population.size={k}"])  # noqa: E731
    assert choose_threads(pop(2), cpu) == (
        1,
        "auto: d_hidden 64 x 2 members = 128 < 256 updates faster on one",
    )
    assert choose_threads(pop(4), cpu) == (
        0,
        "auto: d_hidden 64 x 4 members = 256 >= 256, all available",
    )
    assert choose_threads(pop(8), cuda) == (0, "all available")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # engine.sweep --parallel, torchrun
    assert choose_threads(d64, cpu) == (0, "OMP_NUM_THREADS")
    assert choose_threads(two, cpu) == (2, "general.threads")
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(d64, cpu).startswith("auto") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
