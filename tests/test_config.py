import json
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, save_toml

CONFIGS = sorted(Path("configs").glob("*.toml")) + [Path("configs/archive_recommended.json")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_archive_json_keeps_its_meaning():
    cfg = load_config("configs/archive_recommended.json")
    assert cfg.models.d_hidden == 256 and cfg.deter == 2048  # size12m (DESIGN.md §2)
    assert cfg.models.encoder.mlp.latent_categories == 16 and cfg.models.rnn.n_blocks == 4
    cnn = cfg.models.encoder.cnn
    assert cnn.kernel_size == 2 and cnn.target_size == [64, 64]
    t = cfg.train
    assert (t.batch_size, t.sequence_length, t.num_dream_steps) == (8, 25, 15)
    assert (t.wm_lr, t.actor_lr, t.critic_lr, t.weight_decay) == (1e-4, 1e-4, 1e-4, 1e-6)
    assert (t.beta_pred, t.beta_dyn, t.beta_rep, t.actor_entropy_coef) == (0.99, 0.99, 0.99, 0.01)
    assert cfg.general.device == "cuda" and cfg.general.train_world_model


def test_d256_toml_is_the_archive_config():
    toml, archive = (
        load_config("configs/cartpole_d256.toml"),
        load_config("configs/archive_recommended.json"),
    )
    assert toml.models == archive.models
    assert toml.train == archive.train


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(
        "configs/tiny.toml",
        ["train.batch_size=16", "env.backend=gymnasium", "train.gamma=0.95", "log.progress=true"],
    )
    assert cfg.train.batch_size == 16 and cfg.env.backend == "gymnasium"
    assert cfg.train.gamma == 0.95 and cfg.log.progress is True
    save_toml(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again.train == cfg.train and again.models == cfg.models and again.env == cfg.env


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("a.toml", "[train]\nbatch_size = 0\n", ["train.batch_size", ">= 1"]),
        ("b.toml", "[train]\ngamma = 1.5\n", ["train.gamma", "1.5"]),
        ("c.toml", "[train]\nbatch_sz = 8\n", ["unknown key", "train.batch_sz"]),
        ("d.toml", "[train\nbatch_size = 8\n", ["malformed toml"]),
        ("e.toml", '[env]\nname = "Pong-v5"\n', ["env.name", "Pong-v5"]),
        ("f.toml", '[train]\nbatch_size = "8"\n', ["train.batch_size", "must be int"]),
        ("g.json", '{"train": {"batch_size": 8,}}', ["malformed json"]),
        ("h.toml", "[models]\nd_hidden = 60\n", ["models.d_hidden"]),
        ("i.toml", "[models.rnn]\nn_blocks = 3\n", ["models.rnn.n_blocks", "divide"]),
        ("j.toml", "train = 3\n", ["'train' must be a table"]),
        ("k.toml", "[general]\ndevice = 'tpu'\n", ["general.device"]),
        ("l.toml", "[env]\nprocesses = true\n", ["env.processes", "gymnasium"]),
        ("m.toml", "[train]\nstop_confirm_episodes = -5\n", ["stop_confirm_episodes", ">= 0"]),
        ("n.toml", "[train]\nstop_confirm_episodes = 50\n", ["stop_solved_evals > 0"]),
        ("o.toml", "[train]\nrepval_boot = 'value'\n", ["train.repval_boot", "imagined|critic"]),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, name, text, words):
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    for w in words:
        assert w in msg


def test_missing_file_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown key 'train.bogus'"):
        load_config("configs/tiny.toml", ["train.bogus=1"])
    with pytest.raises(ConfigError, match="must be int"):
        load_config("configs/tiny.toml", ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("configs/tiny.toml", ["train.batch_size"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("configs/tiny.toml", ["train.batch_size=0"])


def test_archive_json_written_by_hand_runs_through_the_same_loader(tmp_path):
    raw = json.loads(Path("configs/archive_recommended.json").read_text())
    raw["train"]["batch_size"] = 4
    cfg = load_config(write(tmp_path, "mine.json", json.dumps(raw)))
    assert cfg.train.batch_size == 4 and cfg.name == "mine"
