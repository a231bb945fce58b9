"""One typed config tree: dataclasses loaded from TOML or the archive's JSON, `--set` overrides,
validated once at the edge with messages that name the file and the key.

Sections follow the user's archive (`general`, `models`, `train`) plus `env` and `log`.
DESIGN.md §2 maps the archive's keys onto DreamerV3 sizes: `d_hidden` 256 is the official
`size12m` (deter 2048 = 256 x hidden_dim_ratio 8), 64 is `size1m`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(Exception):
    """A bad config: the message is one line naming the file and the key."""


# --------------------------------------------------------------------------------------------
# The tree. Every key of the archive's "Final Recommended Configuration" exists with its meaning.


@dataclass
class GeneralConfig:
    seed: int = 0
    """Seeds torch, numpy and the environments; a CPU run with the same seed is reproducible."""
    device: str = "auto"
    """auto | cpu | cuda. auto and an unavailable cuda fall back to the CPU with a notice."""
    train_world_model: bool = True
    """False freezes the world model (e.g. to fine-tune the behaviour of a loaded agent)."""
    threads: int = 0
    """torch intra-op threads on the CPU; 0 = auto: OMP_NUM_THREADS when set, else on a CPU one
    thread for d_hidden < 256 (its ops are too small to split: d64 updates 1.6x faster on one
    thread than on two), else torch's default (one per core)."""
    compile: bool = False
    """torch.compile the update's functions and the policy step (tens of seconds on a CPU)."""
    cuda_graphs: bool = False
    """Capture the whole learner update (sampling, world model, imagination, actor, critic,
    optimizer steps) in CUDA graphs. CUDA only; elsewhere a notice and no graphs."""
    precision: str = "fp32"
    """fp32 | bf16: bf16 autocast of the forward passes, fp32 master weights and optimizer."""
    kernels: str = "torch"
    """torch | triton: the block-GRU and two-hot losses as fused Triton kernels (CUDA only)."""
    batched_wgrad: bool = False
    """Form the observe loop's recurrent weight gradients once per sequence (one matmul over
    all T x B rows) instead of per step: same gradient, far less memory traffic."""
    profile: str = ""
    """START:STOP learner steps to profile: NVTX ranges plus cudaProfilerStart/Stop for
    `nsys --capture-range=cudaProfilerApi`; empty disables."""
    trace: bool = False
    """With `profile`, also write a torch.profiler chrome trace (trace.json; works on the CPU)."""


@dataclass
class EnvConfig:
    name: str = "CartPole-v1"
    """CartPole-v1 | LunarLander-v3."""
    backend: str = "envpool"
    """envpool | gymnasium (gymnasium's vector envs, where envpool cannot be installed)."""
    num_envs: int = 16
    """Parallel training environments."""
    image: bool = True
    """Observe the 64x64 RGB frame."""
    vector: bool = True
    """Observe the state vector."""
    processes: bool = False
    """gymnasium backend only: step each env in its own worker process (for many-core machines)."""


@dataclass
class CNNConfig:
    num_layers: int = 4
    """Strided conv layers; each halves the resolution (64 -> 4 with 4 layers)."""
    stride: int = 2
    kernel_size: int = 2
    activation: str = "sigmoid"
    """Output squashing of the image decoder: sigmoid (pixels in [0, 1]) | none."""
    target_size: list[int] = field(default_factory=lambda: [64, 64])
    """Frame size (height, width) the environment renders."""


@dataclass
class MLPConfig:
    hidden_dim_ratio: int = 8
    """Recurrent (deter) size = d_hidden x this ratio."""
    n_layers: int = 3
    """Hidden layers of the vector encoder/decoder, actor and critic MLPs."""
    latent_categories: int = 16
    """Classes per categorical latent."""
    latents: int = 32
    """Number of categorical latents."""


@dataclass
class EncoderConfig:
    cnn: CNNConfig = field(default_factory=CNNConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)


@dataclass
class RNNConfig:
    n_blocks: int = 4
    """Blocks of the block-diagonal GRU; deter size must divide by it."""


