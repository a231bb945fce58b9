"""The run's metrics: the log interval's device-side sums and rates (Meter), metrics.jsonl with
its TensorBoard mirror (MetricsLog), and the stop signals a run installs (engine.launch)."""

import json
import signal

import pytest
import torch

from engine.launch import interrupt, stop_signals
from engine.logger import Meter, MetricsLog


def test_meter_means_each_metric_over_its_updates_and_rates_close_the_interval(monkeypatch):
    clock = iter([0.0, 100.0, 104.0, 110.0])  # built, started, two lines
    monkeypatch.setattr("engine.logger.time.perf_counter", lambda: next(clock))
    meter = Meter()
    assert not meter
    meter.start(step=10, env_steps=320)
    meter.add({"loss": torch.tensor(1.0), "actor_loss": torch.tensor(4.0)})
    meter.add({"loss": torch.tensor(3.0), "actor_loss": torch.tensor(0.0)})
    meter.add({"loss": torch.tensor(5.0)})  # a metric missing from an update: its own count
    assert meter.means() == {"loss": 3.0, "actor_loss": 2.0}
    assert meter  # reading the means keeps them (a checkpoint's health check reads them too)
    assert meter.rates(step=18, env_steps=480) == (104.0, 2.0, 40.0)
    assert not meter
    assert meter.rates(step=21, env_steps=600) == (110.0, 0.5, 20.0)


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed, self.closed = [], 0, 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


def test_metrics_log_mirrors_train_and_eval_lines_to_its_writer(tmp_path):
    writer = FakeWriter()
    log = MetricsLog(tmp_path / "metrics.jsonl", writer)
    log.write({"type": "train", "step": 5, "wm_loss": 1.5, "actor_loss": None, "ok": True})
    log.write({"type": "episode", "step": 5, "episode_return": 9.0})
    log.write({"type": "eval", "step": 6, "eval_return": float("nan"), "eval_returns": [1, 2]})
    assert writer.scalars == [
        ("train/wm_loss", 1.5, 5),
        ("eval/eval_return", writer.scalars[1][1], 6),
    ]
    assert writer.flushed == 2
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in lines] == ["train", "episode", "eval"]
    assert lines[2]["eval_return"] == "nan"
    log.close_writer()  # a run does on every way out; a population still writes its stops
    log.write({"type": "member_stopped", "step": 7})
    log.close()
    assert writer.closed >= 1 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_stop_signals_install_the_handler_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals(interrupt, (signal.SIGTERM,)):
        assert signal.getsignal(signal.SIGTERM) is interrupt
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_signals_put_the_previous_handler_back_after_an_exception():
    seen = []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError), stop_signals(lambda s, f: seen.append(s), (signal.SIGINT,)):
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("the run failed")
    assert seen == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is before


def test_a_population_meter_means_each_member_apart():
    meter = Meter()
    meter.add({"wm_loss": torch.tensor([1.0, 4.0]), "dream_value": torch.tensor([0.0, 2.0])})
    meter.add({"wm_loss": torch.tensor([3.0, 0.0]), "dream_value": torch.tensor([2.0, 2.0])})
    assert meter.means() == {"wm_loss": [2.0, 2.0], "dream_value": [1.0, 2.0]}
