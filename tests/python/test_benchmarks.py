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
import low_dim  # noqa: E402
import matrix_step_time  # noqa: E402
import multiplication  # noqa: E402
import step_time  # noqa: E402
import suite  # noqa: E402


def test_compare_writes_table_and_plot(tmp_path, capsys):
    assert compare.main(["--steps", "12", "--seeds", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "compare_digits_cpu.md").read_text()
    for name in ("cgd.CGD", "torch.optim.Adam", "torch.optim.AdamW"):
        assert f"| {name} |" in report
    assert (tmp_path / "compare_digits_cpu.png").stat().st_size > 1000


def test_compare_shakespeare_needs_data(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        compare.main(["--task", "shakespeare", "--steps", "2", "--out", str(tmp_path)])


def test_compare_shakespeare_tiny(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    assert compare.main(["--task", "shakespeare", "--data", str(text), "--steps", "3", "--seeds", "1",
                         "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "val_ppl" in (tmp_path / "compare_shakespeare_cpu.md").read_text()


def test_step_time_reports_every_optimizer(tmp_path):
    out = tmp_path / "step.md"
    assert step_time.main(["--device", "cpu", "--sizes", "1e4", "--no-gpt2", "--steps", "2", "--out", str(out)]) == 0
    report = out.read_text()
    for name in ("cgd.CGD", "AdamW foreach"):
        assert f"| {name} |" in report
    assert "refused" not in report


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
    assert suite.main(["--device", "cpu", "--scale", "cpu", "--parts", "rosenbrock", "mlp", "cnn", "gpt", "--steps",
                       "2", "--optimizers", "AdamW", "Muon + AdamW", "CGD kron", "--data", str(text),
                       "--out", str(tmp_path)]) == 0
    report = (tmp_path / "suite_cpu.md").read_text()
    assert "| CGD (full) |" in report and "| AdaBelief |" in report  # the paper's Table 1 rows
    for task in ("MLP on digits", "ResNet-style CNN", "character GPT"):
        assert f"## {task}" in report
    assert report.count("| CGD kron |") == 3 and "not applicable: torch.optim.Muon takes 2-D" in report
    for task in ("mlp", "cnn", "gpt"):
        assert (tmp_path / f"suite_cpu_{task}.png").stat().st_size > 1000


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