@dataclass
class ModelsConfig:
    d_hidden: int = 256
    """MLP units and RSSM hidden width; CNN channels start at d_hidden/8 and double."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    unimix: float = 0.01
    """Uniform mixture of the categorical latents and the actor."""
    free_bits: float = 1.0
    """KL free nats, clipping each time step's KL summed over all latents."""
    num_bins: int = 255
    """Bins of the symlog two-hot reward and critic outputs."""
    head_layers: int = 1
    """Hidden layers of the reward and continue heads (official DreamerV3: 1)."""
    twohot_space: str = "real"
    """symlog | real: where the reward and critic two-hot heads live. symlog: bins uniform in
    symlog space, the target interpolated there, the prediction symexp(sum p*b) (biased toward
    0 for rare large rewards). real (default): official DreamerV3 `symexp_twohot`: bins are
    symexp of the symlog grid, the target is interpolated and the prediction sum p*b taken in
    real space. Default by the ablation (README): CartPole d64 solved at update 1375 +- 177
    instead of 2125 +- 530, 2 seeds each."""
    init: str = "official"
    """engine | official: weight init. engine: an output layer's outscale multiplies the weight
    variance and a block-diagonal layer's fan-in is one block's input. official: outscale
    multiplies the std (the policy head starts 10x smaller) and the fan-in is the full input.
    Default official: part of the official set that the ablation chose (README)."""


@dataclass
class Schedule:
    """A value that moves from `start` to `end` over `steps` updates, then stays at `end`.
    No defaults: a schedule table must spell out all four keys."""

    schedule: str
    """linear | exp (geometric interpolation: the same factor every update)."""
    start: float
    end: float
    steps: int

    def at(self, k: int) -> float:
        """The value after k updates of the schedule (k < 0 counts as 0)."""
        if k >= self.steps:
            return self.end
        frac = max(k, 0) / self.steps
        if self.schedule == "exp":
            return self.start * (self.end / self.start) ** frac
        return self.start + (self.end - self.start) * frac


LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class TrainConfig:
    batch_size: int = 8
    sequence_length: int = 25
    max_train_steps: int = 5000
    """Learner updates; the run ends there (or at max_env_steps)."""
    max_env_steps: int = 0
    """Stop after this many environment steps; 0 = no limit."""
    num_dream_steps: int = 15
    """Imagination horizon."""
    gamma: float = 0.99
    lam: float = 0.95
    wm_lr: float = 1e-4
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    weight_decay: float = 1e-6
    optimizer: str = "laprop"
    """adam | laprop. LaProp (official DreamerV3) divides each gradient by the RMS of past
    gradients first and then takes momentum of the result (Adam does it the other way round).
    Default laprop, with agc 0.3, no global-norm clips and a 1,000-update warm-up: the official
    optimizer, chosen with the other official switches by the ablation (README)."""
    adam_beta1: float = 0.9
    """The optimizer's momentum decay (Adam's beta1, LaProp's momentum; official 0.9)."""
    adam_beta2: float = 0.999
    """The decay of its squared-gradient average (official 0.999)."""
    adam_eps: float = 1e-20
    """Epsilon of the optimizer (Adam or LaProp; official LaProp: 1e-20)."""
    wm_grad_clip: float = 0.0
    """Global-norm gradient clipping of the world model; 0 disables."""
    actor_grad_clip: float = 0.0
    critic_grad_clip: float = 0.0
    agc: float = 0.3
    """Adaptive gradient clipping (official 0.3): each parameter tensor's gradient is scaled
    down where its norm exceeds agc x max(1e-3, the tensor's norm); 0 disables. Applied before
    the global-norm clips above (set those to 0 for the official optimizer)."""
    lr_warmup_steps: int = 1000
    """Each optimizer's learning rate rises linearly from 0 over its first this many updates
    (official: 1000); 0 disables."""
    async_collection: bool = True
    """Step the training envs in a background thread while the learner updates (same data as
    stepping inline: the step in flight only produces the next observation)."""
    actor_warmup_steps: int = 1000
    """World-model-only updates before the actor and critic start training."""
    bootstrap_steps: int = 10000
    """Environment steps of random-policy data collected before training starts."""
    min_buffer_episodes: int = 0
    """Also wait for this many finished episodes in the buffer before training."""
    replay_buffer_size: int = 100_000
    """Capacity in environment steps (all environments together)."""
    train_ratio: float = 32.0
    """Replayed steps (batch x length) per environment step."""
    actor_entropy_coef: float | Schedule = 0.01
    """A number, or a table {schedule = "linear" | "exp", start, end, steps}. A schedule counts
    actor updates, i.e. from update actor_warmup_steps on (the coefficient has no effect before):
    the first actor update uses `start`, and after `steps` actor updates it stays at `end`."""
    beta_pred: float = 0.99
    """Weight of the prediction terms (image + vector + reward + continue, each scaled below)."""
    beta_dyn: float = 0.99
    """Weight of the dynamics KL (trains the prior)."""
    beta_rep: float = 0.99
    """Weight of the representation KL (trains the posterior)."""
    image_scale: float = 1.0
    """Scale of the image term (squared error summed over the pixels of a frame)."""
    vector_scale: float = 1.0
    """Scale of the vector term (symlog squared error summed over dims). With images on, the
    image sum is ~10^3x larger; raising this makes the latent state track the vector precisely."""
    reward_scale: float = 1.0
    reward_head_detached: bool = False
    """false (official): the reward loss's gradient also trains the representation (encoder,
    GRU, posterior), so the latent state learns codes for reward events of its own. true: the
    reward head reads the features with their gradient stopped, so it only learns to read the
    state that reconstruction and the KL shaped (the same one the decoders read), and an
    imagined state pays what it shows (LunarLander's hover trap, README)."""
    cont_scale: float = 1.0
    slow_critic_rate: float = 0.02
    """EMA rate of the slow critic copy."""
    slow_critic_reg: float = 1.0
    """Weight of the critic's regulariser towards the slow critic."""
    retnorm_rate: float = 0.01
    """EMA rate of the 5th/95th return percentiles."""
    retnorm_limit: float = 1.0
    """Returns are divided by max(limit, P95 - P5)."""
    retnorm_init: str = "zero"
    """first | zero: the percentile EMA starts at the first batch's percentiles, or (official)
    at zero, so early returns are divided by ~limit until the EMA has grown."""
    repval_scale: float = 0.3
    """Weight of the replayed-value loss (official 0.3): the critic also regresses the
    lambda-returns of the replayed trajectories (real rewards and episode ends, bootstrapped
    with the imagined returns from each replayed state); 0 disables."""
    repval_boot: str = "imagined"
    """imagined | critic: what the replayed lambda-returns bootstrap with at each replayed
    state. imagined (official): the imagined lambda-return from there, so whatever the
    imagination overpays (LunarLander's hover trap: a lander rocking on its legs imagines more
    touch-downs than happen) reaches the replayed targets too; critic: the slow critic's value
    of the state, so the replayed targets add only real rewards and episode ends to the
    critic's own estimate, and repval_scale anchors the critic to what happened."""
    replay_context: bool = True
    """Store each step's posterior (deter, stoch) in the replay and start every sampled sequence
    from the stored state before it, instead of from zeros (official replay_context = 1). The
    posteriors computed in training are written back to the replay."""
    lr_scaling: str = "none"
    """none | linear | sqrt: multiply every learning rate by (batch_size / lr_base_batch), or
    its square root, so a batch-size sweep need not retune the learning rates."""
    lr_base_batch: int = 16
    """The batch size the configured learning rates are meant for (with lr_scaling)."""
    max_abs_dream_value: float = 1e4
    """Stop the run when the logged |dream_value| exceeds this (a diverging critic; the archive
    once saw 8.9e7); 0 disables. Checked at each log line and before each checkpoint."""
    early_stop_patience: int = 0
    """End the run after this many log intervals in a row without the logged wm_loss improving
    on its best by early_stop_min_delta (hyperparameter search); 0 = off."""
    early_stop_min_delta: float = 0.01
    """Relative improvement that counts: wm_loss < best - min_delta x |best|."""
    stop_solved_evals: int = 0
    """End the run once this many evaluations in a row reach the task's solved return
    (CartPole-v1 450, LunarLander-v3 200): a stopping rule fixed before the run, so its final
    checkpoint is the one to re-evaluate; 0 = train to max_train_steps."""
    stop_confirm_episodes: int = 0
    """With stop_solved_evals: once the streak is complete, play at least this many fresh
    greedy episodes (log.eval_episodes per round) with the same weights, and stop only if
    their mean reaches the solved return; otherwise train on (the next evaluation at the
    target confirms again). A 10-episode eval swings by ~100 on LunarLander, so a streak
    alone can stop an agent whose true mean is below the target; 0 = off."""


