"""The [population] table: size, the per-member grid of shape-free settings, PBT settings;
members resolved as single-agent configs; bad tables are one-line errors (exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import (
    MEMBER_KEYS,
    SWITCH_KEYS,
    ConfigError,
    from_dict,
    load_config,
    member_configs,
    save_toml,
    to_dict,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = (ROOT / "configs" / "tiny.toml").read_text()


def write(tmp_path: Path, population: str) -> Path:
    path = tmp_path / "pop.toml"
    path.write_text(TINY + "\n" + population)
    return path


def test_a_member_grid_may_give_each_member_its_own_seed(tmp_path):
    # engine.sweep --population packs seeds x settings this way; PBT never perturbs a seed.
    grid = '"general.seed" = [5, 5, 9]\n"train.actor_lr" = [1e-4, 3e-4, 3e-4]'
    path = write(tmp_path, f"[population]\nsize = 3\n[population.grid]\n{grid}\n")
    members = member_configs(load_config(path))
    assert [(m.general.seed, m.train.actor_lr) for m in members] == [
        (5, 1e-4),
        (5, 3e-4),
        (9, 3e-4),
    ]


def test_members_take_their_seed_and_grid_values(tmp_path):
    path = write(
        tmp_path,
        """
[population]
size = 3
[population.grid]
"train.actor_lr" = [1e-4, 3e-4, 1e-3]
"train.gamma" = [0.99, 0.997, 0.999]
"train.actor_entropy_coef" = [
    3e-4,
    {schedule = "linear", start = 1e-2, end = 3e-4, steps = 100},
    0.0,
]
[population.pbt]
every = 500
""",
    )
    cfg = load_config(path)
    assert cfg.population.size == 3 and cfg.population.pbt.every == 500
    members = member_configs(cfg)
    assert [m.general.seed for m in members] == [cfg.general.seed + i for i in range(3)]
    assert [m.train.actor_lr for m in members] == [1e-4, 3e-4, 1e-3]
    assert [m.train.gamma for m in members] == [0.99, 0.997, 0.999]
    assert members[1].train.actor_entropy_coef.end == 3e-4
    # Keys not in the grid are the population's; a member is a population of one.
    assert {m.train.critic_lr for m in members} == {cfg.train.critic_lr}
    assert all(m.population.size == 1 and m.population.grid == {} for m in members)
    # The table survives config.toml (what a run directory and its checkpoint hold).
    save_toml(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert to_dict(again) == to_dict(cfg) == to_dict(from_dict(to_dict(cfg)))


def test_no_population_table_is_a_population_of_one():
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    assert cfg.population.size == 1 and member_configs(cfg)[0].general.seed == cfg.general.seed


@pytest.mark.parametrize(
    "table, message",
    [
        ('size = 2\n[population.grid]\n"models.d_hidden" = [64, 128]',
         "'population.grid.models.d_hidden' changes tensor shapes"),
        ('size = 2\n[population.grid]\n"train.batch_size" = [8, 16]',
         "'population.grid.train.batch_size' changes tensor shapes"),
        ('size = 2\n[population.grid]\n"env.name" = ["CartPole-v1", "LunarLander-v3"]',
         "'population.grid.env.name' changes tensor shapes"),
        ('size = 2\n[population.grid]\n"train.no_such" = [1, 2]',
         "'population.grid.train.no_such' is not a config key"),
        ('size = 3\n[population.grid]\n"train.actor_lr" = [1e-4, 3e-4]',
         "must hold one value per member (3), not 2"),
        ('size = 2\n[population.grid]\n"train.actor_lr" = 1e-4',
         "must be a list (one value per member)"),
        ('size = 2\n[population.grid]\n"train.gamma" = [0.99, 1.5]',
         "population member 1: 'train.gamma'"),
        ('size = 2\n[population.grid]\n"train.actor_lr" = [1e-4, "fast"]',
         "population.grid member 1: 'train.actor_lr' must be float"),
        ('size = 2\n[population.grid]\n"models.twohot_space" = ["real", "linear"]',
         "population member 1: 'models.twohot_space' must be symlog|real"),
        ('size = 2\n[population.grid]\n"train.optimizer" = ["laprop", "sgd"]',
         "population member 1: 'train.optimizer'"),
        ('size = 2\n[population.grid]\n"train.replay_context" = [true, "yes"]',
         "population.grid member 1: 'train.replay_context' must be bool"),
        ("size = 0", "'population.size' must be >= 1"),
        ("size = 2\n[population.pbt]\nquantile = 0.75", "'population.pbt.quantile'"),
        ("size = 2\n[population.pbt]\nperturb = [0.8, -1.0]", "'population.pbt.perturb'"),
        ("size = 2\ncolour = 3", "unknown key 'population.colour'"),
    ],
)  # fmt: skip
def test_bad_population_tables_are_one_line_errors(tmp_path, table, message):
    path = write(tmp_path, "[population]\n" + table)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_member_keys_are_config_keys():
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    for key in (*MEMBER_KEYS, *SWITCH_KEYS):
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_betas_reach_the_optimizers():
    import torch

    from engine.agent import Agent

    cfg = load_config(
        ROOT / "configs" / "tiny.toml", ["train.adam_beta1=0.8", "train.adam_beta2=0.99"]
    )
    agent = Agent(cfg, 4, 2, torch.device("cpu"))
    assert all(opt.betas == (0.8, 0.99) for opt in agent.optimizers().values())
    with pytest.raises(ConfigError, match="'train.adam_beta2' must be in"):
        load_config(ROOT / "configs" / "tiny.toml", ["train.adam_beta2=1.0"])


def test_run_refuses_a_shape_changing_member_grid(tmp_path):
    bad = write(tmp_path, '[population]\nsize = 2\n[population.grid]\n"models.d_hidden" = [8, 16]')
    for args, message in (
        (["--config", str(bad)], "changes tensor shapes"),
        (["--config", str(ROOT / "configs" / "tiny.toml"), "--population", "0"], "must be >= 1"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "engine.run", *args, "--run-dir", str(tmp_path / "run")],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
