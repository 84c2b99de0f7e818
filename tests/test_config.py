import os
import subprocess
import sys

import pytest

from app_dist.config import (
    changed_settings,
    computation_settings,
    config_hash,
    load_config,
    run_directory,
    sparsity_level,
)
from app_dist.foundations.errors import ConfigError
from app_dist.pruning.schedule import density_schedule
from app_dist.train import main

from .conftest import REPO


def test_yaml_and_dotlist_overrides_merge_into_the_schema():
    config = load_config(REPO / "configs/cifar10.yaml", ["prune.method=osp", "train.epochs=2"])
    assert config.prune.method == "osp" and config.train.epochs == 2
    assert config.model.name == "resnet20s" and config.data.megabatches == 8


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                         if not p.name.startswith("sweep_")))
def test_shipped_configs_load(path):
    load_config(REPO / "configs" / path)


@pytest.mark.parametrize("override, key", [
    (["train.epoch=3"], "train.epoch"),  # unknown key
    (["train.epochs=three"], "train.epochs"),  # wrong type
    (["prune.target_density=1.5"], "prune.target_density"),
    (["prune.target_density=0"], "prune.target_density"),
    # APP starts at 0.8: a higher target would make its schedule rise and skip every prune.
    (["prune.method=app", "prune.target_density=0.9"], "prune.method=osp"),
    (["data.megabatches=0"], "data.megabatches"),
    (["data.replay=sometimes"], "data.replay"),
    (["prune.criterion=hessian"], "prune.criterion"),
])
def test_bad_values_raise_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/digits.yaml", override)
    message = str(error.value)
    assert key in message and "\n" not in message