@dataclass
class LogConfig:
    log_every: int = 100
    """Learner updates between metric lines."""
    eval_every: int = 1000
    """Learner updates between evaluations; 0 disables."""
    eval_episodes: int = 10
    eval_policy: str = "mode"
    """mode (greedy action) | sample."""
    checkpoint_every: int = 1000
    """Learner updates between checkpoints (latest is always written at the end)."""
    checkpoint_replay: bool = False
    """Also write the replay buffer (checkpoints/replay.pt) with every latest checkpoint, so
    --resume continues with the same data instead of refilling bootstrap_steps."""
    progress: bool = True
    """Progress bar on the terminal (never when stderr is not a TTY)."""
    tensorboard: bool = False
    """Also write the numeric fields of train and eval lines as TensorBoard scalars
    (RUN_DIR/tensorboard; needs the tensorboard package)."""
    dream_video: bool = False
    """At each evaluation, write RUN_DIR/dreams/dream_<step>.gif: the first eval episode beside
    the world model's open-loop prediction of it."""
    dream_steps: int = 50
    """Steps of the first eval episode the dream video covers."""
    dream_context: int = 5
    """Observed steps before the world model predicts open-loop from the actions alone."""


# Settings a population member may hold on its own: none changes a tensor's shape, so the
# members' weights, batches and replay stack along one leading dimension. Every other key is
# the population's, the same for every member.
MEMBER_KEYS = (
    "train.wm_lr",
    "train.actor_lr",
    "train.critic_lr",
    "train.weight_decay",
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_eps",
    "train.wm_grad_clip",
    "train.actor_grad_clip",
    "train.critic_grad_clip",
    "train.agc",
    "train.gamma",
    "train.lam",
    "train.actor_entropy_coef",
    "train.beta_pred",
    "train.beta_dyn",
    "train.beta_rep",
    "train.image_scale",
    "train.vector_scale",
    "train.reward_scale",
    "train.cont_scale",
    "train.repval_scale",
    "train.slow_critic_rate",
    "train.slow_critic_reg",
    "train.retnorm_rate",
    "train.retnorm_limit",
    "models.free_bits",
    "models.unimix",
)
# The official-detail switches (README "Official DreamerV3 details") a member may also hold on
# its own, so that an ablation of them is one population: their values are names or flags, not
# rates, and PBT never perturbs them (an exploiting member takes its source's). The two-hot
# space, the optimizer and the replay context are then chosen per member by a tensor flag (both
# variants computed, one kept: a population mixing them pays for both); the initialisation and
# the return normaliser's start only act when a member is built.
SWITCH_KEYS = (
    "models.twohot_space",
    "models.init",
    "train.optimizer",
    "train.lr_warmup_steps",
    "train.retnorm_init",
    "train.replay_context",
)
# A member grid may also give each member its own seed (engine.sweep --population packs a grid's
# seeds this way); without it member i has general.seed + i. PBT never perturbs it.
GRID_KEYS = (*MEMBER_KEYS, *SWITCH_KEYS, "general.seed")


@dataclass
class PBTConfig:
    """Population-based training: every `every` updates (0 = off), each member in the bottom
    `quantile` of recent eval returns takes the weights, optimizer state and return normaliser
    of one in the top `quantile`, and multiplies each of its grid settings by one of `perturb`."""

    every: int = 0
    quantile: float = 0.25
    perturb: list[float] = field(default_factory=lambda: [0.8, 1.25])


@dataclass
class PopulationConfig:
    size: int = 1
    """Agents trained together in one process, seeds general.seed .. general.seed + size - 1."""
    grid: dict = field(default_factory=dict)
    """Per-member settings: {"train.actor_lr" = [one value per member], ...}, keys from
    GRID_KEYS; a key not given is the config's value for every member."""
    pbt: PBTConfig = field(default_factory=PBTConfig)


@dataclass
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    name: str = "run"
    """Config name (the file's stem); run directories are named after it."""

    # Derived sizes, so every module reads one definition.
    @property
    def deter(self) -> int:
        return self.models.d_hidden * self.models.encoder.mlp.hidden_dim_ratio

    @property
    def stoch(self) -> int:
        mlp = self.models.encoder.mlp
        return mlp.latents * mlp.latent_categories

    @property
    def image_size(self) -> int | None:
        return self.models.encoder.cnn.target_size[0] if self.env.image else None


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation.

