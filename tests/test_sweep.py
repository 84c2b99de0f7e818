"""Ray Tune sweeps over distributed trials: the sweep file, checkpoint hand-over, the result
table and the cluster file without Ray; then real sweeps on a
Ray cluster of two nodes started with `ray start` (one of them lost mid-trial)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from app_dist.cli import SUBCOMMANDS
from app_dist.config import load_config
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import CheckpointError, ConfigError
from app_dist.foundations.storage import LocalFolder
from app_dist.sweep import load_sweep, main
from app_dist.sweep.local_ray import LocalRay
from app_dist.sweep.results import TrialOutcome, format_table, trial_rows, write_results
from app_dist.sweep.resume import restore_reported_checkpoint
from app_dist.training.checkpoint import Checkpointer, verify

from .conftest import REPO, descendants, free_port, kill_tree, launch, wait_for
from .storage_servers import S3Server, require


def sweep_file(folder: Path, shards: Path, **changes) -> Path:
    """A small digits sweep: 3 trials (APP / OSP / dense) x 2 workers, T = 2, 1 epoch."""
    settings = {
        "name": "digits-test",
        "base_config": str(REPO / "configs/digits.yaml"),
        "overrides": [f"data.shards={shards}", "data.megabatches=2", "train.epochs=1",
                      "train.milestones=[1]", "log.progress=false"],
        "search_space": {"prune.method": {"grid": ["app", "osp", "dense"]}},
        "workers_per_trial": 2,
        "resources_per_worker": {"CPU": 1, "GPU": 0},
        "scheduler": {"kind": "asha", "metric": "test_accuracy", "mode": "max",
                      "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 1,
        "max_failures": 1,
        "storage_path": str(folder / "storage"),
    }
    settings.update(changes)
    path = folder / f"{settings['name']}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


# --- the sweep file ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sweep_digits.yaml", "sweep_cifar10.yaml"])
def test_repository_sweep_files_validate_and_give_each_trial_its_identity(name, digits_shards):
    sweep = load_sweep(REPO / "configs" / name, [f"data.shards={digits_shards}"], root=REPO)
    assert sweep.dimensions and sweep.max_megabatches >= 3
    assert Path(sweep.storage_path).is_absolute() and sweep.base_config.is_file()
    sampled = {d.key: d.values[0] for d in sweep.dimensions}
    # An all-digit trial id prefix: YAML would read 40994_00003 as the integer 4099400003.
    overrides = sweep.trial_overrides("40994_00003", sampled)
    config = load_config(sweep.base_config, overrides)
    assert config.run.name == "40994_00003"
    assert Path(config.run.dir) == sweep.run_root / "40994_00003"
    assert config.log.wandb.group == sweep.settings.name
    assert Path(config.data.shards) == digits_shards
    for dimension in sweep.dimensions:
        key, field = dimension.key.split(".")
        assert getattr(getattr(config, key), field) == dimension.values[0]


def test_relative_shards_become_absolute_for_trials_running_in_rays_folders(tmp_path):
    shards = tmp_path / "data" / "digits"
    from app_dist.data.prepare.shards import write_shards

    write_shards("digits", None, str(shards), samples_per_shard=100, seed=0)
    path = sweep_file(tmp_path, Path("data/digits"))
    sweep = load_sweep(path, root=tmp_path)
    overrides = sweep.trial_overrides("t_00000", {"prune.method": "app"})
    config = load_config(sweep.base_config, overrides)
    assert Path(config.data.shards) == shards


def test_a_bucket_as_storage_path_holds_the_experiment_and_run_directories_stay_local(
        tmp_path, digits_shards):
    path = sweep_file(tmp_path, digits_shards, storage_path="s3://bucket/sweeps/")
    sweep = load_sweep(path, root=tmp_path)
    assert sweep.experiment_path == "s3://bucket/sweeps/digits-test"
    assert sweep.train_storage == "s3://bucket/sweeps/digits-test/train"
    assert sweep.run_root == tmp_path / "runs" / "sweeps" / "digits-test" / "runs"
    assert str(sweep.experiment_folder()) == "s3://bucket/sweeps/digits-test"


@pytest.mark.parametrize(("argument", "named"), [
    ("workers_per_trial=0", "workers_per_trial"),
    ("workers_per_trial=3", "workers_per_trial"),  # 64 samples per batch do not split in 3
    ("scheduler.metric=accuracy", "scheduler.metric"),
    ("scheduler.metric=cer", "scheduler.mode"),  # lower CER is better: mode max is a mistake
    ("scheduler.grace_period=9", "scheduler.grace_period"),
    ("max_concurrent_trials=0", "max_concurrent_trials"),
    ("storage_path=https://host/sweeps", "storage_path"),  # read-only
    ("run_root=s3://bucket/runs", "run_root"),  # the trainer writes files
    ("search_space.train.lr.grid=[-0.1]", "search_space.train.lr"),
    ("search_space.prune.criterion.choice=[snip,hessian]", "search_space.prune.criterion"),
    ("search_space.train.lr.loguniform=[0,1]", "search_space.train.lr.loguniform"),
    ("search_space.train.lr.normal=[0,1]", "search_space.train.lr.normal"),
    ("search_space.optimizer.lr.grid=[1]", "search_space.optimizer.lr"),
    ("search_space.run.dir.grid=[/x]", "run.dir"),
    ("train.epochs=0", "train.epochs"),
    ("data.shards=/nonexistent", "data.shards"),
    ("resources_per_worker.CPU=0", "resources_per_worker"),
    ("trial_driver.memory_mb=0", "trial_driver.memory_mb"),
    ("trial_driver.resources.head=0", "trial_driver.resources.head"),
    ("trial_driver.resources.CPU=1", "trial_driver.resources.CPU"),
    ("min_workers_per_trial=3", "min_workers_per_trial"),
    ("unknown_key=1", "unknown_key"),
])
def test_bad_sweep_input_is_one_line_naming_the_key_and_exits_2(argument, named, tmp_path,
                                                                   digits_shards, capsys):
    path = sweep_file(tmp_path, digits_shards)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_sweep(path, [argument], root=REPO)
    assert main(["--config", str(path), argument]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and named in error


@pytest.mark.parametrize("cpus", ["0", "-1", "two"])
def test_a_local_ray_of_no_cpus_is_one_line_naming_the_flag(cpus, tmp_path, digits_shards,
                                                              capsys):
    path = sweep_file(tmp_path, digits_shards)
    assert main(["--config", str(path), "--num-cpus", cpus]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--num-cpus" in error and repr(cpus) in error, error


@pytest.mark.slow
@pytest.mark.ray
def test_a_local_ray_that_cannot_start_is_one_line_naming_its_log():
    """What Ray said last, and where its whole log is; the folder's processes are gone."""
    local = LocalRay(num_cpus=-1)  # past the command line's check: Ray itself refuses it
    with pytest.raises(ConfigError, match="the local Ray did not start .*nonnegative.*see "
                                          + str(local.log)):
        local.start()
    assert not processes_of(str(local.temp_dir))


