"""Smoke tests of the benchmark scripts at tiny sizes, so they cannot rot; they check the outputs exist and
hold the rows they promise, not the speed (speed is measured by the scripts, never by tests)."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402
import full_cgd  # noqa: E402
import low_dim  # noqa: E402
import matrix_step_time  # noqa: E402
import multiplication  # noqa: E402
import noise_scale  # noqa: E402
import step_time  # noqa: E402
import suite  # noqa: E402


def test_compare_writes_table_and_plot(tmp_path, capsys):
    assert compare.main(["--task", "mlp", "--steps", "12", "--seeds", "2", "--device", "cpu", "--out",
                         str(tmp_path), "--optimizers", *compare.LEARNING_RATES["mlp"]]) == 0
    report = (tmp_path / "compare_mlp_cpu.md").read_text()
    for name in ("AdamW", "Muon + AdamW", "cgd.Muon + AdamW", "CGD eigenbasis"):
        assert f"| {name} |" in report
    assert "reached the lowest validation loss of the CGD modes" in report
    assert (tmp_path / "compare_mlp_cpu.png").stat().st_size > 1000


def test_compare_gpt_needs_data(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        compare.main(["--task", "gpt", "--data", str(tmp_path / "absent.txt"), "--steps", "2", "--out",
                      str(tmp_path)])


def test_compare_without_the_corpus_runs_the_mlp(tmp_path, capsys):
    assert compare.main(["--data", str(tmp_path / "absent.txt"), "--steps", "3", "--seeds", "1", "--device", "cpu",
                         "--optimizers", "AdamW", "CGD eigenbasis", "--out", str(tmp_path)]) == 0
    assert "no corpus at" in capsys.readouterr().err
    assert "MLP on the digits" in (tmp_path / "compare_mlp_cpu.md").read_text()


def test_compare_gpt_tiny(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    assert compare.main(["--data", str(text), "--steps", "3", "--seeds", "1", "--device", "cpu", "--optimizers",
                         "AdamW", "CGD eigenbasis", "--out", str(tmp_path)]) == 0
    assert "val loss" in (tmp_path / "compare_gpt_cpu.md").read_text()


def test_compare_names_an_unknown_row(tmp_path):
    with pytest.raises(SystemExit, match="no such row"):
        compare.main(["--task", "mlp", "--optimizers", "Adam", "--out", str(tmp_path)])


def test_compare_verdict_says_what_the_numbers_mean():
    baselines = {"AdamW": (2.10, 0.01), "Muon + AdamW": (1.98, 0.01)}
    win = compare.verdict({**baselines, "CGD eigenbasis": (1.90, 0.01), "cgd.Muon + AdamW": (1.99, 0.02)})
    assert win.startswith("CGD eigenbasis reached") and "below Muon + AdamW (1.980)" in win
    assert win.endswith("A CGD mode wins here.")
    level = compare.verdict({**baselines, "cgd.Muon + AdamW": (1.985, 0.01)})
    assert "level with Muon + AdamW" in level and "below AdamW" in level
    assert level.endswith("No CGD mode beats both baselines here.")
    assert compare.verdict(baselines).startswith("No CGD row finished")


def test_step_time_reports_every_optimizer(tmp_path):
    out = tmp_path / "step.md"
    assert step_time.main(["--device", "cpu", "--sizes", "1e4", "--no-gpt2", "--steps", "2", "--out", str(out)]) == 0
    report = out.read_text()
    for name in ("cgd.CGD", "AdamW foreach", "stream: copy", "stream: x += g"):
        assert f"| {name} |" in report
    assert "refused" not in report
    # "of peak" is relative to the faster stream, which so reads 100%
    streams = [line.split("|")[7].strip() for line in report.splitlines() if "| stream: " in line]
    assert "100%" in streams


def test_full_cgd_reports_every_solver_and_the_100k_model(tmp_path):
    out = tmp_path / "full.md"
    assert full_cgd.main(["--steps", "3", "--eigh-steps", "1", "--every", "2", "--big-steps", "2", "--window", "2",
                          "--out", str(out)]) == 0
    report = out.read_text()
    for row in ("| FullCGD lanczos |", "| FullCGD window 2 |", "| FullCGD eigh |", "| FullCGD window 2 (Table 2) |",
                "100,167 parameters"):
        assert row in report
    assert "nan" not in report


def test_noise_scale_reports_both_measurements(tmp_path):
    assert noise_scale.main(["--steps", "4", "--every", "2", "--draws", "3", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "noise_scale_cpu.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(rows) == 2
    assert (tmp_path / "noise_scale_cpu.png").stat().st_size > 1000


def test_direct_noise_scale_matches_its_definition():
    """A linear model at w = 0 with loss (w.x - 1/2)^2: each example's gradient is -x, so with x ~ N(1, I_8)
    G = -1 (|G|^2 = 8) and tr(Sigma) = 8 per example: B_simple = 1 example, measured within 25%."""
    torch = noise_scale.torch
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 8, generator=gen) + 1.0
    model = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    task = noise_scale.tasks.Task("linear", lambda: model, None,
                                  lambda m, xb, yb: ((m(xb).squeeze(1) - yb) ** 2).mean(), None,
                                  train_set=(x, torch.full((4000,), 0.5)))
    measured = noise_scale.direct_noise_scale(task, model, 200, gen)
    assert abs(measured - 1.0) < 0.25, measured


def test_gpt2_small_shapes():
    shapes = step_time.gpt2_small_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808


def test_multiplication_writes_report_and_plots(tmp_path):
    assert multiplication.main(["--steps", "3", "--seeds", "2", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "multiplication.md").read_text()
    for name in multiplication.OPTIMIZERS:
        assert f"| {name} |" in report
    assert "'diagonal_fallbacks': 0" in report
    for png in ("multiplication_loss.png", "multiplication_eigenvalues.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_matrix_step_time_reports_against_adamw(tmp_path):
    out = tmp_path / "matrix.md"
    assert matrix_step_time.main(["--device", "cpu", "--window", "1", "--only", "kron refresh=1", "--out",
                                  str(out)]) == 0
    report = out.read_text()
    assert "| AdamW foreach |" in report and "| kron refresh=1 |" in report and "refused" not in report


def test_low_dim_writes_table_and_plot(tmp_path):
    assert low_dim.main(["--steps", "5", "--functions", "Beale", "Himmelblau", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "low_dim.md").read_text()
    for name in ("Muon", "Induced: log-loss metric", "CGD (full)", "AdamW"):
        assert f"| {name} |" in report
    assert (tmp_path / "low_dim_trajectories.png").stat().st_size > 1000


def test_suite_writes_every_part(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    argv = ["--device", "cpu", "--scale", "cpu", "--parts", "rosenbrock", "mlp", "cnn", "gpt", "--steps", "2",
            "--optimizers", "AdamW", "Muon + AdamW", "CGD kron", "CGD eigenbasis", "SOAP", "--data", str(text),
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert suite.main(argv) == 0
    report = (tmp_path / "suite_cpu.md").read_text()
    assert "| CGD (full) |" in report and "| AdaBelief |" in report  # the paper's Table 1 rows
    for task in ("MLP on digits", "ResNet-style CNN", "character GPT"):
        assert f"## {task}" in report
    assert report.count("| CGD kron |") == 3 and "not applicable: torch.optim.Muon takes 2-D" in report
    assert report.count("| CGD eigenbasis |") == 3 and report.count("| SOAP |") == 3
    assert "(power=0.5); " in report and "(power=0.4); " in report  # the kron and eigenbasis knob runs
    for task in ("mlp", "cnn", "gpt"):
        assert (tmp_path / f"suite_cpu_{task}.png").stat().st_size > 1000
    # Every run is cached: a second suite over the same runs trains nothing and writes the same tables.
    cached = sorted((tmp_path / "cache").glob("*.json"))
    assert len(cached) >= 3 * 5 * (7 + 2)
    calls = []
    real = suite.train_run
    suite.train_run = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert suite.main(argv[:-4] + ["--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")]) == 0
    finally:
        suite.train_run = real
    assert calls == []
    again = (tmp_path / "again" / "suite_cpu.md").read_text()
    strip = lambda text: [line for line in text.splitlines()[2:] if "|" in line and "Rosenbrock" not in line]  # noqa
    assert [line.split("|")[1:6] for line in strip(again)] == [line.split("|")[1:6] for line in strip(report)]


def test_lr_grid_is_seven_points_and_widens_until_the_choice_is_inside():
    assert suite.log_grid(1e-3) == (3.16e-05, 0.0001, 0.000316, 0.001, 0.00316, 0.01, 0.0316)
    calls = []

    def run(lr, best=0.3):  # a loss with its minimum at lr = 0.3, past the grid's upper end
        calls.append(lr)
        if lr > 2.0:
            return {"failed": "diverged"}
        return {"final": {"val_loss": (math.log10(lr) - math.log10(best)) ** 2}}

    lr, result, trials = suite.choose_lr(run, suite.log_grid(1e-3))
    assert lr == 0.316 and result["final"]["val_loss"] < 1e-3
    assert list(trials) == sorted(trials) and max(trials) == 1.0  # widened to 0.1, 0.316, 1.0, then stopped
    assert len(calls) == 7 + 3
    lr, _, trials = suite.choose_lr(lambda x: run(x, best=1e-6), suite.log_grid(1e-3), widen=2)
    assert lr == min(trials) and len(trials) == 9  # at the lower end after the widening budget: reported as such
    lr, result, _ = suite.choose_lr(lambda x: {"failed": "diverged"}, (1e-3, 1e-2))
    assert lr != lr and result == {"failed": "diverged"}


def test_a_cgd_mode_tunes_its_knobs_within_the_same_seven_runs():
    calls = []

    def run(lr, knob):  # best at lr = 1e-3 with power 0.25
        calls.append((lr, dict(knob)))
        return {"final": {"val_loss": (math.log10(lr) + 3) ** 2 + (knob.get("power", 0.5) - 0.25) ** 2}}

    (lr, knob), result, trials = suite.choose_setting(run, suite.log_grid(1e-3), ({"power": 0.4}, {"power": 0.25}))
    assert (lr, knob) == (1e-3, {"power": 0.25}) and len(calls) == 7
    assert [c[0] for c in calls[:5]] == list(suite.log_grid(1e-3)[1:-1])  # the grid less an end each
    assert list(trials)[-2:] == ["0.001 (power=0.4)", "0.001 (power=0.25)"]
    (lr, knob), _, _ = suite.choose_setting(run, suite.log_grid(1e-3))
    assert knob == {} and lr == 1e-3
