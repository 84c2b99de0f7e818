"""Shared fixtures: real digits shards; the trainer started for real (run_trainer to wait for
it, launch_trainer + wait_for to interrupt it); and the runs the suite trains once and shares
(uninterrupted, finished_run). Markers (pyproject.toml): a test that starts a trainer, or uses
a fixture that does, is `slow`; `make test-fast` runs the others."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from app_dist.data.source import LocalShards
from app_dist.foundations.files import file_sha256
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.training.record import PHASE_KEYS, WALL_CLOCK_KEYS

REPO = Path(__file__).resolve().parent.parent
# Real data kept outside the checkout (a `shared/data` folder beside it, or where these variables
# say): the tests that read it skip without it, and say so.
SHARED_DATA = Path(os.environ.get("APP_DIST_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGENET_SAMPLE = Path(os.environ.get("APP_DIST_IMAGENET_SAMPLE",
                                      SHARED_DATA / "imagenet-sample-restricted"))
CIFAR_TAR = SHARED_DATA / "cifar10-jpg.tar"


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker computes with one thread, in process and in what it starts
    without trainer_env: the workers share the 2 cores, and torch's default of a thread per
    core in each of them (the trainer's own choice too when OMP_NUM_THREADS is unset:
    foundations/distributed.py) makes the threads wait on each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the suite on three pytest-xdist workers (`-n 3 --dist loadgroup`):
    most tests wait as much as they compute (processes starting, Ray's polling, faults timed
    by pauses), so three at a time keep 2 cores busier than one or two. The tests that start
    Ray clusters run one after another on one worker (their group): two clusters at once
    would share the cores with each other's health checks, which declare a node dead after
    5 s without an answer."""
    for item in items:
        if item.get_closest_marker("ray") and item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("ray"))
    # xdist hands out the Ray group first (its largest unit of work) and then single tests
    # in collection order: the slow ones first, so that the short ones fill the gaps at the
    # end instead of a slow test from a late file running on alone.
    items.sort(key=lambda item: not item.get_closest_marker("slow"))


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str,
              make: Callable[[Path], None]) -> Path:
    """Folder `name`, filled by `make` once per test session. Under pytest-xdist each worker
    has its own session, and the suite's shared runs would be trained once per worker: here
    they share one folder, the first worker to ask makes it while the others wait on its lock.
    A `make` that fails leaves no mark of completion, so the next one to ask tries again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-<n>, above the workers' own folders
    shared = base / "made-once"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's real 8x8 digits as shards of 25 samples (60 train, 12 test shards)."""
    from app_dist.data.prepare.shards import write_shards

    def make(folder: Path) -> None:
        write_shards("digits", None, str(folder / "shards"), samples_per_shard=25, seed=0)

    return made_once(tmp_path_factory, "digits", make) / "shards"


def trainer_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process a test starts: wandb offline (never the network),
    one OpenMP thread per process (the ranks share a few cores), then the test's own `env`."""
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}


def trainer_command(args: list[str], nproc: int = 1, launcher: str = "torchrun",
                    launcher_args: Sequence[str] = ()) -> list[str]:
    """app_dist/train.py as users start it: plain python for 1 process; torchrun (gloo on the
    CPU) for more, or with `launcher_args` (e.g. --max-restarts); or, with launcher
    "deepspeed", the `deepspeed` launcher, which on a CPU-only machine counts NUMA nodes as
    devices, so --num_gpus N starts N ranks on the CPU accelerator (gloo) all the same."""
    script = str(REPO / "app_dist" / "train.py")
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), *launcher_args, script, *args]
    assert launcher == "torchrun", launcher
    if nproc == 1 and not launcher_args:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *launcher_args, script, *args]


