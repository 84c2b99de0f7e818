"""`app-dist`: the subcommand table, --help everywhere, one-line errors, inspect and demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app_dist.cli import SUBCOMMANDS, main
from tests.conftest import REPO


def app_dist(*args: str, cwd: Path = REPO, timeout: int = 300
             ) -> subprocess.CompletedProcess[str]:
    """The CLI as users run it, in a fresh interpreter (slow on a loaded machine: torch)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "app_dist.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process: exit code, stdout and stderr as a subprocess would give them."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's --help in subcommands that do not catch it
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["app-dist", *args], code, out, err)


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_help_lists_every_subcommand_with_its_description() -> None:
    result = app_dist("--help")
    assert result.returncode == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in
              result.stdout.split("subcommands:\n")[1].split("\n\n")[0].splitlines()}
    assert listed == {name: about for name, (_, about) in SUBCOMMANDS.items()}
    assert {"shards", "train", "report", "inspect", "demo"} <= set(SUBCOMMANDS)


def test_console_script_is_installed() -> None:
    script = shutil.which("app-dist") or str(Path(sys.executable).parent / "app-dist")
    assert Path(script).exists(), "pip install -e . installs the app-dist console script"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "subcommands:" in result.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and name in result.stdout.splitlines()[0]


def test_usage_errors_are_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    assert "choose one of: shards, train" in assert_one_line_usage_error(app_dist("trian"))
    assert cli(capsys).returncode == 2  # no subcommand: usage on stdout, exit 2
    message = assert_one_line_usage_error(cli(capsys, "report"))
    assert "RUN_DIR" in message and "app-dist report --help" in message
    message = assert_one_line_usage_error(cli(capsys, "inspect", "a", "b"))
    assert "unrecognized arguments: b" in message
    message = assert_one_line_usage_error(cli(capsys, "demo", "train.epochz=1"))
    assert "train.epochz" in message
    assert "--nproc 0" in assert_one_line_usage_error(cli(capsys, "demo", "--nproc", "0"))
    message = assert_one_line_usage_error(cli(capsys, "train", "--config", "configs/none.yaml"))
    assert "configs/none.yaml does not exist" in message


@pytest.mark.slow
def test_inspect_a_finished_run(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = app_dist("inspect", str(finished_run))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "megabatch 2 of 2" in text
    assert "megabatch-0001  ok" in text and "megabatch-0002  ok" in text
    assert "finished (megabatch-0002 verifies)" in text
    assert "digits_cnn" in text and "app/snip global, final density 0.366" in text

    info = json.loads(cli(capsys, "inspect", str(finished_run), "--json").stdout)
    assert info["resumable"] is True and info["megabatch_reached"] == 2
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text()
               .splitlines()]
    assert info["metrics"] == records
    # The densities come from the checkpoint's masks and agree with what the loop logged.
    assert {name: round(entry["density"], 6) for name, entry in info["layer_density"].items()} \
        == {name: round(value, 6) for name, value in records[-1]["layer_density"].items()}
    kept = sum(entry["kept"] for entry in info["layer_density"].values())
    assert kept == records[-1]["kept_parameters"]


@pytest.mark.slow
def test_inspect_reports_a_damaged_newest_checkpoint(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with (run / "checkpoints" / "megabatch-0002" / "state.pt").open("r+b") as state:
        state.truncate(100)
    info = json.loads(cli(capsys, "inspect", str(run), "--json").stdout)
    assert info["resumable"] is False
    assert "megabatch-0002 is unusable (state.pt does not match its sha256" in info["resume"]
    assert "fall back to megabatch-0001" in info["resume"]
    assert info["layer_density_source"] == "masks in megabatch-0001"

    damaged = cli(capsys, "inspect", str(run / "checkpoints" / "megabatch-0002"))
    assert damaged.returncode == 3  # not resumable (docs/TROUBLESHOOTING.md)
    assert "no: state.pt does not match its sha256" in damaged.stdout
    good = json.loads(cli(capsys, "inspect", str(run / "checkpoints" / "megabatch-0001"),
                          "--json").stdout)
    assert good["verifies"] is True and good["megabatch"] == 1 and good["world_size"] == 1
    assert [r["megabatch"] for r in good["metrics"]] == [1]


def test_inspect_rejects_what_is_not_a_run(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    message = assert_one_line_usage_error(cli(capsys, "inspect", str(tmp_path / "nope")))
    assert "does not exist" in message and "checkpoints/megabatch-NNNN" in message
    message = assert_one_line_usage_error(cli(capsys, "inspect", str(tmp_path)))
    assert "holds neither config.yaml nor metrics.jsonl" in message


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_writes_the_shards_and_trains_on_two_ranks(tmp_path: Path) -> None:
    data, run_dir = tmp_path / "digits", tmp_path / "run"
    result = app_dist("demo", "--data", str(data), f"run.dir={run_dir}", "data.megabatches=2",
                      "train.epochs=1", "log.progress=false", "log.wandb.mode=disabled",
                      timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "wrote 1797 digits samples" in result.stdout
    assert (data / "manifest.json").is_file()
    marker = json.loads((run_dir / "checkpoints" / "megabatch-0002" / "COMPLETE.json")
                        .read_text())
    assert marker["world_size"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
