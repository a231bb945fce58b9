"""A short learning run: the whole agent must actually learn CartPole from pixels + state.

About 4 minutes on one CPU core; deselect with -m "not slow"."""

import pytest

from engine.config import load_config
from engine.trainer import Trainer


@pytest.mark.slow
def test_cartpole_d64_learns_within_1000_updates(tmp_path):
    cfg = load_config(
        "configs/cartpole_d64.toml",
        [
            "general.threads=1",
            "train.max_train_steps=1000",
            "log.eval_every=250",
            "log.checkpoint_every=1000",
            "log.progress=false",
        ],
    )
    result = Trainer(cfg, tmp_path).run()
    # A random policy scores ~22; a broken world model or actor stays below 50 (measured: the
    # same run without the vector/continue loss scales reached 40 after 1000 updates). A working
    # one is past 100, but where in 100-250 depends on float rounding: the same seed's evals
    # were 9.1, 80.2, 183.2, 114.1 with the image layers as convolutions and 9.1, 84.4, 132.8,
    # 146.6 with them as patch matmuls (equal to 1e-5 per layer), so the bar is 100.
    assert result["best_eval"] >= 100, result
