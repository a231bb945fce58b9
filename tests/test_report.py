"""engine.report: plots and summary from metrics.jsonl, on synthetic runs and one real tiny run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import report

ROOT = Path(__file__).resolve().parent.parent
TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1


def write_metrics(run_dir: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    return run_dir


def synthetic(reach_at: int | None, scale: float = 1.0) -> list:
    """Train lines every 20 steps (wall = step s), evals every 10 steps with return 45 x step/10
    capped at 500 (so >= 450 first at step `reach_at`), an episode every 10 steps."""
    recs = []
    for step in range(10, 101, 10):
        env = step * 10
        recs.append(dict(type="episode", step=step, env_steps=env, episode_return=step / 2))
        if step % 20 == 0:
            warm = step < 40
            recs.append(
                dict(
                    type="train",
                    step=step,
                    env_steps=env,
                    wall_time=float(step),
                    wm_loss=1000.0 * scale / step,
                    image_loss=0.5 / step,
                    reward_loss=0.7,
                    kl_dyn=1.0,
                    kl_rep=1.1,
                    actor_loss=None if warm else -0.1,
                    actor_entropy=None if warm else 0.6 * scale,
                    critic_loss=None if warm else 2.0,
                    dream_value=None if warm else 5.0 * step * scale,
                    return_scale=None if warm else 1.0,
                    train_steps_per_sec=1.0,
                )
            )
        ret = 500.0 if reach_at is not None and step >= reach_at else 4.0 * step
        recs.append(
            dict(
                type="eval",
                step=step,
                env_steps=env,
                eval_return=ret,
                eval_return_std=3.0,
                eval_returns=[ret - 3, ret + 3],
            )
        )
    return recs


def has_color(path: Path, rgb: tuple[int, int, int], tol: int = 12) -> bool:
    """Whether the plot area (above the run legend at the bottom) holds that colour."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)[:-60]
    return bool((np.abs(a - np.array(rgb)).max(-1) <= tol).any())