def run_trainer(args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
                timeout: int = 300, launcher: str = "torchrun"
                ) -> subprocess.CompletedProcess[str]:
    """Run app_dist/train.py for real (see trainer_command) and wait for it to end.
    wandb is off unless the test sets log.wandb.mode: its service process costs every run
    2-3 s, and only the tests that read what wandb wrote need it."""
    if not any(arg.startswith("log.wandb.mode=") for arg in args):
        args = [*args, "log.wandb.mode=disabled"]
    return subprocess.run(trainer_command(args, nproc, launcher), cwd=REPO, env=trainer_env(env),
                          capture_output=True, text=True, timeout=timeout)


def app_dist_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """`app-dist train ARGS` as a user runs it (the launcher wrapper with --nproc-per-node),
    waited for."""
    return subprocess.run([sys.executable, "-m", "app_dist.cli", "train", *args], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=timeout)


def launch(command: list[str], env: dict[str, str] | None = None, cwd: Path = REPO,
           **popen: Any) -> subprocess.Popen:
    """Start `command` without waiting for it, in a session of its own (a test can signal
    its whole process group, and Ctrl-C on pytest does not reach it). Its output is
    discarded unless `popen` says otherwise (stdout=subprocess.PIPE, text=True, ...)."""
    options = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
               "start_new_session": True, **popen}
    return subprocess.Popen(command, cwd=cwd, env=trainer_env(env), **options)


def launch_trainer(args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
                   launcher: str = "torchrun", launcher_args: Sequence[str] = (),
                   **popen: Any) -> subprocess.Popen:
    """Start a real run of app_dist/train.py (see trainer_command) for a test to interrupt:
    `wait_for` one of its checkpoints, then kill or signal it. Unlike run_trainer it passes
    `args` unchanged (wandb as the config says)."""
    return launch(trainer_command(args, nproc, launcher, launcher_args), env, **popen)