TASKS = ("CartPole-v1", "LunarLander-v3")
# The eval return each task counts as solved (train.stop_solved_evals, engine.report's target).
TASK_TARGETS = {"CartPole-v1": 450.0, "LunarLander-v3": 200.0}
# The solved return engine.report and engine.evaluate assume for a task not in TASK_TARGETS.
DEFAULT_TARGET = 450.0


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a .toml or the archive's .json config, apply `KEY=VALUE` overrides, validate."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise ConfigError(f"{src}: file not found")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raw = tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{src}: malformed {path.suffix.lstrip('.') or 'toml'}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: top level must be a table of sections")
    raw.setdefault("name", path.stem)
    cfg = _build(Config, raw, src, "")
    apply_overrides(cfg, overrides)
    validate(cfg, src)
    return cfg


def add_set_option(parser: Any, help: str) -> None:
    """`--set KEY=VALUE` (repeatable, into args.overrides) of the commands that apply overrides."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """`train.batch_size=16`: the value is parsed as TOML (bare words count as strings)."""
    for item in overrides:
        src = f"--set {item}"
        if "=" not in item:
            raise ConfigError(f"{src}: expected KEY=VALUE")
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        set_key(cfg, key, value, src)


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted config key, e.g. get_key(cfg, "train.gamma")."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def plain_value(value: Any) -> Any:
    """A setting as a config file (or JSON) holds it: a schedule as its table."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def set_key(cfg: Config, key: str, value: Any, src: str) -> None:
    """Sets the dotted `key` to `value` (type-checked); a ConfigError naming `src` otherwise."""
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not dataclasses.is_dataclass(node) or part not in _field_types(type(node)):
            raise ConfigError(f"{src}: unknown key '{'.'.join(parents[: i + 1])}'")
        node = getattr(node, part)
    types = _field_types(type(node)) if dataclasses.is_dataclass(node) else {}
    # A section cannot be set as a value; a field that may hold a table (a schedule) can.
    if leaf not in types or dataclasses.is_dataclass(types[leaf]):
        raise ConfigError(f"{src}: unknown key '{key}'")
    setattr(node, leaf, _coerce(value, types[leaf], src, key))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, raw: Any, src: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: '{prefix.rstrip('.')}' must be a table")
    types = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        name = prefix + key
        if key not in types:
            raise ConfigError(f"{src}: unknown key '{name}'")
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, src, name + ".")
        else:
            kwargs[key] = _coerce(value, tp, src, name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, src: str, key: str) -> Any:
    """Check a value against its declared type; ints are accepted where floats are declared."""
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{src}: '{key}' is a section, not a value")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), src, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{key}' must be a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{src}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, src, key) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{src}: '{key}' must be {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def _coerce_union(value: Any, options: tuple, src: str, key: str) -> Any:
    """A value that may be a scalar or a table (e.g. a number or a schedule)."""
    tables = [tp for tp in options if dataclasses.is_dataclass(tp)]
    if isinstance(value, dict) and tables:
        return _build_table(tables[0], value, src, key)
    for tp in options:
        if not dataclasses.is_dataclass(tp):
            try:
                return _coerce(value, tp, src, key)
            except ConfigError:
                pass
    names = [tp.__name__ for tp in options if not dataclasses.is_dataclass(tp)]
    names += [f"a table {{{', '.join(f.name for f in dataclasses.fields(tp))}}}" for tp in tables]
    raise ConfigError(f"{src}: '{key}' must be {' or '.join(names)}, got {value!r}")


def _build_table(cls: type, raw: dict[str, Any], src: str, key: str) -> Any:
    """A table given as a value: every field must be present (no defaults to fall back on)."""
    types_ = _field_types(cls)
    for k in raw:
        if k not in types_:
            raise ConfigError(f"{src}: unknown key '{key}.{k}' (expected {', '.join(types_)})")
    missing = [k for k in types_ if k not in raw]
    if missing:
        raise ConfigError(f"{src}: '{key}' is missing {', '.join(missing)}")
    return cls(**{k: _coerce(v, types_[k], src, f"{key}.{k}") for k, v in raw.items()})