def run_main(args: list, capsys) -> tuple[int, str, str]:
    try:
        report.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_stopped_members_numbers_end_at_its_stop(tmp_path, capsys):
    """A population member solved at step 60 stops training (no train lines after it) but keeps
    being evaluated and stepping its envs to step 100. Its summary is its own up to step 60
    (60 steps in its 60 s, final eval that of step 60); the frozen agent's evals and episodes
    after it are one line of their own, pooled."""
    recs = [r for r in synthetic(reach_at=30) if r["type"] != "train" or r["step"] <= 60]
    for r in recs:  # the frozen agent's evals differ from the last one before its stop
        if r["type"] == "eval" and r["step"] > 60:
            r.update(eval_return=400.0, eval_returns=[300.0, 500.0])
    recs.append(dict(type="solved", step=60, env_steps=600, reason="3 evaluations in a row"))
    run = write_metrics(tmp_path / "member_00", recs)
    code, stdout, err = run_main([run, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "steps 60, env steps 600, wall time 60.0 s, 1 steps/s" in stdout
    assert "eval: 6 evaluations, final 500.0 (step 60, env step 600)" in stdout
    assert "training episodes: 6, last 30.0" in stdout
    assert "solved at step 60: 3 evaluations in a row" in stdout
    assert (
        "after its stop at step 60 (weights frozen, the others trained on): 4 evals, 8 episodes "
        "of its final agent: mean 400.0 +- 100.0, median 400.0, 4/8 >= 450; 4 training "
        "episodes (sampled actions), mean 42.5"
    ) in stdout
    # A run that trained on past such a record (resumed further) has no stop.
    recs.append(dict(type="train", step=100, env_steps=1000, wall_time=100.0))
    assert report.load_run(write_metrics(tmp_path / "resumed", recs)).stop_step is None


def test_two_runs_are_overlaid_and_summarised(tmp_path, capsys):
    a = write_metrics(tmp_path / "run_a", synthetic(reach_at=30))
    b = write_metrics(tmp_path / "run_b", synthetic(reach_at=None, scale=3.0))
    out = tmp_path / "out"
    code, stdout, err = run_main([a, b, "--out", out], capsys)
    assert code == 0, err
    for name in ("losses.png", "eval.png", "behavior.png", "summary.txt"):
        assert (out / name).is_file(), name
    for name in ("losses.png", "eval.png", "behavior.png"):
        png = out / name
        assert Image.open(png).format == "PNG"
        # Both runs drawn: matplotlib's first two cycle colours appear in every plot.
        assert has_color(png, TAB_BLUE) and has_color(png, TAB_ORANGE), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    text = (out / "summary.txt").read_text()
    assert stdout == text
    first, second = text.split("\n\n")
    assert "run_a" in first and "run_b" in second
    assert "steps 100, env steps 1,000, wall time 100.0 s, 1 steps/s" in first
    # First >= 450 at the step-30 eval (env 300); wall interpolated between steps 20 and 40.
    assert "first eval >= 450: 500.0 at env step 300, 30 s wall (step 30)" in first
    assert "first eval >= 450: never" in second
    assert "final 400.0 (step 100, env step 1,000), best 400.0" in second
    assert "wm_loss 30" in second and "actor_loss -0.1" in second
    assert "training episodes: 10, last 50.0" in first


def test_target_option(tmp_path, capsys):
    a = write_metrics(tmp_path / "r", synthetic(reach_at=None))
    code, stdout, _ = run_main([a, "--target", "200"], capsys)
    assert code == 0
    assert "first eval >= 200: 200.0 at env step 500, 50 s wall (step 50)" in stdout


def test_default_out_dirs(tmp_path, capsys, monkeypatch):
    a = write_metrics(tmp_path / "a", synthetic(30))
    b = write_metrics(tmp_path / "b", synthetic(None))
    assert run_main([a], capsys)[0] == 0
    assert (a / "report" / "losses.png").is_file()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert run_main([a, b], capsys)[0] == 0
    assert run_main([a, b], capsys)[0] == 0  # a second report gets its own folder
    outs = sorted(p for p in cwd.iterdir() if p.name.startswith("report_"))
    assert len(outs) == 2
    assert all((p / "eval.png").is_file() for p in outs)


def test_unreadable_lines_are_skipped_with_a_note(tmp_path, capsys):
    recs = synthetic(30)
    bad = (
        '{"type": "train", "step": 5',  # cut off by a kill
        "not json at all",
        "[1, 2, 3]",
        '{"type": "early_stop", "step": 105, "reason": "wm_loss flat for 5 evals"}',
        json.dumps(dict(type="train", step=110, env_steps=1100, wall_time=110.0, wm_loss="nan")),
    )
    a = write_metrics(tmp_path / "r", recs, bad)
    code, stdout, err = run_main([a], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert "note: skipped 3 unreadable line(s)" in err
    assert "(line 26, 27, 28)" in err
    assert "early_stop at step 105: wm_loss flat for 5 evals" in stdout
    # The NaN string is read back as NaN, so the final wm_loss is the last finite one.
    assert "wm_loss 10," in stdout and "steps 110" in stdout
    assert "note: skipped 3 unreadable" in (a / "report" / "summary.txt").read_text()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such run directory"),
        (lambda p: p.mkdir(), "not a run directory (no metrics.jsonl)"),
        (lambda p: write_metrics(p, []), "no metric records yet"),
        (lambda p: write_metrics(p, [], ("garbage",)), "no metric records yet"),
    ],
)
def test_bad_run_dirs_fail_with_one_line(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    code, _, err = run_main([run], capsys)
    assert code == 2
    lines = [x for x in err.splitlines() if not x.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_an_empty_run_among_several_is_left_out(tmp_path, capsys):
    a = write_metrics(tmp_path / "a", synthetic(30))
    empty = write_metrics(tmp_path / "empty", [])
    code, stdout, err = run_main([a, empty, "--out", tmp_path / "o"], capsys)
    assert code == 0
    assert "empty: no metric records yet; left out" in err
    assert "(a)" in stdout and "(empty)" not in stdout


def test_out_that_is_a_file_fails(tmp_path, capsys):
    a = write_metrics(tmp_path / "a", synthetic(30))
    (tmp_path / "f").write_text("x")
    code, _, err = run_main([a, "--out", tmp_path / "f"], capsys)
    assert code == 2 and err.strip() == f"error: --out {tmp_path / 'f'}: exists and is not a folder"


def test_missing_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    a = write_metrics(tmp_path / "a", synthetic(30))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_main([a], capsys)
    assert code == 2
    assert err == "error: engine.report needs matplotlib: pip install matplotlib\n"
    assert not (a / "report").exists()


def test_num_and_wall_time_interpolation():
    assert math.isnan(report.num(None)) and math.isnan(report.num(True))
    assert math.isnan(report.num("nan")) and report.num("inf") == math.inf
    assert report.num(3) == 3.0 and math.isnan(report.num("abc"))
    run = report.Run(Path("x"))
    run.train = [dict(step=10, env_steps=100, wall_time=5.0), dict(step=30, env_steps=300)]
    run.train.append(dict(step=20, env_steps=200, wall_time=15.0))
    evals = [dict(step=5), dict(step=15), dict(step=20, wall_time=99.0), dict(step=40)]
    # Sorted by step, anchored at (0, 0); a logged wall_time wins; beyond the last: clamped.
    np.testing.assert_allclose(report.wall_times(run, evals, "step"), [2.5, 10.0, 99.0, 15.0])
    eps = [dict(env_steps=150)]
    np.testing.assert_allclose(report.wall_times(run, eps, "env_steps"), [10.0])
    # Without training lines only logged wall times are known.
    no_train = report.wall_times(report.Run(Path("y")), evals, "step")
    np.testing.assert_allclose(no_train, [np.nan, np.nan, 99.0, np.nan])


def test_log_scale_only_where_it_helps():
    assert report._use_log([np.array([1000.0, 10.0]), np.array([5.0])])
    assert not report._use_log([np.array([1.0, 2.0])])
    assert not report._use_log([np.array([-1.0, 100.0])])  # actor_loss can be negative
    assert not report._use_log([])


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "tiny"
    train = subprocess.run(
        [sys.executable, "-m", "engine.run", "--config", "configs/tiny.toml"]
        + ["--run-dir", str(run_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr
    done = subprocess.run(
        [sys.executable, "-m", "engine.report", str(run_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = run_dir / "report"
    for name in ("losses.png", "eval.png", "behavior.png", "summary.txt"):
        assert (out / name).is_file(), name
    text = (out / "summary.txt").read_text()
    assert "steps 12, env steps" in text and "eval: 2 evaluations" in text
    # The trainer's field names reach the summary.
    for key in ("image_loss", "reward_loss_excess", "kl_dyn", "critic_loss", "actor_entropy"):
        assert f"{key} " in text, key


def test_target_follows_the_task_unless_given(tmp_path, capsys):
    lunar = write_metrics(tmp_path / "lunar", synthetic(reach_at=None))
    (lunar / "config.toml").write_text('[env]\nname = "LunarLander-v3"\n')
    plain = write_metrics(tmp_path / "plain", synthetic(reach_at=None))  # no config.toml
    (tmp_path / "bad").mkdir()
    bad = write_metrics(tmp_path / "bad", synthetic(reach_at=None))
    (bad / "config.toml").write_text("[env\n")  # unreadable: falls back like a missing one
    code, stdout, _ = run_main([lunar, plain, bad, "--out", tmp_path / "o"], capsys)
    assert code == 0
    assert "first eval >= 200: 200.0 at env step 500" in stdout
    assert stdout.count("first eval >= 450: never") == 2
    code, stdout, _ = run_main([lunar, "--target", "300", "--out", tmp_path / "o2"], capsys)
    assert "first eval >= 300: 320.0 at env step 800" in stdout


def _dashed_gray_rows(png: Path) -> int:
    """Rows of eval.png where much of the width is the target line's mid gray (0.35 = 89,
    lighter where antialiased); black spines and the light grid do not count."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    neutral = img.max(-1) - img.min(-1) <= 6
    gray = neutral & (img.mean(-1) >= 60) & (img.mean(-1) <= 200)
    return int((gray.sum(1) > 0.4 * img.shape[1]).sum())  # text rows reach ~0.2


def test_eval_plot_draws_the_target_line(tmp_path, capsys, monkeypatch):
    a = write_metrics(tmp_path / "a", synthetic(reach_at=None))  # evals 40..400
    assert run_main([a, "--out", tmp_path / "with"], capsys)[0] == 0
    assert _dashed_gray_rows(tmp_path / "with" / "eval.png") >= 1
    # A target far above every return is still drawn (the axis grows to show it).
    assert run_main([a, "--target", "5000", "--out", tmp_path / "far"], capsys)[0] == 0
    assert _dashed_gray_rows(tmp_path / "far" / "eval.png") >= 1
    # Control: the same plot with axhline disabled has no such row.
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda *args, **kwargs: None)
    assert run_main([a, "--out", tmp_path / "none"], capsys)[0] == 0
    assert _dashed_gray_rows(tmp_path / "none" / "eval.png") == 0


def with_ends(records: list, kinds: tuple[str, ...], counts: list) -> list:
    """The eval lines of `records`, in order, given `eval_<kind>` counts from `counts`."""
    evals = iter(counts)
    out = []
    for r in records:
        if r["type"] == "eval":
            r = {**r, **{f"eval_{k}": int(n) for k, n in zip(kinds, next(evals))}}
        out.append(r)
    return out


GREEN, RED, PURPLE, ORANGE = (
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    TAB_ORANGE,
)  # C2 C3 C4 C1


def test_ends_figure_and_summary_split(tmp_path, capsys):
    """LunarLander eval lines with rest / crash / time-limit counts, a CartPole run with
    terminated / time-limit counts, and a run logged before these fields."""
    lunar_counts = [(i, 8 - i, 2) for i in range(8)] + [(7, 2, 1), (6, 1, 3)]
    recs = with_ends(synthetic(None), ("rest", "crash", "time_limit"), lunar_counts)
    recs = [
        {**r, "eval_terminated": r["eval_rest"] + r["eval_crash"]} if "eval_rest" in r else r
        for r in recs
    ]
    lunar = write_metrics(tmp_path / "lunar", recs)
    (lunar / "config.toml").write_text('[env]\nname = "LunarLander-v3"\n')
    cart_counts = [(10 - i, i) for i in range(10)]
    cart = write_metrics(
        tmp_path / "cart", with_ends(synthetic(30), ("terminated", "time_limit"), cart_counts)
    )
    old = write_metrics(tmp_path / "old", synthetic(30))
    out = tmp_path / "o"
    code, stdout, err = run_main([lunar, cart, old, "--out", out], capsys)
    assert code == 0, err
    png = out / "ends.png"
    assert Image.open(png).format == "PNG"
    for rgb in (GREEN, RED, PURPLE, ORANGE):  # one colour per end kind
        assert has_color(png, rgb), rgb
    assert "ends.png" in err
    lunar_text, cart_text, old_text = stdout.split("\n\n")
    assert (
        "  ends of the last eval (step 100, env step 1,000): 6 rest, 1 crash, "
        "3 at the time limit (of 10 episodes)\n" in lunar_text
    )
    split = "1 terminated, 9 at the time limit (of 10 episodes)"
    assert f"ends of the last eval (step 100, env step 1,000): {split}" in cart_text
    assert "ends of the last eval" not in old_text  # no such fields: reported as before
    assert stdout == (out / "summary.txt").read_text()


def test_no_ends_figure_without_the_fields(tmp_path, capsys):
    # eval_terminated alone (CartPole runs before eval_time_limit) is not a split.
    recs = [{**r, "eval_terminated": 2} if r["type"] == "eval" else r for r in synthetic(30)]
    a = write_metrics(tmp_path / "a", recs)
    code, stdout, err = run_main([a, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "behavior.png",
        "eval.png",
        "losses.png",
        "summary.txt",
    ]
    assert "ends of the last eval" not in stdout


def test_end_counts_skips_unusable_eval_lines():
    run = report.Run(Path("x"), task="LunarLander-v3")
    good = dict(step=1, env_steps=10, eval_rest=1, eval_crash=0, eval_time_limit=1)
    good["eval_terminated"] = 1  # as the trainer writes it for every task
    run.evals = [
        good,
        dict(good, step=2, eval_crash=None),  # not a number
        dict(good, step=3, eval_rest=0, eval_time_limit=0),  # no episodes
        dict(step=4, env_steps=40, eval_return=1.0),  # logged before the fields
        dict(good, step=5, env_steps=50, eval_crash=3),
    ]
    kinds, x, counts, recs = report.end_counts(run)
    assert kinds == ("rest", "crash", "time_limit") and [r["step"] for r in recs] == [1, 5]
    np.testing.assert_array_equal(x, [10, 50])
    np.testing.assert_array_equal(counts, [[1, 0, 1], [1, 3, 1]])
    # A run of unknown task (no config.toml) is matched by its fields, the longest set first.
    run.task = ""
    assert report.run_end_kinds(run) == ("rest", "crash", "time_limit")
    run.task = "CartPole-v1"
    assert report.run_end_kinds(run) == ("terminated", "time_limit")
    assert report.end_counts(run)[2].tolist() == [[1, 1], [1, 1], [1, 0], [1, 1]]
    run.evals = [dict(step=1, env_steps=10, eval_terminated=2)]  # before eval_time_limit
    assert report.run_end_kinds(run) is None and report.end_counts(run)[0] == ()
    np.testing.assert_allclose(report._bar_widths(np.array([10.0, 20.0, 40.0])), [9, 9, 18])
    np.testing.assert_allclose(report._bar_widths(np.array([100.0])), [5.0])


def test_report_never_imports_torch(tmp_path):
    """The report runs beside training in a second: engine.episodes' end kinds come without
    torch."""
    a = write_metrics(tmp_path / "a", synthetic(30))
    code = (
        "import sys; from engine import report; "
        f"report.main([{str(a)!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_eval_ylim_zooms_only_past_outliers():
    rng = np.random.default_rng(0)
    curve = list(rng.uniform(-150.0, 250.0, 500))
    assert report.eval_ylim(curve) is None  # nothing to clip: the whole range is shown
    assert report.eval_ylim([1.0, -2000.0]) is None  # too few points to call one an outlier
    lo, hi = report.eval_ylim(curve + [-2179.8, -2447.1, -3384.1])
    assert -200.0 < lo < -140.0 and 240.0 <= hi < 280.0
    # A value just past the central range is kept in view rather than clipped.
    lo, hi = report.eval_ylim(curve + [-2179.8, -2447.1, -3384.1, 260.0])
    assert hi >= 260.0


def test_eval_ylim_keeps_where_each_run_ended_in_view():
    # cartpole_d256 (2026-12-06): 1,000 training episodes of 10-50, then 20 of 500 as it solved.
    rng = np.random.default_rng(0)
    early = list(rng.uniform(10.0, 50.0, 1000))
    late = [500.0] * 20
    lo, hi = report.eval_ylim(early + late)
    assert hi < 500.0  # alone, the late 500s look like a tail to cut
    assert report.eval_ylim(early + late, keep=[500.0]) is None  # the run ended there: all shown
    # An early crash tail is still cut when the run ended inside the central range.
    lo, hi = report.eval_ylim(early + [-2000.0] * 5, keep=[45.0])
    assert lo > -100.0 and hi >= 45.0
    # A kept value inside the zoom changes nothing; NaN is ignored.
    assert report.eval_ylim(early + [-2000.0] * 5, keep=[30.0, math.nan]) == (lo, hi)


def _eval_axes(runs, monkeypatch, ylim=None):
    """plot_eval's figure (not saved): its two axes and its suptitle text."""
    seen = {}
    monkeypatch.setattr(report, "_save", lambda fig, canvas, path: seen.setdefault("fig", fig))
    assert report.plot_eval(runs, Path("unused.png"), ylim=ylim)
    fig = seen["fig"]
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return fig.axes[:2], title


def test_eval_plot_clips_outliers_to_the_edge(tmp_path, monkeypatch):
    recs = synthetic(reach_at=None)  # evals 40..400, episodes 5..50
    recs += [
        dict(r, episode_return=r["episode_return"] + 1.0) for r in recs if r["type"] == "episode"
    ]
    # mid-run (a run's latest eval always stays in view)
    recs.append(dict(type="eval", step=55, env_steps=550, eval_return=-5000.0))
    run = report.load_run(write_metrics(tmp_path / "a", recs))
    (ax_env, ax_wall), title = _eval_axes([run], monkeypatch)
    lo, hi = ax_env.get_ylim()
    assert -200.0 < lo < 5.0 and hi >= 450.0, (lo, hi)  # the -5000 eval is not in range
    assert "1 returns beyond it" in title and "--ylim" in title
    # The clipped eval is drawn as a down-triangle on the lower edge.
    tri = [ln for ln in ax_env.lines if ln.get_marker() == "v"]
    assert len(tri) == 1 and list(tri[0].get_ydata()) == [lo]
    # Without the outlier the axis shows everything and says nothing.
    run = report.load_run(write_metrics(tmp_path / "b", recs[:-1]))
    (ax_env, _), title = _eval_axes([run], monkeypatch)
    assert title == "" and not [ln for ln in ax_env.lines if ln.get_marker() == "v"]
    # --ylim overrides the automatic range; an empty end stays automatic.
    run = report.load_run(write_metrics(tmp_path / "c", recs))
    (ax_env, _), title = _eval_axes([run], monkeypatch, ylim=(-6000.0, math.nan))
    assert ax_env.get_ylim()[0] == -6000.0 and title == ""


@pytest.mark.parametrize("text", ["-300", "a:b", "5:1", "1:2:3"])
def test_bad_ylim_is_one_line(tmp_path, capsys, text):
    a = write_metrics(tmp_path / "a", synthetic(reach_at=None))
    code, _, err = run_main([a, f"--ylim={text}", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--ylim" in err


def test_ylim_option_writes_the_report(tmp_path, capsys):
    a = write_metrics(tmp_path / "a", synthetic(reach_at=None))
    code, _, _ = run_main([a, "--ylim=-300:", "--out", tmp_path / "o"], capsys)
    assert code == 0 and (tmp_path / "o" / "eval.png").is_file()


def test_a_population_run_is_its_members_with_their_mean(tmp_path, capsys):
    """engine.report on a population's run directory overlays its member_* runs and draws
    their mean (black) with the std band across members; the report lands in RUN_DIR/report."""
    pop = tmp_path / "pop"
    write_metrics(pop, [dict(type="train", step=20, env_steps=200, members_training=2)])
    write_metrics(pop / "member_00", synthetic(reach_at=30))
    write_metrics(pop / "member_01", synthetic(reach_at=None, scale=3.0))
    code, stdout, err = run_main([pop], capsys)
    assert code == 0, err
    png = pop / "report" / "eval.png"
    assert has_color(png, TAB_BLUE) and has_color(png, TAB_ORANGE) and has_color(png, (0, 0, 0))
    first, second = stdout.split("\n\n")
    assert "member_00" in first and "member_01" in second
    runs = [report.load_run(pop / m) for m in ("member_00", "member_01")]
    env, mean, std = report.member_mean(runs)
    assert env.tolist() == [100.0 * k for k in range(1, 11)]
    # Step 30: member 0 is at 500, member 1 at 4 x 30 = 120.
    assert mean[2] == 310.0 and std[2] == 190.0
    assert report.member_mean(runs[:1]) is None


def test_two_populations_means_differ_in_dash_and_name(tmp_path, monkeypatch):
    """Two populations in one eval.png: each mean is a black line with its own dash, labelled
    with its run directory's name (before, both were solid and labelled (1) and (2))."""
    groups = []
    for name, scale in (("pbt", 1.0), ("plain", 3.0)):
        for m in ("member_00", "member_01"):
            write_metrics(tmp_path / name / m, synthetic(reach_at=None, scale=scale))
        groups.append([report.load_run(tmp_path / name / m) for m in ("member_00", "member_01")])
    seen = {}
    monkeypatch.setattr(report, "_save", lambda fig, canvas, path: seen.setdefault("fig", fig))
    assert report.plot_eval([r for g in groups for r in g], Path("unused.png"), populations=groups)
    ax_env = seen["fig"].axes[0]
    means = {ln.get_label(): ln.get_linestyle() for ln in ax_env.lines if ln.get_color() == "black"}
    assert means == {"pbt: mean of 2 members": "-", "plain: mean of 2 members": "--"}
    # Two populations of the same directory name are told apart by their paths.
    names = report.population_names([[report.load_run(tmp_path / "pbt" / "member_00")]] * 2)
    assert names == [str(tmp_path / "pbt")] * 2


def test_runs_sharing_a_name_are_labelled_by_the_shortest_tail_that_differs(tmp_path):
    p = tmp_path
    assert report.short_names([p / "a", p / "b"]) == ["a", "b"]
    assert report.short_names([p / "pbt" / "member_00", p / "plain" / "member_00"]) == [
        "pbt/member_00",
        "plain/member_00",
    ]
    names = report.short_names([p / "s1" / "x" / "m", p / "s2" / "x" / "m", p / "y"])
    assert names == ["s1/x/m", "s2/x/m", "y"]


def test_a_link_to_a_run_is_labelled_by_its_own_name(tmp_path):
    """engine.sweep --population names each run by a link to its member's directory: the
    report labels it by the link (the arm), not by the member directory it points to."""
    member = tmp_path / "population_00" / "member_01"
    member.mkdir(parents=True)
    link = tmp_path / "arm=real,seed=0"
    link.symlink_to(member, target_is_directory=True)
    assert report.short_names([link, tmp_path / "arm=all,seed=0"]) == [
        "arm=real,seed=0",
        "arm=all,seed=0",
    ]
    assert report.short_names([Path(".")]) == [Path.cwd().name]