def test_a_training_config_given_as_the_sweep_file_says_so(capsys):
    assert main(["--config", str(REPO / "configs/digits.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a training config" in error and "base_config" in error


@pytest.mark.parametrize(("changes", "trials"), [
    ({}, 3),  # the grid of three methods
    ({"num_samples": 2}, 6),  # each repeat runs the whole grid
    ({"num_samples": 4, "search_space": {"prune.method": {"grid": ["app", "osp"]},
                                         "train.lr": {"loguniform": [0.01, 0.1]},
                                         "prune.criterion": {"choice": ["snip", "magnitude"]},
                                         "train.epochs": 1}}, 8),  # draws do not multiply
])
def test_the_sweep_knows_how_many_trials_it_has(changes, trials, tmp_path, digits_shards):
    """What an interrupted sweep compares its result rows with: trials Tune never created
    are not started, and the sweep is not done."""
    assert load_sweep(sweep_file(tmp_path, digits_shards, **changes)).trial_count == trials


@pytest.mark.parametrize(("changes", "key", "says"), [
    ({}, "workers_per_trial", "a trial needs 2 CPU (2 worker(s) x 1); the cluster has 1"),
    ({"resources_per_worker": {"CPU": 1, "GPU": 1}, "workers_per_trial": 1},
     "resources_per_worker.GPU", "a trial needs 1 GPU (1 worker(s) x 1); the cluster has 0"),
])
@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_the_local_ray_can_never_place_is_one_line_not_a_wait_for_ever(
        changes, key, says, tmp_path, digits_shards):
    """The sweep starts its own one-CPU Ray (no cluster running; `--num-cpus 1`): a trial of
    two one-CPU workers, or of a GPU worker, could never start. The GPU case runs beside
    another sweep's local Ray, which the sweep must not join (nothing announced it: Ray's
    `address="auto"` would have, and the trial would have waited there)."""
    path = sweep_file(tmp_path, digits_shards, **changes)
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    another_sweeps_ray = LocalRay(1)
    try:
        if key == "resources_per_worker.GPU":
            another_sweeps_ray.start()
        result = subprocess.run([sys.executable, str(REPO / "launch/sweep.py"), "--config",
                                 str(path), "--num-cpus", "1"], cwd=tmp_path, timeout=180,
                                env={**environment, "RAY_USAGE_STATS_ENABLED": "0"},
                                capture_output=True, text=True)
    finally:
        another_sweeps_ray.stop()
        shutil.rmtree(another_sweeps_ray.temp_dir, ignore_errors=True)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"sweep key '{key}'" in line and says in line and "cannot grow" in line, line
    assert not (tmp_path / "storage" / "digits-test").exists()  # no experiment was started


ORPHANS_SCRIPT = """
import json, time, ray
from ray.util.placement_group import placement_group
from app_dist.sweep.placement_groups import (orphaned_placement_groups,
                                             release_orphaned_placement_groups)
ray.init(num_cpus=3, include_dashboard=False)

@ray.remote(num_cpus=0)
class Controller:  # creates a group, as Ray Train's controller does
    def start(self):
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready())
        return group.id.hex()

tunes = placement_group([{"CPU": 0.5}])  # created by the driver, as Tune's are
ray.get(tunes.ready())
dead, alive = Controller.remote(), Controller.remote()
dead_group = ray.get(dead.start.remote())
ray.get(alive.start.remote())  # of 3 CPUs, half of one is left
before = orphaned_placement_groups()
ray.kill(dead)
deadline = time.monotonic() + 30
while not orphaned_placement_groups() and time.monotonic() < deadline:
    time.sleep(0.2)
found = orphaned_placement_groups()
held = ray.available_resources().get("CPU", 0)
released = release_orphaned_placement_groups()
time.sleep(1)
print(json.dumps(dict(before=before, found=found, dead=dead_group, held=held, released=released,
                      free=ray.available_resources().get("CPU", 0),
                      again=orphaned_placement_groups())))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_the_placement_group_of_a_dead_controller_is_found_and_released_and_no_other(tmp_path):
    """A real local Ray without the dashboard (as ray[tune,train] installs it): the group an
    actor created outlives the actor (Ray ties it to the job) and holds its CPU; the sweep's
    check finds that group alone (not the driver's, not a live actor's) and frees its CPU."""
    ray_temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must be short
    environment = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_temp}
    script = subprocess.Popen([sys.executable, "-c", ORPHANS_SCRIPT], cwd=tmp_path,
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray's processes, on a timeout too
            os.killpg(script.pid, signal.SIGKILL)
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert script.returncode == 0, stderr[-3000:]
    seen = json.loads(stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    assert seen["found"] == [seen["dead"]] and seen["released"] == [seen["dead"]]
    assert seen["held"] == 0.5  # the dead actor's group still held its CPU
    assert seen["free"] == 1.5 and seen["again"] == []


def processes_of(temp_dir: str) -> list[str]:
    """The command lines of the processes of the local Ray whose temp dir is `temp_dir`."""
    found = subprocess.run(["pgrep", "-af", temp_dir], capture_output=True, text=True)
    return found.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_on_its_own_local_ray_takes_a_sigkill_and_a_group_signal_and_restores(
        tmp_path, digits_shards):
    """A sweep run where no cluster is (no RAY_ADDRESS, no `ray start`) starts its own Ray.
    Two trials of 2 megabatches, one after the other, and three runs of the same command:

    1. SIGKILL to the driver's process group the moment Ray Train has registered trial 1's
       last megabatch (the driver's machine is gone, no handler runs), most often before
       Tune saved that report in its experiment state. Its Ray goes too: nothing is left;
    2. the same command restores the sweep: trial 1 finds its run complete and reports its
       last megabatch again (its row: megabatch 2, not the megabatch Tune had saved), and
       trial 2 starts. Once it registered megabatch 1, SIGTERM to the driver's process group,
       as `timeout`, SLURM or a closed terminal deliver it. Ray runs in a session of its own,
       so the signal reaches the driver alone: Tune stops, saves, prints the summary (trial 2
       unfinished), the sweep stops its Ray and exits 1;
    3. the same command again completes trial 2."""
    path = sweep_file(tmp_path, digits_shards, workers_per_trial=1, scheduler={"kind": "fifo"},
                      search_space={"prune.method": {"grid": ["app", "osp"]}},
                      overrides=[f"data.shards={digits_shards}", "data.megabatches=2",
                                 "train.epochs=1", "train.milestones=[1]", "log.progress=false",
                                 "log.wandb.mode=disabled"])
    experiment = local_experiment(tmp_path / "storage" / "digits-test")
    runs = tmp_path / "storage" / "digits-test" / "runs"
    command = [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(path),
               "--num-cpus", "1"]
    environment = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                   "RAY_USAGE_STATS_ENABLED": "0"}

    def registered(trial: int, megabatch: int) -> bool:
        trials = sorted(d.name for d in runs.glob("*"))
        return (len(trials) > trial
                and experiment.registered_by_ray_train(trials[trial]) >= megabatch)

    def interrupted(trial: int, megabatch: int, signum: int) -> tuple[int, str, str]:
        """Run the command, send `signum` to its process group once `trial` (0, 1) has
        registered `megabatch`; (exit code, output, the local Ray's temp dir)."""
        log = tmp_path / f"driver-{signum}.log"
        driver = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=log.open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert wait_for(lambda: registered(trial, megabatch), driver, timeout=300,
                            interval=0.02), log.read_text()[-3000:]
            os.killpg(driver.pid, signum)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                kill_tree(driver)
        output = log.read_text()
        (line,) = [line for line in output.splitlines() if "no Ray cluster is running" in line]
        return driver.returncode, output, line.rsplit("logs in ", 1)[1].rstrip(")")

    code, output, temp_dir = interrupted(0, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    first = sorted(d.name for d in runs.glob("*"))[0]
    heard_before_restore = [r["megabatch"] for r in experiment.tune_reports(first)]
    deadline = time.monotonic() + 60  # the kernel's SIGTERM to `ray start`, which stops Ray
    while processes_of(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_of(temp_dir)

    code, output, temp_dir = interrupted(1, 1, signal.SIGTERM)
    assert "restoring sweep digits-test" in output
    assert code == 1, output[-3000:]
    assert "SIGTERM received: stopping the sweep as Ctrl-C does" in output
    assert "0 trial(s) failed, 1 unfinished, 0 not started" in output, output[-3000:]
    assert "*** SIGTERM received" not in output  # Ray's crash dump
    assert not processes_of(temp_dir)  # stopped before the driver exited

    again = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = experiment.read_json("results.json")
    assert [(r["status"], r["megabatch"]) for r in rows] == [("completed", 2)] * 2
    for row in rows:
        assert megabatches_logged(runs / row["trial_id"]) == [1, 2]
        # What Tune saved before each stop, then what the trial reported after: no megabatch
        # trained twice (a report Tune never saved is not said again; the last may be).
        heard = [r["megabatch"] for r in experiment.tune_reports(row["trial_id"])]
        assert heard[-1] == 2 and heard[:-1] == sorted(set(heard))[:len(heard) - 1], heard
    print(f"local sweep: Tune's file held megabatches {heard_before_restore} of trial 1 when "
          f"the driver was killed, {heard} of trial 2 at the end")


def test_a_cluster_that_may_grow_is_warned_about_a_trial_it_cannot_place_yet(
        monkeypatch, tmp_path, digits_shards, caplog):
    """On a joined cluster (an autoscaler may add nodes) the sweep starts and says why its
    trials wait; a worker larger than every node is named too. (Ray's two answers are
    replaced here; the real local Ray is the test above.)"""
    import ray

    from app_dist.sweep.runner import check_placeable

    two_nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True,
                                                             "Resources": {"CPU": 2.0}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "nodes", lambda: two_nodes)
    sweep = load_sweep(sweep_file(tmp_path, digits_shards,
                                  resources_per_worker={"CPU": 3, "GPU": 0}, workers_per_trial=1))
    with caplog.at_level("WARNING", logger="app_dist"):
        check_placeable(sweep, started_here=False)
    assert ("sweep key 'resources_per_worker.CPU' = 3.0: one worker needs 3 CPU; the cluster's "
            "largest node has 2 now; trials wait until the cluster grows") in caplog.text
    with pytest.raises(ConfigError, match="resources_per_worker.CPU.*cannot grow"):
        check_placeable(sweep, started_here=True)
    caplog.clear()
    check_placeable(load_sweep(sweep_file(tmp_path, digits_shards)), started_here=False)
    assert not caplog.text  # 2 workers x 1 CPU fit


@pytest.mark.parametrize(("written", "says"), [
    ("", "is empty"),
    ("# the sweep, to be written\n", "is empty"),
    ("name: s\noverrides: {train.epochs: 1}\n", "key 'overrides' in "),
    ("name: s\nsearch_space: [prune.method]\n", "key 'search_space' in "),
])
def test_an_empty_sweep_file_or_a_list_written_as_a_mapping_is_one_line(written, says,
                                                                        tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(written)
    assert main(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and says in error, error


@pytest.mark.parametrize("key", ["storage_path", "run_root"])
def test_a_storage_path_or_run_root_under_a_file_is_refused_before_ray_starts(
        key, tmp_path, digits_shards, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = sweep_file(tmp_path, digits_shards, **{key: str(blocker / "sweeps")})
    assert main(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"key '{key}'" in error and "is a file" in error
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_perf_keys_are_training_keys_of_every_trial_and_of_the_search_space(tmp_path,
                                                                           digits_shards):
    """Every section of the training schema is a training section, `perf` included: a sweep
    can fix a speed switch for every trial and search over one."""
    space = {"prune.method": {"grid": ["app"]}, "perf.cache_decoded": {"grid": [True, False]}}
    path = sweep_file(tmp_path, digits_shards, search_space=space)
    sweep = load_sweep(path, ["perf.persistent_workers=true"], root=REPO)
    assert "perf.persistent_workers=true" in sweep.overrides
    assert sorted(d.key for d in sweep.dimensions) == ["perf.cache_decoded", "prune.method"]
    overrides = sweep.trial_overrides("t_00000", {"prune.method": "app",
                                                  "perf.cache_decoded": True})
    config = load_config(sweep.base_config, overrides)
    assert config.perf.persistent_workers is True and config.perf.cache_decoded is True


def test_elastic_trials_resume_on_any_size_and_every_size_must_divide_the_batch(
        tmp_path, digits_shards):
    fixed = load_sweep(sweep_file(tmp_path, digits_shards), root=REPO)
    assert list(fixed.world_sizes) == [2]
    assert not any("allow_world_size_change" in o
                   for o in fixed.trial_overrides("t", {"prune.method": "app"}))
    batch_60 = [f"data.shards={digits_shards}", "train.batch_size=60"]
    elastic = load_sweep(sweep_file(tmp_path, digits_shards, workers_per_trial=4,
                                    min_workers_per_trial=2, overrides=batch_60), root=REPO)
    assert list(elastic.world_sizes) == [2, 3, 4]
    overrides = elastic.trial_overrides("t", {"prune.method": "app"})
    assert load_config(elastic.base_config, overrides).checkpoint.allow_world_size_change
    with pytest.raises(ConfigError, match="'min_workers_per_trial' = 2: .* on 3 workers"):
        load_sweep(sweep_file(tmp_path, digits_shards, workers_per_trial=4,
                              min_workers_per_trial=2), root=REPO)  # batch 64


def test_a_sweep_saved_before_a_setting_existed_restores_while_that_setting_is_default(
        tmp_path, digits_shards):
    from omegaconf import OmegaConf

    from app_dist.sweep.runner import SETTINGS_FILE, _settings_record, check_same_sweep

    sweep = load_sweep(sweep_file(tmp_path, digits_shards), root=REPO)
    record = _settings_record(sweep)
    for added in ("min_workers_per_trial", "resize_interval_s"):  # settings added later
        record.pop(added)
    sweep.experiment_folder().write_text(SETTINGS_FILE, OmegaConf.to_yaml(record))
    check_same_sweep(sweep)
    elastic = load_sweep(sweep_file(tmp_path, digits_shards), ["min_workers_per_trial=1"],
                         root=REPO)
    with pytest.raises(ConfigError, match="min_workers_per_trial: 0 -> 1"):
        check_same_sweep(elastic)


def test_sweep_subcommand_is_registered_with_the_cli():
    assert "sweep" in SUBCOMMANDS
    assert SUBCOMMANDS["sweep"][0](["--config", "/nonexistent.yaml"]) == 2


# --- handing a reported checkpoint to a restarted trial ----------------------------------


class FileEngine:
    """Writes one file, as an engine writes its model and optimizer state."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save(self, folder: Path) -> None:
        torch.save({"weights": torch.full((4,), self.value)}, folder / "engine.pt")


def write_checkpoints(run_dir: Path, megabatches: int, value: float = 1.0) -> Checkpointer:
    platform = Platform(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    checkpointer = Checkpointer(run_dir, platform, keep_last=10)
    for megabatch in range(1, megabatches + 1):
        checkpointer.write(megabatch, {"run": {"completed": megabatch}}, {},
                          FileEngine(value * megabatch))
    return checkpointer


def test_restart_resumes_from_the_reported_checkpoint_setting_aside_unreported_ones(tmp_path):
    run_dir = tmp_path / "run"
    write_checkpoints(run_dir, 2)  # megabatch 2 was written, then the trial died: unreported
    reported = tmp_path / "ray-storage" / "megabatch-0001"
    shutil.copytree(run_dir / "checkpoints" / "megabatch-0001", reported)
    restored = restore_reported_checkpoint(reported, run_dir)
    assert (restored.megabatch, restored.copied) == (1, False)
    assert [p.name.split(".")[0] for p in restored.set_aside] == ["megabatch-0002"]
    latest = Checkpointer(run_dir, Platform(0, 1, 0, torch.device("cpu")), 10).latest()
    assert latest is not None and latest.megabatch == 1


def test_restart_on_an_empty_run_directory_copies_the_reported_checkpoint(tmp_path):
    source = tmp_path / "elsewhere"
    write_checkpoints(source, 2)
    run_dir = tmp_path / "fresh-node" / "run"
    restored = restore_reported_checkpoint(source / "checkpoints" / "megabatch-0002", run_dir)
    assert (restored.megabatch, restored.copied, restored.set_aside) == (2, True, ())
    assert verify(run_dir / "checkpoints" / "megabatch-0002") is None


def test_a_different_local_checkpoint_is_replaced_by_the_reported_one(tmp_path):
    reported_run, local_run = tmp_path / "reported", tmp_path / "local"
    write_checkpoints(reported_run, 1, value=1.0)
    write_checkpoints(local_run, 1, value=5.0)
    restored = restore_reported_checkpoint(reported_run / "checkpoints" / "megabatch-0001",
                                           local_run)
    assert restored.copied
    engine = torch.load(local_run / "checkpoints" / "megabatch-0001" / "engine.pt")
    assert torch.equal(engine["weights"], torch.full((4,), 1.0))
    assert list((local_run / "checkpoints").glob("megabatch-0001.replaced-*"))


def test_a_corrupt_reported_checkpoint_is_refused(tmp_path):
    write_checkpoints(tmp_path / "run", 1)
    reported = tmp_path / "run" / "checkpoints" / "megabatch-0001"
    with (reported / "engine.pt").open("r+b") as handle:
        handle.write(b"garbage")
    with pytest.raises(CheckpointError, match="engine.pt does not match its sha256"):
        restore_reported_checkpoint(reported, tmp_path / "other")


# --- the result table --------------------------------------------------------------------


def outcome(trial_id, method, accuracy, megabatch, done=True, error=None):
    report = {"megabatch": megabatch, "megabatches": 3, "test_accuracy": accuracy,
              "cer": 1 - accuracy, "density": 0.5, "generalization_gap": 1.0, "done": done}
    return TrialOutcome(trial_id, {"prune.method": method}, report if megabatch else {}, error)


def test_result_rows_are_sorted_by_the_metric_with_status_and_written_as_csv_and_json(tmp_path):
    outcomes = [outcome("t0", "dense", 0.80, 1), outcome("t1", "app", 0.95, 3),
                outcome("t2", "osp", 0.0, 0, error="RuntimeError: boom\ntraceback"),
                outcome("t3", "app", 0.90, 2, done=False), outcome("t4", "osp", 0.97, 3)]
    rows = trial_rows(outcomes, ["prune.method"], "test_accuracy", "max")
    assert [(r["trial_id"], r["status"]) for r in rows] == [
        ("t4", "completed"), ("t1", "completed"), ("t3", "unfinished"), ("t0", "stopped"),
        ("t2", "error")]
    assert rows[-1]["error"] == "RuntimeError: boom"
    # CER sums over megabatches: the trial stopped after one has the smallest, yet it lost.
    by_cer = trial_rows(outcomes, ["prune.method"], "cer", "min")
    assert [r["trial_id"] for r in by_cer] == ["t4", "t1", "t3", "t0", "t2"]
    write_results(rows, LocalFolder(tmp_path))
    csv_path, json_path = tmp_path / "results.csv", tmp_path / "results.json"
    assert csv_path.read_text().splitlines()[0].startswith("trial_id,status,prune.method,")
    assert json.loads(json_path.read_text())[0]["test_accuracy"] == 0.97
    assert "completed" in format_table(rows)


# --- the cluster file --------------------------------------------------------------------


@pytest.mark.ray
def test_cluster_file_is_a_valid_ray_launcher_config_that_ships_and_installs_the_project():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cluster)))  # Ray's schema, as `ray up` does
    assert cluster["provider"]["type"]
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["docker"]["image"] == "app-dist:latest"
    mounted = {remote: local for remote, local in cluster["file_mounts"].items()}
    assert mounted.get("~/app-dist") == "."  # the package and configs/ reach every node
    assert "configs" not in cluster["rsync_exclude"] and "app_dist" not in cluster["rsync_exclude"]
    assert any("pip install -r requirements.lock -e ." in command and "~/app-dist" in command
               for command in cluster["setup_commands"])
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c
               for c in cluster["worker_start_ray_commands"])


# --- real sweeps on a Ray cluster of two nodes ---------------------------------------------


class Experiment:
    """A Tune experiment folder read through fsspec: a local folder or a bucket."""

    def __init__(self, filesystem, path: str) -> None:
        self.fs, self.path = filesystem, path.rstrip("/")

    def read_json(self, name: str):
        return json.loads(self.fs.cat_file(f"{self.path}/{name}"))

    def tune_reports(self, trial_id: str) -> list[dict]:
        """Every result Tune recorded for the trial, in order."""
        self.fs.invalidate_cache()  # s3fs caches listings; Tune keeps writing
        (trial_dir,) = [p for p in self.fs.ls(self.path, detail=False)
                        if trial_id in p.rsplit("/", 1)[-1] and self.fs.isdir(p)]
        text = self.fs.cat_file(f"{trial_dir}/result.json").decode()
        return [json.loads(line) for line in text.splitlines()]

    def reported_to_ray_train(self, trial_id: str) -> int:
        """The newest megabatch whose checkpoint the trial reported (Ray Train's copy)."""
        self.fs.invalidate_cache()
        folders = self.fs.glob(f"{self.path}/train/{trial_id}/megabatch-[0-9][0-9][0-9][0-9]")
        return max((int(f.rsplit("-", 1)[1]) for f in folders), default=0)

    def registered_by_ray_train(self, trial_id: str) -> int:
        """The newest megabatch whose report Ray Train's controller has registered (its
        checkpoint manager's snapshot; 0 before the first). A worker group restarted now
        resumes from it: a checkpoint already in Ray Train's storage but not yet registered
        (the controller collects reports at its next poll of the workers, every 2 s) is not
        used."""
        try:
            snapshot = self.read_json(f"train/{trial_id}/checkpoint_manager_snapshot.json")
            results = snapshot["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            return 0
        return max((r["metrics"]["megabatch"] for r in results), default=0)


def local_experiment(path: Path) -> Experiment:
    import fsspec

    return Experiment(fsspec.filesystem("file"), str(path))


def megabatches_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["megabatch"] for line in lines]


# The head's GCS declares a node dead after 5 missed health checks 1 s apart. Ray's defaults
# (3 s apart, 10 s timeouts) take about 30 s on these 2 cores, during which Ray Train still
# counts the lost node's CPU and every restart of a trial asks for it and times out.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "5"}


class TwoNodeRay:
    """A Ray cluster of two nodes on this machine: `ray start --head` (node A) and
    `ray start --address` (node B), each its own `--block` process with its own temp dir,
    1 CPU and a custom resource naming it, so that a trial's 2 one-CPU workers are placed one
    per node. Every port is a free one (two nodes on one machine, other Ray instances beside
    them); token authentication with a token of this cluster's own."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.address = f"127.0.0.1:{free_port()}"
        # Every node imports this checkout (on a cluster: the project installed on every node).
        self.env = {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": os.urandom(16).hex(), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.address, **FAST_NODE_DEATH, **(env or {})}
        self.temp_dirs: list[str] = []
        self.head = self._start("a", ["--head", "--port", self.address.split(":")[1],
                                      "--include-dashboard=false"])
        self.worker_node = self._start("b", ["--address", self.address])

    def _start(self, name: str, role: list[str]) -> subprocess.Popen:
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # socket paths must be short
        self.temp_dirs.append(temp_dir)
        ports = [port for flag in ("--node-manager-port", "--object-manager-port",
                                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                   "--runtime-env-agent-port", "--metrics-export-port")
                 for port in (flag, str(free_port()))]
        command = [str(Path(sys.executable).parent / "ray"), "start", *role, "--block",
                   "--temp-dir", temp_dir, "--num-cpus", "1", "--resources",
                   json.dumps({f"node_{name}": 1}), "--object-store-memory", str(80 * 2**20),
                   "--disable-usage-stats", *ports]
        log = (self.folder / f"node-{name}.log").open("a")
        return launch(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_for_nodes(self, *names: str, timeout: float = 120) -> None:
        """Until `ray status` lists the custom resource of every named node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.head.poll() is None, (self.folder / "node-a.log").read_text()[-3000:]
            status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status"],
                                    env={**os.environ, **self.env}, capture_output=True,
                                    text=True, timeout=60).stdout
            if all(f"node_{name}" in status for name in names):
                return
            time.sleep(0.5)
        raise AssertionError(f"ray nodes {names} not up after {timeout} s")

    def worker_node_pids(self) -> list[int]:
        """Node B's processes: its `ray start`, every process started with its temp dir on
        the command line (the raylet may not be a child of `ray start`), and everything
        below them (the raylet's workers)."""
        temp_dir = self.temp_dirs[-1]
        found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
        roots = {self.worker_node.pid, *(int(pid) for pid in found.stdout.split())}
        return sorted({pid for root in roots for pid in [root, *descendants(root)]})

    def worker_node_processes(self) -> list[str]:
        """The command lines (Ray sets a worker's to its actor and task) of node B."""
        def title(pid: int) -> str:
            try:
                return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
            except OSError:
                return ""
        return [title(pid) for pid in self.worker_node_pids()]

    def runs_on_worker_node(self, actor: str) -> bool:
        """Whether an actor of this class (`RayTrainWorker`; `TrainController`, beside its
        trial's driver) runs on node B."""
        return any(actor in title for title in self.worker_node_processes())

    def lose_worker_node(self) -> None:
        """SIGKILL to all of node B's processes at once."""
        for pid in self.worker_node_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.worker_node.wait(timeout=30)

    def restart_worker_node(self) -> None:
        self.worker_node = self._start("b", ["--address", self.address])

    def stop(self) -> None:
        """Both nodes' processes killed (found by their own temp dirs too), temp dirs removed."""
        for node in (self.worker_node, self.head):
            if node.poll() is None:
                kill_tree(node)
        for temp_dir in self.temp_dirs:
            found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
            for pid in (int(pid) for pid in found.stdout.split()):
                for each in [pid, *descendants(pid)]:
                    try:
                        os.kill(each, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def two_node_cluster(folder: Path, env: dict[str, str] | None = None):
    cluster = TwoNodeRay(folder, env)
    try:
        cluster.wait_for_nodes("a", "b")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_node_ray(request: pytest.FixtureRequest, tmp_path: Path):
    """A TwoNodeRay; a test may give every node's environment through indirect
    parametrization."""
    with two_node_cluster(tmp_path, getattr(request, "param", None)) as cluster:
        yield cluster


@pytest.fixture
def s3_server():
    """moto's S3 server on 127.0.0.1, with a bucket for sweeps and one for datasets."""
    require("s3fs")
    require("moto")
    server = S3Server()
    server.start()
    server.make_bucket("sweeps")
    yield server
    server.stop()


@pytest.fixture
def two_node_ray_on_s3(s3_server, tmp_path: Path):
    """A TwoNodeRay whose nodes find the S3 server as a cluster's nodes find their object
    store: through the environment each node was started with (AWS_ENDPOINT_URL, keys)."""
    with two_node_cluster(tmp_path, s3_server.env) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.distributed
def test_sweep_on_two_ray_nodes_survives_a_lost_node_and_an_interrupted_driver(
        two_node_ray_on_s3, s3_server, digits_shards, tmp_path):
    """3 trials x 2 workers on a real two-node Ray cluster (one worker per node). Once Ray
    Train has registered trial 1's megabatch 1, node B is lost (its `ray start`, raylet and workers
    SIGKILLed) and started again at once, as an autoscaler replaces a node. The trials'
    drivers, and with them their Ray Train controllers, are kept on node A, the head
    (`trial_driver.resources`, as a user keeps them on nodes that stay): the trial, which
    cannot be placed on what is left (2 workers of 1 CPU, 1 CPU left), runs again once the
    node is back, Ray Train restarting its worker group from the last reported megabatch
    checkpoint. Trial 2 cannot learn (lr 1e-6): ASHA stops it at the
    megabatch-2 rung, and trial 3 can only start if the stopped trial's workers gave their
    CPUs back. While trial 3 is half way, SIGTERM goes to the driver's process group (as a
    scheduler stops a job; the driver takes it as Ctrl-C); the same command restores the
    experiment without rerunning finished trials, and the sweep ends with every trial's
    result.

    The sweep's storage_path and its shards are in an S3 bucket (moto's server): Tune's
    experiment, the result table and Ray Train's checkpoint copies live there, and before the
    restore the interrupted trial's run directory is deleted (as a node's scratch disk is
    lost): only the bucket still holds its checkpoints."""
    two_node_ray = two_node_ray_on_s3
    megabatches = 4
    runs = tmp_path / "runs"
    shards = s3_server.upload(digits_shards, "datasets", "digits")
    path = sweep_file(
        tmp_path, digits_shards,
        overrides=[f"data.shards={shards}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"data.megabatches={megabatches}", "train.epochs=1", "train.milestones=[1]",
                   "log.progress=false"],
        search_space={"train.lr": {"grid": [0.05, 1.0e-6, 0.04]}},
        scheduler={"kind": "asha", "metric": "test_accuracy", "mode": "max",
                   "grace_period": 2, "reduction_factor": 2},
        storage_path="s3://sweeps/storage", run_root=str(runs),
        trial_driver={"CPU": 0, "memory_mb": 256, "resources": {"node_a": 0.01}})
    experiment = Experiment(s3_server.filesystem(), "sweeps/storage/digits-test")
    command = [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(path)]
    driver_log = tmp_path / "driver.log"
    first = launch(command, env=two_node_ray.env, cwd=tmp_path, stdout=driver_log.open("w"),
                   stderr=subprocess.STDOUT)

    def trial_dirs() -> list[str]:
        return sorted(d.name for d in runs.glob("*"))

    def first_trial_reported() -> bool:
        trials = trial_dirs()
        return bool(trials) and experiment.registered_by_ray_train(trials[0]) >= 1

    def third_trial_halfway() -> bool:
        trials = trial_dirs()
        return len(trials) == 3 and experiment.reported_to_ray_train(trials[2]) in (2, 3)

    try:
        if not wait_for(first_trial_reported, first, timeout=300, interval=0.1):
            raise AssertionError(driver_log.read_text()[-3000:])
        assert two_node_ray.runs_on_worker_node("RayTrainWorker")
        assert not two_node_ray.runs_on_worker_node("TrainController")  # kept on node A
        two_node_ray.lose_worker_node()
        lost_at = time.time()
        two_node_ray.restart_worker_node()
        # Interrupt it (as Ctrl-C does) once the third trial has reported megabatch 2 but not 4.
        assert wait_for(third_trial_halfway, first, timeout=300, interval=0.2), (
            driver_log.read_text()[-3000:])
        trials = trial_dirs()
        os.killpg(first.pid, signal.SIGTERM)  # as a scheduler stops a job
        first.wait(timeout=120)
        output = driver_log.read_text()
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert first.returncode == 1, output[-3000:]  # an unfinished trial: run it again
    assert "SIGTERM received: stopping the sweep as Ctrl-C does" in output
    assert "1 unfinished, 0 not started" in output and "*** SIGTERM received" not in output
    interrupted = trials[2]
    reached = experiment.reported_to_ray_train(interrupted)
    assert reached < megabatches, "the interruption came too late to leave it unfinished"
    modified = {t: (runs / t / "metrics.jsonl").stat().st_mtime_ns for t in trials[:2]}
    shutil.rmtree(runs / interrupted)  # only the bucket still holds its checkpoints

    restored_at = int(time.time())
    again = subprocess.run(command, cwd=tmp_path, env={**os.environ, **two_node_ray.env},
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:]  # the same command again: restores
    assert "restoring sweep digits-test" in again.stdout

    rows = experiment.read_json("results.json")
    assert [r["train.lr"] for r in rows] in ([0.05, 0.04, 1e-6], [0.04, 0.05, 1e-6])
    by_trial = {r["trial_id"]: r for r in rows}
    assert [(by_trial[t]["status"], by_trial[t]["megabatch"]) for t in trials] == [
        ("completed", 4), ("stopped", 2), ("completed", 4)]  # ASHA stopped lr 1e-6 at rung 2
    assert experiment.fs.cat_file(f"{experiment.path}/results.csv").count(b"\n") == 4
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").glob("*.tar"))
    assert cached == sorted(p.name for p in digits_shards.glob("*.tar"))  # each one, once
    for trial_id, mtime in modified.items():  # ended before the interruption: not rerun
        assert (runs / trial_id / "metrics.jsonl").stat().st_mtime_ns == mtime
    for row in rows:
        run_dir, last = runs / row["trial_id"], row["megabatch"]
        # A stopped trial may train on while Tune stops it; what Tune recorded is the row.
        # The resumed trial's file is rebuilt from its checkpoint's history.
        assert megabatches_logged(run_dir)[:last] == list(range(1, last + 1))
        reports = experiment.tune_reports(row["trial_id"])
        if row["trial_id"] == interrupted:
            # Tune restarted the trial and Ray Train resumed it after its last reported
            # megabatch, not from scratch (or at it, when the interruption came while that
            # checkpoint was being copied): from the bucket, its run directory being gone.
            # Tune's own counter restarts at 1 here, which is
            # why ASHA keys on the reported megabatch.
            after = [r["megabatch"] for r in reports if r["timestamp"] >= restored_at]
            assert after[0] in (reached, reached + 1) and after[0] >= 2
            assert after == list(range(after[0], megabatches + 1))
        else:  # one report per megabatch: Tune's training_iteration is the megabatch
            assert [r["megabatch"] for r in reports] == list(range(1, last + 1))
            assert [r["training_iteration"] for r in reports] == [r["megabatch"] for r in reports]
        config = load_config(run_dir / "config.yaml")
        assert (config.run.name, config.log.wandb.group) == (row["trial_id"], "digits-test")
        assert list((run_dir / "wandb").glob("offline-run-*"))
    # The trial that lost a node resumed after the last megabatch Tune had heard of (which
    # may lag the checkpoint the test waited for): every megabatch reported once, and those
    # reported before the loss were not computed again.
    lost = trials[0]
    reports = experiment.tune_reports(lost)
    logged = [json.loads(line) for line in (runs / lost / "metrics.jsonl").read_text().splitlines()]
    assert [r["megabatch"] for r in reports] == [r["megabatch"] for r in logged] == [1, 2, 3, 4]
    before = [r for r in reports if r["timestamp"] <= lost_at]
    assert all(logged[r["megabatch"] - 1]["seconds"] == r["seconds"] for r in before)
    seen = len(before)
    if seen < megabatches:
        print(f"trial {lost}: node lost after Tune had megabatch {seen}; megabatch {seen + 1} "
              f"reported {reports[seen]['timestamp'] - lost_at:.0f} s after the loss")


def signal_when_announced(announce: Path, signum: int, ready: Callable[[], bool],
                          deadline: float) -> threading.Thread:
    """A thread that sends `signum` to the process whose pid appears in `announce` (a paused
    Ray Train worker) as soon as the file exists and `ready()` holds: the fault comes from
    outside."""
    def watch() -> None:
        while time.monotonic() < deadline:
            if announce.is_file() and (pid := announce.read_text().strip()) and ready():
                os.kill(int(pid), signum)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.distributed
# A worker group that cannot be placed is given up after 30 s instead of Ray Train's 60 s (and
# tried again): after a node loss the controller still counts the dead node's CPU for a while,
# and an elastic trial's first tries ask for both workers. Not 15 s: on 2 cores busy with
# the suite's other workers, a worker that fits took longer than 15 s to start, every try.
# (Not in the sweep test above: there a node comes back, and a start given up while its
# placement group was still pending once left that group created later and never released,
# holding both CPUs: the trial waited forever.)
@pytest.mark.parametrize("two_node_ray", [{"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}],
                         indirect=True, ids=["start-timeout-30s"])
def test_elastic_trial_goes_on_with_the_workers_left_and_resumes_from_its_last_report(
        two_node_ray, digits_shards, tmp_path):
    """An elastic trial (min_workers_per_trial=1, workers_per_trial=2) on the two-node
    cluster, hit by two faults from outside:

    1. once Ray Train has registered its megabatch 1, node B is lost for good. Instead of
       waiting for it, Ray Train restarts the worker group with the one worker that fits, from
       the last reported megabatch checkpoint;
    2. that worker is SIGTERMed once it has written megabatch 3's checkpoint but before it
       reported it (the fault hook only pauses it there for 5 s and names its pid). Ray Train
       restarts from megabatch 2, the last one it registered; the unreported checkpoint is set
       aside and megabatch 3 is trained again.

    The trial completes with each megabatch reported once (restarting from scratch, or from an
    unreported checkpoint, would report one twice), and metrics.jsonl records the world size
    of each megabatch (2 first, 1 last). (A driver killed at the last megabatch is the local
    Ray's test above: restored here, an elastic trial would wait 180 s for Ray's
    AutoscalingCoordinator to drop the dead run's resource reservation; docs/SWEEPS.md.)"""
    megabatches = 4
    announce = tmp_path / "paused"
    path = sweep_file(
        tmp_path, digits_shards, name="digits-elastic",
        overrides=[f"data.shards={digits_shards}", f"data.megabatches={megabatches}",
                   "train.epochs=1", "train.milestones=[1]", "log.progress=false",
                   "log.wandb.mode=disabled"],
        search_space={"prune.method": {"grid": ["app"]}}, min_workers_per_trial=1,
        scheduler={"kind": "fifo"}, max_failures=2,
        worker_env={"APP_DIST_FAULT": f"pause:rank=0,seconds=5,announce={announce},"
                                      "megabatch=3,at=checkpointed"})
    experiment = local_experiment(tmp_path / "storage" / "digits-elastic")
    runs = tmp_path / "storage" / "digits-elastic" / "runs"
    driver_log = tmp_path / "driver.log"
    command = [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(path)]
    sweep = launch(command, env=two_node_ray.env, cwd=tmp_path, stdout=driver_log.open("w"),
                   stderr=subprocess.STDOUT)

    def registered(megabatch: int) -> bool:
        # Not Tune's own record, which lags the trial by seconds (here by the whole trial).
        trials = sorted(d.name for d in runs.glob("*"))
        return bool(trials) and experiment.registered_by_ray_train(trials[0]) >= megabatch

    try:
        assert wait_for(lambda: registered(1), sweep, timeout=300, interval=0.1), (
            driver_log.read_text()[-3000:])
        assert two_node_ray.runs_on_worker_node("RayTrainWorker"), (
            two_node_ray.worker_node_processes())
        two_node_ray.lose_worker_node()
        watcher = signal_when_announced(announce, signal.SIGTERM, lambda: registered(2),
                                        time.monotonic() + 300)
        sweep.wait(timeout=400)
    finally:
        if sweep.poll() is None:
            kill_tree(sweep)
    assert sweep.returncode == 0, driver_log.read_text()[-3000:]
    assert not watcher.is_alive(), "the worker never reached the moment"
    (row,) = experiment.read_json("results.json")
    assert (row["status"], row["megabatch"]) == ("completed", megabatches)
    reports = experiment.tune_reports(row["trial_id"])
    heard = [r["megabatch"] for r in reports]
    run_dir = runs / row["trial_id"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert heard == [r["megabatch"] for r in logged] == list(range(1, megabatches + 1))
    assert len(list((run_dir / "checkpoints").glob("megabatch-0003.unreported-*"))) == 1
    assert logged[1]["seconds"] == reports[1]["seconds"]  # megabatch 2 was not recomputed
    sizes = [r["world_size"] for r in logged]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes
    assert [r["world_size"] for r in reports] == sizes
    print(f"elastic trial: world sizes {sizes}")