def wait_for(target: Path | Callable[[], bool], process: subprocess.Popen, timeout: float,
             interval: float = 0.05) -> bool:
    """Poll until `target` exists (a path: a checkpoint folder, its marker file) or holds (a
    callable) while `process` runs. True once it does; False when the process ended first
    or `timeout` seconds passed without it."""
    ready = target.exists if isinstance(target, Path) else target
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            return ready()
        time.sleep(interval)
    return True


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (a node's ranks and their DataLoader workers, a Ray node's
    raylet and workers)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = [int(child) for child in found.stdout.split()]
    return [grandchild for child in children for grandchild in [child, *descendants(child)]]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL to `process` and everything below it at once, as a machine that loses power.
    (Its process group is not enough: torchrun starts every rank in a session of its own, and
    so does Ray its raylet and workers.)"""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def copy_shards(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_shard(directory: Path, name: str, edit) -> None:
    """Rewrite one shard's samples through `edit(sample) -> sample` and fix its sha256, so
    only the content is bad (the manifest checksum still matches)."""
    path = directory / name
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(edit({k: v for k, v in sample.items() if k != "__url__"}))
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard["sha256"] = file_sha256(path)
    manifest_path.write_text(json.dumps(manifest))


def first_sample_key(directory: Path, name: str) -> str:
    return next(iter(wds.WebDataset(str(directory / name), shardshuffle=False)))["__key__"]


def rank_processes(launcher_pid: int) -> list[int]:
    """The ranks torchrun started: its direct children (a rank's DataLoader workers share the
    rank's command line, so matching on the command line would count them too)."""
    found = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which legitimately differ between runs."""
    records = [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines()]
    for record in records:
        for wall_clock in WALL_CLOCK_KEYS:
            record.pop(wall_clock)
    return records


def assert_phases_fit(record: dict) -> None:
    """A megabatch record's phases were each measured and are disjoint parts of its wall time
    (a resumed megabatch's included: its earlier phases travel in the pre-emption checkpoint)."""
    phases = [record[key] for key in PHASE_KEYS]
    assert all(seconds > 0 for seconds in phases), record
    assert sum(phases) <= record["seconds"], record


def rewound_copy(run_dir: Path, target: Path, megabatch: int) -> Path:
    """A copy of the finished run `run_dir` as it stood after `megabatch`: later checkpoints
    removed, so the same command on the copy resumes there (as after a crash)."""
    shutil.copytree(run_dir, target)
    for folder in RunLayout(target).checkpoint_folders():
        if folder.completed > megabatch or folder.partial:
            shutil.rmtree(folder.path)
    return target


def digits_run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A small real run: 3 megabatches of digits, 2 epochs each, every checkpoint kept."""
    return ["--config", str(REPO / "configs/digits.yaml"), f"data.shards={shards}",
            f"run.dir={run_dir}", "data.megabatches=3", "train.epochs=2", "log.progress=false",
            "checkpoint.keep_last=10", *extra]


@pytest.fixture(scope="session")
def uninterrupted(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference 2-rank run (torchrun, gloo) that interrupted runs must reproduce."""
    def make(run_dir: Path) -> None:
        result = run_trainer(digits_run_args(digits_shards, run_dir), nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 rank(s) on cpu (DDP)" in result.stdout
        assert "Grad strides" not in result.stderr  # channels_last's size-1 stem (engine/ddp.py)

    return made_once(tmp_path_factory, "uninterrupted", make)


def reseal(folder: Path, name: str) -> None:
    """Give file `name` of a checkpoint folder its new sha256 in COMPLETE.json, as an attacker
    (or a careless copy) would, so the sha256 check passes and only loading can refuse it."""
    marker_path = folder / CheckpointFiles.MARKER
    marker = json.loads(marker_path.read_text())
    assert name in marker["sha256"], sorted(marker["sha256"])
    marker["sha256"][name] = file_sha256(folder / name)
    marker_path.write_text(json.dumps(marker))


def final_masks_and_weights(run_dir: Path, engine: str, megabatch: int = 3
                            ) -> tuple[dict, dict]:
    """The masks and model weights of a run's megabatch checkpoint (digits_run_args: the
    last), from either engine's files, for comparing an interrupted run with a reference."""
    import torch

    folder = RunLayout(run_dir).checkpoint(megabatch)
    masks = torch.load(folder / CheckpointFiles.STATE, weights_only=True)["masks"]
    if engine == "ddp":
        weights = torch.load(folder / CheckpointFiles.ENGINE, weights_only=True)["model"]
    else:
        files = sorted((folder / CheckpointFiles.DEEPSPEED).rglob("*model_states.pt"))
        # The project's own files, written by this suite's runs.
        weights = torch.load(files[0], weights_only=False)["module"]
    return masks, weights


def deepspeed_run_args(shards: Path, run_dir: Path, stage: int, *extra: str) -> list[str]:
    """digits_run_args for DeepSpeed at ZeRO stage `stage`."""
    return digits_run_args(shards, run_dir, "engine.kind=deepspeed",
                           f"engine.zero_stage={stage}", *extra)


@pytest.fixture(scope="session")
def zero_runs(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[int], Path]:
    """stage -> run directory of the uninterrupted 2-rank DeepSpeed run (gloo), made on first
    use and shared by every test that compares with or copies one. It is launched as users
    launch DeepSpeed through the project, `app-dist train --nproc-per-node 2 --launcher
    deepspeed` (the wrapper starts the deepspeed launcher), so every comparison with it also
    checks that the wrapper's launch computes what the deepspeed launcher's own does (the
    runs started with `deepspeed` directly: test_deepspeed.py, test_preemption.py)."""
    def get(stage: int) -> Path:
        def make(run_dir: Path) -> None:
            result = app_dist_train("--nproc-per-node", "2", "--launcher", "deepspeed",
                                    *deepspeed_run_args(digits_shards, run_dir, stage,
                                                        "log.wandb.mode=disabled"), timeout=400)
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
            assert "deepspeed.launcher.runner" in result.stdout  # the wrapper's command line
            assert f"2 rank(s) on cpu (DeepSpeed ZeRO-{stage})" in result.stdout
            assert "started by the deepspeed launcher" not in result.stdout

        return made_once(tmp_path_factory, f"zero{stage}", make)

    return get


def gpu_imagenet_run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A short real GPU run on ImageNet-sample shards: ResNet-18 at 64 px, 2 megabatches of
    1 epoch, bf16, the DDP engine on one GPU."""
    return ["--config", "configs/imagenet.yaml", f"data.shards={shards}", f"run.dir={run_dir}",
            "run.device=cuda", "engine.kind=ddp", "model.name=resnet18", "data.image_size=64",
            "data.megabatches=2", "train.epochs=1", "train.batch_size=16",
            "data.eval_batch_size=32", "data.num_workers=2", "data.shuffle_buffer=50",
            "train.milestones=[]", "perf.autocast=bf16", "log.progress=false", *extra]


def short_run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A finished run to read, not to compare: 1 process, T = 2 megabatches of digits,
    1 epoch each, APP to density 0.366 (0.8 after megabatch 1), both checkpoints kept."""
    return ["--config", str(REPO / "configs/digits.yaml"), f"data.shards={shards}",
            f"run.dir={run_dir}", "data.megabatches=2", "train.epochs=1",
            "data.num_workers=0", "log.progress=false", "checkpoint.keep_last=2", *extra]


@pytest.fixture(scope="session")
def finished_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's one short finished APP run (short_run_args), for every test that only reads
    a run (inspect, export, report, wandb's files). It logs to wandb offline (group
    test-sweep) for tests/test_wandb.py. A test that changes a run directory works on a
    copy: shutil.copytree(finished_run, tmp_path / "app"). The folder is named after the
    method, as the report's labels are. The trainer's stdout is finished_run_stdout."""
    def make(root: Path) -> None:
        result = run_trainer(short_run_args(digits_shards, root / "app", "log.wandb.mode=offline",
                                            "log.wandb.group=test-sweep"),
                             env={"WANDB_DIR": str(root / "wandb-dir")}, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (root / "stdout.txt").write_text(result.stdout)

    return made_once(tmp_path_factory, "finished", make) / "app"


@pytest.fixture(scope="session")
def finished_run_stdout(finished_run: Path) -> str:
    """What the trainer printed while making finished_run."""
    return (finished_run.parent / "stdout.txt").read_text()


def checkpoint_folder(run_dir: Path, megabatch: int) -> Path:
    return RunLayout(run_dir).checkpoint(megabatch)


def pruned_model(seed: int = 0, name: str = "resnet20s", stem: str = "cifar"
                 ) -> tuple[Any, Any]:
    """(model, MaskSet): a registry model with 10 classes pruned to density 0.4 by random
    scores (global threshold)."""
    import torch

    from app_dist.models.registry import build_model
    from app_dist.pruning.masks import MaskSet, attach_masks
    from app_dist.pruning.threshold import masks_from_scores

    torch.manual_seed(seed)
    model = build_model(name, 10, stem=stem, mean=[0.5] * 3, std=[0.25] * 3)
    masks = MaskSet(model, attach_masks(model))
    scores = {key: torch.rand(w.shape) for key, w in masks.weights.items()}
    current = {key: m.clone() for key, m in masks.masks.items()}
    masks.update(masks_from_scores(scores, current, 0.4, "global"), optimizer=None)
    return model, masks


class EvaluationBatches(list):
    """A pass for Evaluator.evaluate: (images, labels) batches with no bad samples."""

    skipped = 0


def compiled_megabatches_do_not_recompile(config: Any, platform: Any, model: Any, masks: Any,
                                          images: Any, labels: Any, batch: int,
                                          loss_tolerance: float = 1e-3) -> None:
    """perf.compile as a run uses it: build_engine compiles `model`, the Evaluator (with
    `config`'s fold_batchnorm) evaluates it. One megabatch (2 training steps, then a pass
    over `images` in batches of `batch`, the last one smaller) compiles every graph; two
    more, each after pruning in place to a lower density, must compile nothing (dynamo's
    error_on_recompile raises otherwise), keep pruned weights exactly zero after the steps,
    and evaluate the new weights and masks (the loss an eager forward of the training model
    gives, within `loss_tolerance`, relative). `config.perf` resolved; tensors on the CPU
    (moved to the platform's device)."""
    import torch
    import torch.nn.functional as F

    from app_dist.engine import build_engine
    from app_dist.engine.acceleration import eager
    from app_dist.pruning.threshold import masks_from_scores
    from app_dist.training.evaluation import Evaluator

    torch._dynamo.reset()
    engine = build_engine(config, model, masks, platform)
    evaluator = Evaluator(config, platform)
    device = platform.device
    passes = EvaluationBatches((images[start:start + batch], labels[start:start + batch])
                               for start in range(0, len(labels), batch))
    assert len(passes[-1][1]) < batch

    def megabatch() -> float:
        model.train()
        for _ in range(2):
            engine.train_step(images[:batch], labels[:batch])
        for key, weight in masks.weights.items():
            assert not weight[~masks.masks[key].bool()].any(), key
        return evaluator.evaluate(model, lambda: passes).loss

    def eager_loss() -> float:
        with torch.inference_mode(), eager():
            logits = model.eval()(images.to(device)).float()
        return float(F.cross_entropy(logits, labels.to(device)))

    megabatch()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2  # training, and evaluation (the folded copy or eval mode)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for density in (0.7, 0.4):
            scores = {key: torch.rand(w.shape, generator=torch.Generator().manual_seed(7))
                      .to(w.device) for key, w in masks.weights.items()}
            current = {key: m.clone() for key, m in masks.masks.items()}
            engine.apply_masks(masks_from_scores(scores, current, density, "global"))
            loss = megabatch()
            assert abs(loss - eager_loss()) <= loss_tolerance * max(1.0, abs(loss)), density
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def every_pass(shards: Path, perf: Any, *, megabatches: int, workers: int = 0, rank: int = 0,
               world_size: int = 1, device: Any = None, **data: Any) -> list:
    """Every batch a rank reads from a stream of `megabatches` over `shards` (per megabatch:
    two training epochs, validation and the scoring pass; then the test set), each labelled
    with where it came from, images moved to the CPU. `data`: further DataSettings (augment,
    image_size, eval_batch_size, ...). For comparing input paths batch by batch."""
    import torch

    from app_dist.config import DataSettings
    from app_dist.data.manifest import Manifest
    from app_dist.data.reader import StreamReader
    from app_dist.data.stream import MegabatchStream
    from app_dist.foundations.distributed import Platform

    manifest = Manifest.load(str(shards))
    stream = MegabatchStream(manifest, megabatches, 0.1, "full", 2, 1000, seed=1)
    settings = DataSettings(shards=str(shards), num_workers=workers, shuffle_buffer=50, **data)
    platform = Platform(rank, world_size, 0, device or torch.device("cpu"))
    reader = StreamReader(LocalShards(shards), manifest, stream, settings, 16, platform, seed=1,
                          perf=perf)
    batches: list = []
    for megabatch in range(1, megabatches + 1):
        for epoch in (0, 1):
            batches += [("train", megabatch, epoch, b)
                        for b in reader.train_epoch(megabatch, epoch)]
        batches += [("val", megabatch, b) for b in reader.evaluation(
            stream.val_selection(megabatch))]
        batches += [("score", megabatch, b) for b in reader.scoring(megabatch, 0.2)]
    batches += [("test", b) for b in reader.evaluation(stream.test_selection())]
    return [(*where, (images.cpu(), labels.cpu())) for *where, (images, labels) in batches]
