"""benchmarks.ablation_table: the window means, their standard error, the paired difference to
the reference arm, end counts and re-evaluations, over sweeps of one seed each; input errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ablation_table import TableError, build, load, main

ROOT = Path(__file__).resolve().parent.parent


def _sweep(out: Path, seed: int, evals: dict[str, list[tuple[int, list[float], list[str]]]]):
    """A sweep directory as engine.sweep writes it: sweep.json and one run per arm, whose
    metrics.jsonl holds train lines and the given evals (step, returns, how each episode ended)."""
    out.mkdir(parents=True)
    runs = []
    for arm, items in evals.items():
        name = f"arm={arm},seed={seed}"
        runs.append(dict(name=name, settings=dict(arm=arm), seed=seed, status="done"))
        (out / name).mkdir()
        lines = [dict(type="train", step=s, wm_loss=1.0) for s, _, _ in items]
        for step, returns, ends in items:
            rec = dict(type="eval", step=step, eval_return=sum(returns) / len(returns))
            rec.update(eval_returns=returns)
            rec.update({f"eval_{k}": ends.count(k) for k in ("rest", "crash", "time_limit")})
            rec.update(eval_terminated=ends.count("rest") + ends.count("crash"))  # as trainers do
            lines.append(rec)
        lines.sort(key=lambda r: r["step"])
        text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"type": "eval", "st'  # cut
        (out / name / "metrics.jsonl").write_text(text)
    (out / "sweep.json").write_text(json.dumps(dict(runs=runs)))


def _reeval(run: Path, mean: float, at_target: int, ends: dict[str, int]):
    rec = dict(mean=mean, std=10.0, episodes=sum(ends.values()), step=4000, at_target=at_target)
    rec.update(end_counts=ends)
    (run / "reeval.json").write_text(json.dumps(rec))


@pytest.fixture
def two_seeds(tmp_path):
    r, c, t = "rest", "crash", "time_limit"
    _sweep(
        tmp_path / "s0",
        0,
        {
            "base": [
                (1000, [-500.0, -300.0], [c, c]),
                (2000, [0.0, 20.0], [r, c]),
                (3000, [100.0, 60.0], [r, t]),
            ],  # fmt: skip
            "real": [(2000, [50.0, 70.0], [r, r]), (3000, [150.0, 250.0], [r, r])],
        },
    )
    _sweep(
        tmp_path / "s1",
        1,
        {
            "base": [(2000, [-40.0, -60.0], [c, c]), (3000, [-20.0, 0.0], [c, t])],
            "real": [(2000, [10.0, 30.0], [r, c]), (3000, [90.0, 110.0], [r, r])],
        },
    )
    _reeval(tmp_path / "s0" / "arm=real,seed=0", 210.0, 40, dict(rest=45, crash=3, time_limit=2))
    return tmp_path


def _rows(text: str, heading: str | None = None) -> list[list[str]]:
    """The rows of the table under `heading` (None: the first table), header rows left out."""
    part = text.split(heading, 1)[1] if heading else text
    part = part.split("\n## ", 1)[0]
    lines = [x for x in part.splitlines() if x.startswith("| ") and not x.startswith("| arm")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines]


def test_window_mean_standard_error_and_paired_difference(two_seeds):
    runs = load(two_seeds / "s0", "reeval.json") + load(two_seeds / "s1", "reeval.json")
    text = build(runs, 2000, None, "base")
    per_run = {(r[0], r[1]): r for r in _rows(text)}
    base0, real0 = per_run["base", "0"], per_run["real", "0"]
    # base seed 0 from 2000: eval means 10 and 80 -> mean 45, s.e. stdev(10, 80)/sqrt 2 = 35
    assert base0[3:6] == ["3000", "2", "45.0 ± 35.0"] and base0[6] == "-"
    # real seed 0: 60 and 200 -> 130 +- 70, paired +85 over base's 45
    assert real0[5:7] == ["130.0 ± 70.0", "+85.0"]
    # ends over the window (rest / crash / time limit): base 2/1/1, real 4/0/0
    assert base0[7] == "2 / 1 / 1" and real0[7] == "4 / 0 / 0"
    assert real0[8:] == ["200.0", "210.0 ± 10.0 (50 ep, update 4000)", "40/50", "45 / 3 / 2"]
    assert per_run["base", "1"][8:] == ["-10.0", "-", "-", "-"]
    # seed 1: base -50, -10 -> -30; real 20, 100 -> 60; paired +90
    assert per_run["real", "1"][5:7] == ["60.0 ± 40.0", "+90.0"]
    over = {r[0]: r for r in _rows(text, "## Over seeds")[:2]}
    # base over seeds: 45 and -30 -> 7.5 +- stdev 53.03; real: 130, 60 -> 95 +- 49.5; vs +87.5
    assert over["base"][1:4] == ["0, 1", "7.5 ± 53.0", "-"]
    assert over["real"][2:] == ["95.0 ± 49.5", "87.5 ± 3.5", "210.0", "-", "40/50", "2/2 and -"]
    assert over["base"][4:] == ["-", "-", "-", "-"]
    every = {(r[0], r[1]): r[2:] for r in _rows(text, "## Every eval")}
    assert every["base", "0"] == ["-400", "10", "80"] and every["real", "1"] == ["", "20", "100"]


def test_window_end_and_single_eval(two_seeds):
    runs = load(two_seeds / "s0", "reeval.json")
    text = build(runs, 1000, 2000, "base")
    base0 = _rows(text)[0]
    # evals 1000 and 2000: -400 and 10 -> -195 +- 205
    assert base0[4:6] == ["2", "-195.0 ± 205.0"] and "## Over seeds" not in text
    one = _rows(build(runs, 3000, None, "real"))
    assert one[0][5:7] == ["80.0", "-120.0"] and one[1][5:7] == ["200.0", "-"]


def test_saved_inputs_give_the_same_table(two_seeds, tmp_path):
    saved = tmp_path / "kept" / "s0"
    with open(two_seeds / "s0" / "arm=real,seed=0" / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps(dict(type="train", step=3500, wm_loss=1.0)) + "\n")
    main([str(two_seeds / "s0"), "--from", "2000", "--save", str(saved)])
    before = build(load(two_seeds / "s0", "reeval.json"), 2000, None, "base")
    assert build(load(saved, "reeval.json"), 2000, None, "base") == before
    kept = (saved / "arm=base,seed=0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in kept] == ["eval"] * 3  # the last update is an eval's
    kept = (saved / "arm=real,seed=0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in kept] == [2000, 3000, 3500]
    assert "| real | 0 | done | 3500 | 2 |" in before
    assert (saved / "arm=real,seed=0" / "reeval.json").is_file()
    with pytest.raises(SystemExit):
        main([str(two_seeds / "s0"), "--save", str(saved)])  # exists
    with pytest.raises(SystemExit):
        main([str(two_seeds / "s0"), str(two_seeds / "s1"), "--save", str(tmp_path / "x")])


def test_command_line_and_errors(two_seeds, tmp_path, capsys):
    out = tmp_path / "table.md"
    main([str(two_seeds / "s0"), str(two_seeds / "s1"), "--from", "2000", "--out", str(out)])
    assert "| real | 0 | done | 3000 | 2 | 130.0 ± 70.0 | +85.0 |" in out.read_text()
    for argv, message in [
        ([str(tmp_path / "nowhere")], "nowhere: no such directory"),
        ([str(tmp_path)], "holds no sweep.json"),
        ([str(two_seeds / "s0"), "--from", "3000", "--to", "2000"], "--to 2000 is before"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err
    (two_seeds / "s1" / "arm=base,seed=1" / "reeval.json").write_text('{"mean": 1}')
    with pytest.raises(TableError, match="not an engine.evaluate --json record"):
        load(two_seeds / "s1", "reeval.json")
    (two_seeds / "s1" / "sweep.json").write_text("{")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ablation_table", str(two_seeds / "s1")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unreadable sweep state" in done.stderr


def test_over_seeds_paired_reevaluation_and_seeds_ahead(two_seeds):
    """The re-evaluations are compared per seed, like the window means; `seeds ahead` counts the
    seeds where the arm beats the reference in each measure, only over seeds that have both."""
    base0, base1 = two_seeds / "s0" / "arm=base,seed=0", two_seeds / "s1" / "arm=base,seed=1"
    _reeval(base0, 150.0, 10, dict(rest=20, crash=30))
    _reeval(base1, 100.0, 0, dict(crash=50))
    _reeval(two_seeds / "s1" / "arm=real,seed=1", 40.0, 5, dict(rest=10, crash=40))
    runs = load(two_seeds / "s0", "reeval.json") + load(two_seeds / "s1", "reeval.json")
    over = {r[0]: r for r in _rows(build(runs, 2000, None, "base"), "## Over seeds")[:2]}
    # real's re-evals 210 and 40 against base's 150 and 100: +60 and -60 -> 0 +- 84.9, 1 of 2
    assert over["real"][4:] == ["125.0 ± 120.2", "0.0 ± 84.9", "45/100", "2/2 and 1/2"]
    assert over["base"][4:] == ["125.0 ± 35.4", "-", "10/100", "-"]
    # a seed whose reference has no re-evaluation is left out of the paired figures
    (base1 / "reeval.json").unlink()
    runs = load(two_seeds / "s0", "reeval.json") + load(two_seeds / "s1", "reeval.json")
    over = {r[0]: r for r in _rows(build(runs, 2000, None, "base"), "## Over seeds")[:2]}
    assert over["real"][5:] == ["60.0", "45/100", "2/2 and 1/1"]
