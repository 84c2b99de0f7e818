"""`app-dist experiment`: plans every (setting, method, seed) run, trains them for real, and
writes a report whose generated block is replaced on a re-run while notes around it stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from app_dist.cli import main as cli_main
from app_dist.experiment.report import BEGIN, END, comparisons, mean_curves, write_report
from app_dist.experiment.runner import RunResult, is_finished
from app_dist.experiment.spec import PlannedRun, SettingSpec, load_experiment, plan_runs

from .conftest import REPO


def experiment_file(tmp_path: Path, shards: Path, **fields: str) -> Path:
    body = {
        "name": "tiny",
        "train_config": str(REPO / "configs/digits.yaml"),
        "methods": "[dense, app]",
        "seeds": "[1]",
        "runs_dir": str(tmp_path / "runs"),
        "report": str(tmp_path / "docs/RESULTS.md"),
        "plots_dir": str(tmp_path / "docs/plots"),
        "overrides": f"[data.shards={shards}, data.megabatches=2, train.epochs=1, "
                     "data.num_workers=0, log.wandb.mode=disabled]",
        "settings": "[{name: digits, title: digits smoke test}]",
        **fields,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in body.items()))
    return path


def test_plan_gives_every_method_the_same_seed_data_and_target(digits_shards, tmp_path):
    spec = load_experiment(experiment_file(tmp_path, digits_shards, methods="[dense, osp, app]",
                                           seeds="[1, 2]"))
    planned = plan_runs(spec)
    assert [(r.method, r.seed) for r in planned] == [
        ("dense", 1), ("osp", 1), ("app", 1), ("dense", 2), ("osp", 2), ("app", 2)]
    for run in planned:
        assert run.config.run.seed == run.seed and run.config.prune.method == run.method
        assert run.config.data.stream_seed == run.seed  # seeds vary the data, paired by seed
        assert run.config.data.shards == str(digits_shards)
        assert run.config.prune.sparsity_level == 4.5
        assert run.run_dir == tmp_path / "runs" / "digits" / f"{run.method}-seed{run.seed}"


@pytest.mark.parametrize("field, value, message", [
    ("methods", "[dense, sparse]", "'sparse' is not one of dense, osp, app"),
    ("seeds", "[1, 1]", "repeat a seed"),
    ("nproc", "0", "must be >= 1"),
    ("colour", "red", "colour"),
    ("overrides", "[train.epochz=1]", "train.epochz"),
])
def test_bad_experiment_files_fail_with_one_line(field, value, message, digits_shards, tmp_path,
                                                 capsys):
    path = experiment_file(tmp_path, digits_shards, **{field: value})
    assert cli_main(["experiment", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1


def test_an_experiment_over_missing_shards_stops_before_any_run_starts(tmp_path, capsys):
    path = experiment_file(tmp_path, tmp_path / "no-shards")
    assert cli_main(["experiment", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "no-shards" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # no run was started


def test_an_experiment_file_with_a_duplicate_key_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "experiment.yaml"
    path.write_text("name: a\ntrain_config: configs/digits.yaml\nname: b\n")
    assert cli_main(["experiment", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error == f"error: experiment file {path}, line 3: duplicate key 'name'\n"


def test_a_torn_last_metrics_line_is_not_a_finished_megabatch(digits_shards, tmp_path):
    """A crash while the last record was written leaves it without its newline: the run must
    train again (and resume), not be reported as finished."""
    spec = load_experiment(experiment_file(tmp_path, digits_shards, methods="[app]"))
    (run,) = plan_runs(spec)
    run.run_dir.mkdir(parents=True)
    metrics = run.run_dir / "metrics.jsonl"
    metrics.write_text('{"megabatch": 1}\n{"megabatch": 2, "test_acc')
    assert not is_finished(run)
    metrics.write_text('{"megabatch": 1}\n{"megabatch": 2}\n')
    assert is_finished(run)


def test_report_block_is_replaced_and_notes_around_it_survive(tmp_path):
    report = tmp_path / "RESULTS.md"
    write_report(report, f"{BEGIN}\nfirst\n{END}", title="Results")
    text = report.read_text()
    report.write_text(text.replace("# Results\n", "# Results\n\nmy intro\n") + "\nmy notes\n")
    write_report(report, f"{BEGIN}\nsecond\n{END}", title="Results")
    text = report.read_text()
    assert "my intro" in text and "my notes" in text and "second" in text
    assert "first" not in text and text.count(BEGIN) == 1


@pytest.mark.slow
def test_experiment_trains_reports_and_skips_finished_runs(digits_shards, tmp_path, capsys):
    path = experiment_file(tmp_path, digits_shards)
    assert cli_main(["experiment", str(path)]) == 0
    assert "training" in capsys.readouterr().out
    report = (tmp_path / "docs/RESULTS.md").read_text()
    assert f"app-dist experiment {path}" in report
    rows = [line for line in report.splitlines() if line.startswith(("| dense |", "| app |"))]
    assert len(rows) == 2 and "0.366" in rows[1] and "1.000" in rows[0]
    assert "APP - dense, same seed: final test accuracy" in report
    for key in ("test_accuracy", "cer", "density", "generalization_gap"):
        png = tmp_path / "docs/plots" / f"tiny-digits-{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/tiny-digits-{key}.png)" in report
    for method in ("dense", "app"):
        assert (tmp_path / "runs/digits" / f"{method}-seed1" / "model-sparse.pt").is_file()

    assert cli_main(["experiment", str(path)]) == 0
    assert capsys.readouterr().out.count("finished already") == 2


def _result(method: str, seed: int, gap: float) -> RunResult:
    record = {"test_accuracy": 0.5, "cer": 1.0, "generalization_gap": gap}
    run = PlannedRun(SettingSpec(name="s"), method, seed, Path("."), [], None)  # type: ignore[arg-type]
    return RunResult(run, [record], sparse_bytes=1, dense_bytes=1)


def test_gap_comparisons_count_distance_from_zero_not_the_signed_difference():
    """Gaps are often negative (validation above train accuracy): APP at -0.5 against OSP at
    -3.0 has the higher signed gap but the smaller one, and the sentence must say so."""
    results = [_result("app", 1, -0.5), _result("osp", 1, -3.0),
               _result("app", 2, 2.0), _result("osp", 2, -1.0), _result("dense", 1, -0.25)]
    osp, dense = comparisons(results)
    assert ("generalisation gap at T (train - validation accuracy) APP +0.75 vs OSP -2.00 "
            "points (APP's closer to zero in 1 of 2)") in osp
    assert "APP -0.50 vs dense -0.25 points (APP's closer to zero in 0 of 1)" in dense
    assert "better" not in osp.split("generalisation gap")[1]


def test_plots_shade_the_spread_of_the_seeds_around_their_mean(tmp_path):
    """Three seeds: the curve is their mean and the band runs from the lowest to the highest
    seed at each megabatch; the PNG differs from the same mean drawn without the band."""
    from matplotlib.image import imread

    from app_dist.results.plots import plot_runs

    def seed_run(seed: int, accuracy: float) -> RunResult:
        records = [{"megabatch": t, "test_accuracy": accuracy + t / 100, "cer": 1.0,
                    "density": 0.5, "generalization_gap": 0.0} for t in (1, 2, 3)]
        run = PlannedRun(SettingSpec(name="s"), "app", seed, Path("."), [], None)  # type: ignore[arg-type]
        return RunResult(run, records, sparse_bytes=1, dense_bytes=1)

    curves = mean_curves([seed_run(1, 0.5), seed_run(2, 0.6), seed_run(3, 0.9)])
    first = curves[0]
    assert first["test_accuracy"] == pytest.approx((0.51 + 0.61 + 0.91) / 3)
    assert (first["test_accuracy_low"], first["test_accuracy_high"]) == (0.51, 0.91)
    banded = plot_runs({"app": curves}, "test_accuracy", "acc", tmp_path / "band.png")
    plain = plot_runs({"app": [{"megabatch": r["megabatch"], "test_accuracy": r["test_accuracy"]}
                               for r in curves]}, "test_accuracy", "acc", tmp_path / "plain.png")
    # The band and its wider y-range change a large share of the figure's pixels.
    assert (imread(banded) != imread(plain)).any(axis=-1).mean() > 0.05