def test_a_bad_key_is_blamed_on_where_it_was_written(tmp_path):
    """A bad key set on the command line names the override, one in the file names the file."""
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/digits.yaml", ["train.bogus=1"])
    assert "(override 'train.bogus=1')" in str(error.value)
    assert "digits.yaml" not in str(error.value)
    written = tmp_path / "bad.yaml"
    written.write_text("train:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=f"'train.bogus' in {written}"):
        load_config(written, ["train.epochs=2"])


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config("nowhere.yaml")


def test_cli_exits_2_with_one_line_before_any_process_group(capsys):
    assert main(["--config", str(REPO / "configs/digits.yaml"), "data.replay=maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "data.replay" in err and "\n" not in err


def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run.device=cuda is valid here")
    assert main(["--config", str(REPO / "configs/digits.yaml"), "run.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'run.device' = 'cuda': this process sees no CUDA")
    assert "\n" not in err


def test_cli_names_a_missing_shard_folder(capsys, tmp_path):
    args = ["--config", str(REPO / "configs/digits.yaml"), f"data.shards={tmp_path}/none"]
    assert main(args) == 2
    assert "none" in capsys.readouterr().err


def test_run_directory_is_stable_per_settings_and_ignores_logging_keys():
    a = load_config(REPO / "configs/digits.yaml")
    b = load_config(REPO / "configs/digits.yaml", ["log.progress=false"])
    c = load_config(REPO / "configs/digits.yaml", ["train.epochs=1"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert run_directory(a) == run_directory(b)


DIGITS_HASH = "375648c776"  # runs/digits-375648c776: configs/digits.yaml's run directory


def test_a_key_added_by_a_later_version_keeps_the_run_directory_and_allows_the_resume():
    """A run saved by a version without `prune.structure` (for example) recorded no such key:
    at its default it is no change, and the default run directory stays where it was."""
    config = load_config(REPO / "configs/digits.yaml")
    older = {k: v for k, v in computation_settings(config).items()
             if k not in ("prune.structure", "model.sync_batchnorm")}
    assert changed_settings(older, config) == []
    assert changed_settings(older, load_config(REPO / "configs/digits.yaml", [
        "model.sync_batchnorm=true"])) == ["model.sync_batchnorm: False -> True"]
    # The same command, the same run directory, across versions: keys added at their defaults
    # leave the hash alone (it changes only when digits.yaml or a default changes).
    assert config_hash(config) == DIGITS_HASH


def train_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`python app_dist/train.py ARGS` as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, str(REPO / "app_dist" / "train.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})


def train_in_process(capsys: pytest.CaptureFixture[str], *args: str
                     ) -> subprocess.CompletedProcess[str]:
    """`app_dist/train.py ARGS` through its `main` in this process: the same command runner
    prints the line and returns the exit code, without a second of interpreter start-up per
    case. (The real-process path is test_a_bad_config_file_in_a_real_process_is_one_line.)"""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


BAD_CONFIG_FILES = {  # name: (file text, what the one line must say besides the file name)
    "yaml_syntax": ("train:\n  epochs: [1, 2\n", ["not valid YAML", "line 3"]),
    "top_level_list": ("- train.epochs=1\n- prune.method=osp\n", ["mapping", "list"]),
    "duplicate_key": ("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n",
                      ["duplicate key 'epochs'", "line 4"]),
}


def assert_one_error_line(result: subprocess.CompletedProcess[str], *named: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for text in named:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("name", sorted(BAD_CONFIG_FILES))
def test_a_bad_config_file_is_one_line_naming_it_and_exit_2(name, tmp_path, capsys):
    text, said = BAD_CONFIG_FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert_one_error_line(train_in_process(capsys, "--config", str(path)), str(path), *said)


@pytest.mark.slow
def test_a_bad_config_file_in_a_real_process_is_one_line(tmp_path):
    """The same contract from a fresh interpreter: exit code 2, one line, no traceback."""
    text, said = BAD_CONFIG_FILES["yaml_syntax"]
    path = tmp_path / "yaml_syntax.yaml"
    path.write_text(text)
    assert_one_error_line(train_command("--config", str(path)), str(path), *said)


def test_a_config_path_that_is_no_file_says_what_it_is(tmp_path, capsys):
    assert_one_error_line(train_in_process(capsys, "--config", str(tmp_path)), str(tmp_path),
                          "is a directory")
    assert_one_error_line(train_in_process(capsys, "--config", "/dev/null"), "/dev/null",
                          "not a regular file")


def test_no_config_says_that_config_is_missing_and_what_to_pass(capsys):
    assert_one_error_line(train_in_process(capsys, "train.epochs=1"), "--config is missing",
                          "configs/digits.yaml")


def test_a_config_file_asking_for_a_density_that_keeps_no_weight_is_refused(tmp_path, capsys):
    path = tmp_path / "sparse.yaml"
    path.write_text("prune:\n  sparsity_level: 200\n")  # final density 0.8 ** 200 = 4e-20
    assert_one_error_line(train_in_process(capsys, "--config", str(path)),
                          "'prune.sparsity_level' = 200", "<= 61.9")


@pytest.mark.parametrize("override, bound", [("prune.sparsity_level=62", "61.9"),
                                             ("prune.target_density=1e-7", "1e-6")])
def test_a_target_that_keeps_no_weight_is_refused(override, bound):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as error:
        load_config(REPO / "configs/digits.yaml", [override])
    assert bound in str(error.value)
    load_config(REPO / "configs/digits.yaml", ["prune.sparsity_level=61.9"])


def test_a_target_density_above_apps_first_step_is_fine_for_osp():
    config = load_config(REPO / "configs/digits.yaml",
                         ["prune.method=osp", "prune.target_density=0.9"])
    assert density_schedule("osp", 4, sparsity_level(config.prune)) == pytest.approx([0.9] * 4)


@pytest.mark.slow
def test_a_milestone_the_epochs_never_reach_is_warned_about(finished_run_stdout: str) -> None:
    """short_run_args trains 1 epoch per megabatch on digits.yaml, whose lr decays at epoch 4."""
    assert finished_run_stdout.count("train.milestones [4] with train.epochs = 1: the learning "
                                     "rate never decays at [4]") == 1
