import pytest

from app_dist.config import config_hash, load_config, run_directory
from app_dist.foundations.errors import ConfigError
from app_dist.train import main

from .conftest import REPO


def test_yaml_and_dotlist_overrides_merge_into_the_schema():
    config = load_config(REPO / "configs/cifar10.yaml", ["prune.method=osp", "train.epochs=2"])
    assert config.prune.method == "osp" and config.train.epochs == 2
    assert config.model.name == "resnet20s" and config.data.megabatches == 8


@pytest.mark.parametrize("name", ["digits", "cifar10", "cifar100", "cifar10_paper"])
def test_shipped_configs_load(name):
    load_config(REPO / f"configs/{name}.yaml")


@pytest.mark.parametrize("override, key", [
    (["train.epoch=3"], "train.epoch"),  # unknown key
    (["train.epochs=three"], "train.epochs"),  # wrong type
    (["prune.target_density=1.5"], "prune.target_density"),
    (["prune.target_density=0"], "prune.target_density"),
    (["data.megabatches=0"], "data.megabatches"),
    (["data.replay=sometimes"], "data.replay"),
    (["prune.criterion=hessian"], "prune.criterion"),
])
def test_bad_values_raise_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/digits.yaml", override)
    message = str(error.value)
    assert key in message and "\n" not in message


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config("nowhere.yaml")


def test_cli_exits_2_with_one_line_before_any_process_group(capsys):
    assert main(["--config", str(REPO / "configs/digits.yaml"), "data.replay=maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "data.replay" in err and "\n" not in err


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