def validate(cfg: Config, src: str = "config") -> None:
    """Range and consistency checks, once, so the trainer can trust every value."""
    g, e, m, t, lg = cfg.general, cfg.env, cfg.models, cfg.train, cfg.log
    cnn, mlp = m.encoder.cnn, m.encoder.mlp

    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{src}: '{key}' {what}, got {value!r}")

    need(g.device in ("auto", "cpu", "cuda"), "general.device", "must be auto|cpu|cuda", g.device)
    need(g.threads >= 0, "general.threads", "must be >= 0", g.threads)
    need(g.precision in ("fp32", "bf16"), "general.precision", "must be fp32|bf16", g.precision)
    need(g.kernels in ("torch", "triton"), "general.kernels", "must be torch|triton", g.kernels)
    need(
        g.profile == "" or profile_window(g.profile) is not None,
        "general.profile",
        "must be START:STOP learner steps with START < STOP",
        g.profile,
    )
    need(e.name in TASKS, "env.name", f"unknown environment (known: {', '.join(TASKS)})", e.name)
    need(
        e.backend in ("envpool", "gymnasium"), "env.backend", "must be envpool|gymnasium", e.backend
    )
    need(e.num_envs >= 1, "env.num_envs", "must be >= 1", e.num_envs)
    need(
        not e.processes or e.backend == "gymnasium",
        "env.processes",
        "needs env.backend = gymnasium (envpool runs its own threads)",
        e.processes,
    )
    need(e.image or e.vector, "env.image", "and env.vector cannot both be false", e.image)

    need(
        m.d_hidden >= 8 and m.d_hidden % 8 == 0,
        "models.d_hidden",
        "must be a multiple of 8 >= 8",
        m.d_hidden,
    )
    need(cnn.num_layers >= 1, "models.encoder.cnn.num_layers", "must be >= 1", cnn.num_layers)
    need(cnn.stride == 2, "models.encoder.cnn.stride", "must be 2 (each layer halves)", cnn.stride)
    need(
        2 <= cnn.kernel_size <= 7,
        "models.encoder.cnn.kernel_size",
        "must be in 2..7",
        cnn.kernel_size,
    )
    need(
        cnn.activation in ("sigmoid", "none"),
        "models.encoder.cnn.activation",
        "must be sigmoid|none",
        cnn.activation,
    )
    ts = cnn.target_size
    need(
        len(ts) == 2 and ts[0] == ts[1],
        "models.encoder.cnn.target_size",
        "must be a square [size, size]",
        ts,
    )
    need(
        ts[0] % (2**cnn.num_layers) == 0 and ts[0] // 2**cnn.num_layers >= 2,
        "models.encoder.cnn.target_size",
        "must divide by 2^num_layers leaving >= 2 px",
        ts,
    )
    need(
        mlp.hidden_dim_ratio >= 1,
        "models.encoder.mlp.hidden_dim_ratio",
        "must be >= 1",
        mlp.hidden_dim_ratio,
    )
    need(mlp.n_layers >= 1, "models.encoder.mlp.n_layers", "must be >= 1", mlp.n_layers)
    need(
        mlp.latent_categories >= 2,
        "models.encoder.mlp.latent_categories",
        "must be >= 2",
        mlp.latent_categories,
    )
    need(mlp.latents >= 1, "models.encoder.mlp.latents", "must be >= 1", mlp.latents)
    need(
        m.rnn.n_blocks >= 1 and cfg.deter % m.rnn.n_blocks == 0,
        "models.rnn.n_blocks",
        f"must be >= 1 and divide the deter size {cfg.deter}",
        m.rnn.n_blocks,
    )
    need(0 <= m.unimix < 1, "models.unimix", "must be in [0, 1)", m.unimix)
    need(m.free_bits >= 0, "models.free_bits", "must be >= 0", m.free_bits)
    need(
        m.num_bins >= 3 and m.num_bins % 2 == 1,
        "models.num_bins",
        "must be odd and >= 3",
        m.num_bins,
    )
    need(m.head_layers >= 0, "models.head_layers", "must be >= 0", m.head_layers)
    need(
        m.twohot_space in ("symlog", "real"),
        "models.twohot_space",
        "must be symlog|real",
        m.twohot_space,
    )
    need(m.init in ("engine", "official"), "models.init", "must be engine|official", m.init)

    for key in ("batch_size", "sequence_length", "num_dream_steps", "replay_buffer_size"):
        need(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
    need(t.sequence_length >= 2, "train.sequence_length", "must be >= 2", t.sequence_length)
    for key in (
        "max_train_steps",
        "max_env_steps",
        "actor_warmup_steps",
        "bootstrap_steps",
        "min_buffer_episodes",
    ):
        need(getattr(t, key) >= 0, f"train.{key}", "must be >= 0", getattr(t, key))
    need(0 < t.gamma <= 1, "train.gamma", "must be in (0, 1]", t.gamma)
    need(0 <= t.lam <= 1, "train.lam", "must be in [0, 1]", t.lam)
    for key in ("wm_lr", "actor_lr", "critic_lr"):
        v = getattr(t, key)
        need(math.isfinite(v) and 0 < v < 1, f"train.{key}", "must be in (0, 1)", v)
    for key in (
        "weight_decay",
        "wm_grad_clip",
        "actor_grad_clip",
        "critic_grad_clip",
        "beta_pred",
        "beta_dyn",
        "beta_rep",
        "slow_critic_reg",
        "image_scale",
        "vector_scale",
        "reward_scale",
        "cont_scale",
        "max_abs_dream_value",
        "early_stop_min_delta",
        "agc",
        "repval_scale",
    ):
        v = getattr(t, key)
        need(math.isfinite(v) and v >= 0, f"train.{key}", "must be finite and >= 0", v)
    _validate_entropy_coef(t.actor_entropy_coef, need)
    need(t.lr_scaling in LR_SCALINGS, "train.lr_scaling", "must be none|linear|sqrt", t.lr_scaling)
    need(t.lr_base_batch >= 1, "train.lr_base_batch", "must be >= 1", t.lr_base_batch)
    for key, v in effective_lrs(t).items():
        need(
            v < 1,
            f"train.{key}",
            f"x lr_scaling {t.lr_scaling} ({lr_factor(t):.3g}) must stay < 1",
            getattr(t, key),
        )
    need(t.stop_solved_evals >= 0, "train.stop_solved_evals", "must be >= 0", t.stop_solved_evals)
    need(
        t.stop_confirm_episodes >= 0,
        "train.stop_confirm_episodes",
        "must be >= 0",
        t.stop_confirm_episodes,
    )
    need(
        not t.stop_confirm_episodes or t.stop_solved_evals > 0,
        "train.stop_confirm_episodes",
        "confirms a solved stop: it needs train.stop_solved_evals > 0",
        t.stop_confirm_episodes,
    )
    need(
        t.early_stop_patience >= 0,
        "train.early_stop_patience",
        "must be >= 0",
        t.early_stop_patience,
    )
    need(t.adam_eps > 0, "train.adam_eps", "must be > 0", t.adam_eps)
    for key in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(t, key) < 1, f"train.{key}", "must be in [0, 1)", getattr(t, key))
    need(t.optimizer in ("adam", "laprop"), "train.optimizer", "must be adam|laprop", t.optimizer)
    need(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0", t.lr_warmup_steps)
    need(
        t.retnorm_init in ("first", "zero"),
        "train.retnorm_init",
        "must be first|zero",
        t.retnorm_init,
    )
    need(
        t.repval_boot in ("imagined", "critic"),
        "train.repval_boot",
        "must be imagined|critic",
        t.repval_boot,
    )
    need(t.train_ratio > 0, "train.train_ratio", "must be > 0", t.train_ratio)
    for key in ("slow_critic_rate", "retnorm_rate"):
        need(0 < getattr(t, key) <= 1, f"train.{key}", "must be in (0, 1]", getattr(t, key))
    need(t.retnorm_limit > 0, "train.retnorm_limit", "must be > 0", t.retnorm_limit)
    need(
        t.replay_buffer_size >= e.num_envs * (t.sequence_length + 1),
        "train.replay_buffer_size",
        f"must hold at least num_envs x (sequence_length + 1) = "
        f"{e.num_envs * (t.sequence_length + 1)} steps",
        t.replay_buffer_size,
    )

    for key in ("log_every", "eval_episodes", "checkpoint_every"):
        need(getattr(lg, key) >= 1, f"log.{key}", "must be >= 1", getattr(lg, key))
    need(lg.eval_every >= 0, "log.eval_every", "must be >= 0", lg.eval_every)
    need(lg.dream_context >= 1, "log.dream_context", "must be >= 1", lg.dream_context)
    need(
        lg.dream_steps > lg.dream_context,
        "log.dream_steps",
        f"must exceed log.dream_context ({lg.dream_context})",
        lg.dream_steps,
    )
    need(
        lg.eval_policy in ("mode", "sample"),
        "log.eval_policy",
        "must be mode|sample",
        lg.eval_policy,
    )
    _validate_population(cfg, src, need)


def _validate_population(cfg: Config, src: str, need: Any) -> None:
    pop = cfg.population
    need(pop.size >= 1, "population.size", "must be >= 1", pop.size)
    for key, values in pop.grid.items():
        name = f"population.grid.{key}"
        if key not in GRID_KEYS:
            known = key in _all_keys()
            why = "changes tensor shapes or the run's data" if known else "is not a config key"
            raise ConfigError(
                f"{src}: '{name}' {why}: a member grid may hold only "
                f"{', '.join(k.split('.', 1)[1] for k in GRID_KEYS)}"
            )
        need(isinstance(values, list), name, "must be a list (one value per member)", values)
        need(
            len(values) == pop.size,
            name,
            f"must hold one value per member ({pop.size}), not {len(values)}",
            values,
        )
    pbt = pop.pbt
    need(pbt.every >= 0, "population.pbt.every", "must be >= 0 (0 = off)", pbt.every)
    need(0 < pbt.quantile <= 0.5, "population.pbt.quantile", "must be in (0, 0.5]", pbt.quantile)
    need(
        len(pbt.perturb) >= 1 and all(math.isfinite(f) and f > 0 for f in pbt.perturb),
        "population.pbt.perturb",
        "must be factors > 0",
        pbt.perturb,
    )
    if pop.grid and pop.size > 1:
        member_configs(cfg, src)  # each member's values type- and range-checked


def _all_keys(cls: type = None, prefix: str = "") -> set[str]:
    """Every dotted value key of the config."""
    keys = set()
    for name, tp in _field_types(cls or Config).items():
        if dataclasses.is_dataclass(tp):
            keys |= _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def member_configs(cfg: Config, src: str = "config") -> list[Config]:
    """The population's members as single-agent configs: member i has seed general.seed + i
    (or the grid's general.seed), its grid values, and a population of 1 (what a member's run
    directory holds)."""
    out = []
    for i in range(cfg.population.size):
        member = copy.deepcopy(cfg)
        member.population = PopulationConfig()
        member.general.seed = cfg.general.seed + i
        for key, values in cfg.population.grid.items():
            set_key(member, key, values[i], f"{src}: population.grid member {i}")
        validate(member, f"{src}: population member {i}")
        out.append(member)
    return out


def mixed_switches(cfgs: list[Config]) -> frozenset[str]:
    """The SWITCH_KEYS whose values differ between `cfgs` (a population's members): those the
    members' modules and optimizers choose per member by a tensor flag."""
    return frozenset(k for k in SWITCH_KEYS if len({str(get_key(c, k)) for c in cfgs}) > 1)


def _validate_entropy_coef(coef: float | Schedule, need: Any) -> None:
    key = "train.actor_entropy_coef"
    if not isinstance(coef, Schedule):
        need(math.isfinite(coef) and coef >= 0, key, "must be finite and >= 0", coef)
        return
    need(coef.schedule in ("linear", "exp"), f"{key}.schedule", "must be linear|exp", coef.schedule)
    for name in ("start", "end"):
        v = getattr(coef, name)
        need(math.isfinite(v) and v >= 0, f"{key}.{name}", "must be finite and >= 0", v)
        if coef.schedule == "exp":
            need(v > 0, f"{key}.{name}", "must be > 0 for an exp schedule", v)
    need(coef.steps >= 1, f"{key}.steps", "must be >= 1", coef.steps)


def actor_entropy_coef_at(t: TrainConfig, step: int) -> float:
    """The entropy coefficient of the update made at learner step `step` (0-based): schedules
    count actor updates, which begin at step actor_warmup_steps."""
    coef = t.actor_entropy_coef
    if isinstance(coef, Schedule):
        return coef.at(step - t.actor_warmup_steps)
    return coef


def lr_factor(t: TrainConfig) -> float:
    """What every learning rate is multiplied by under train.lr_scaling."""
    ratio = t.batch_size / t.lr_base_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[t.lr_scaling]


def effective_lrs(t: TrainConfig) -> dict[str, float]:
    """The learning rates the optimizers use: the configured ones times lr_factor."""
    f = lr_factor(t) if t.lr_scaling in LR_SCALINGS else 1.0
    return {k: getattr(t, k) * f for k in ("wm_lr", "actor_lr", "critic_lr")}


def profile_window(text: str) -> tuple[int, int] | None:
    """'100:120' -> (100, 120); None when malformed."""
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return (start, stop) if 0 <= start < stop else None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(raw: dict[str, Any], src: str = "checkpoint") -> Config:
    cfg = _build(Config, raw, src, "")
    validate(cfg, src)
    return cfg


def save_toml(cfg: Config, path: Path) -> None:
    """Atomic (temp file in the same folder, then rename): resume reads this file back."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(tomli_w.dumps(to_dict(cfg)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
