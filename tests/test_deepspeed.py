"""The DeepSpeed engine: config translation, and real 2-rank runs through the `deepspeed`
launcher (CPU accelerator, gloo) at ZeRO stages 0, 1 and 2 on real digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app_dist.config import EngineSettings, TrainSettings, load_config
from app_dist.engine.deepspeed_config import deepspeed_config, load_raw, translate
from app_dist.engine.deepspeed_engine import SHM_ALLREDUCE_PREFIX
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.models.registry import build_model
from app_dist.pruning.masks import MaskSet, attach_masks
from app_dist.pruning.schedule import density_schedule

from .conftest import (
    REPO,
    checkpoint_folder,
    deepspeed_run_args,
    digits_run_args,
    launch_trainer,
    made_once,
    read_metrics,
    rewound_copy,
    run_trainer,
    trainer_command,
    trainer_env,
    wait_for,
)


def shared_allreduce_buffers(command: list[str]) -> set[str]:
    """The all-reduce buffers in /dev/shm of the launch `command` started (their names hold
    its master port), not those of other runs on the machine (the suite's other tests)."""
    port = command[command.index("--master_port") + 1]
    return {path.name for path in Path("/dev/shm").glob(f"{SHM_ALLREDUCE_PREFIX}_*_{port}_*")}


# ---------------------------------------------------------------------------- translation


def test_translation_carries_batch_zero_precision_accumulation_and_clipping():
    engine = EngineSettings(kind="deepspeed", zero_stage=2, gradient_accumulation=4,
                            gradient_clipping=1.5)
    config = translate(engine, TrainSettings(batch_size=64), world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 256
    assert config["gradient_clipping"] == 1.5
    assert config["zero_optimization"] == {"stage": 2}  # clipping reads the gradient norm
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    bf16 = translate(EngineSettings(kind="deepspeed", precision="bf16"), TrainSettings(), 1)
    assert bf16["bf16"] == {"enabled": True}
    assert bf16["data_types"] == {"buffer_dtype": "bf16"}  # BatchNorm statistics too
    assert "data_types" not in config
    plain = translate(EngineSettings(kind="deepspeed", zero_stage=1), TrainSettings(), 2)
    assert plain["zero_optimization"] == {"stage": 1, "compute_grad_norm": False}


def test_a_raw_deepspeed_json_overrides_the_translated_keys(tmp_path):
    raw_file = tmp_path / "ds.json"
    raw_file.write_text(json.dumps({"zero_optimization": {"stage": 2,
                                                          "reduce_bucket_size": 1000},
                                    "gradient_clipping": 0.5,
                                    "gradient_accumulation_steps": 2}))
    engine = EngineSettings(kind="deepspeed", zero_stage=1, deepspeed_config=str(raw_file))
    config = deepspeed_config(engine, TrainSettings(batch_size=64), 2, "cpu",
                              load_raw(raw_file))
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["gradient_clipping"] == 0.5
    assert config["train_batch_size"] == 32 * 2 * 2  # recomputed from the raw accumulation
    assert config["train_micro_batch_size_per_gpu"] == 32  # translated key kept


@pytest.mark.parametrize("raw, device, message", [
    ({"optimizer": {"type": "Adam"}}, "cpu", "remove 'optimizer'"),
    ({"train_micro_batch_size_per_gpu": 7}, "cpu", "differs from train.batch_size"),
    ({"zero_optimization": {"stage": 3}}, "cpu", "stage 3 is not supported"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, "cpu", "needs a GPU"),
    ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "cuda",
     "needs ZeRO stage 1 or 2"),
])
def test_raw_settings_that_would_break_masks_or_data_order_are_refused(raw, device, message):
    engine = EngineSettings(kind="deepspeed", deepspeed_config="ds.json")
    with pytest.raises(ConfigError, match=message) as caught:
        deepspeed_config(engine, TrainSettings(batch_size=64), 2, device, raw)
    assert "ds.json" in str(caught.value) and "\n" not in str(caught.value)


def test_half_precision_on_cpu_names_the_config_key():
    engine = EngineSettings(kind="deepspeed", precision="fp16")
    with pytest.raises(ConfigError, match="'engine.precision' = 'fp16'.*needs a GPU"):
        deepspeed_config(engine, TrainSettings(), 1, "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["engine.kind=deepspeed", "engine.zero_stage=3"], "ZeRO-3 is not supported"),
    (["engine.kind=deepspeed", "engine.precision=bf16", "run.device=cpu"], "needs a GPU"),
    (["engine.kind=deepspeed", "engine.precision=fp16", "engine.zero_stage=0"],
     "needs engine.zero_stage 1 or 2"),
    (["engine.gradient_accumulation=2"], "only engine.kind=deepspeed uses it"),
    (["engine.kind=deepspeed", "engine.deepspeed_config=/no/such.json"], "no such file"),
])
def test_config_validation_refuses_engine_settings_it_cannot_honour(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(REPO / "configs/digits.yaml", overrides)
    assert "\n" not in str(caught.value)


def test_train_refuses_zero3_before_starting_anything(capsys):
    from app_dist.train import main

    code = main(["--config", str(REPO / "configs/digits.yaml"), "engine.kind=deepspeed",
                 "engine.zero_stage=3"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.startswith("error: config key 'engine.zero_stage' = 3") and "\n" not in error


def test_masks_follow_their_layers_when_the_model_is_cast():
    """DeepSpeed's .half()/.bfloat16() and .to(device) replace buffer tensors: the MaskSet
    must keep addressing the buffers the forward uses (and the gradient hooks too)."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.5], std=[0.25])
    masks = MaskSet(model, attach_masks(model))
    model.to(torch.float64)
    name = next(iter(masks.masks))
    layer = model.get_submodule(name.rpartition(".")[0])
    masks.set({n: torch.zeros_like(m) for n, m in masks.masks.items()})
    assert layer.weight_mask.dtype == torch.float64 and not layer.weight_mask.any()
    model(torch.rand(2, 1, 8, 8, dtype=torch.float64)).sum().backward()
    assert not masks.weights[name].grad.any()


# ---------------------------------------------------------------------------- real runs

ACCUMULATION_AND_CLIPPING = """
import dataclasses
import torch
from app_dist.config import load_config
from app_dist.engine.acceleration import resolve_perf
from app_dist.foundations.distributed import start_platform
from app_dist.engine import build_engine
from app_dist.models.registry import build_model
from app_dist.pruning.masks import MaskSet, attach_masks

config = load_config(None, ["engine.kind=deepspeed", "engine.zero_stage=1", "run.device=cpu",
                            "engine.gradient_accumulation=2", "engine.gradient_clipping=0.001",
                            "train.batch_size=16", "train.weight_decay=0", "train.lr=1.0"])
torch.manual_seed(0)
model = build_model("digits_cnn", 10, in_channels=1, mean=[0.3], std=[0.4])
masks = MaskSet(model, attach_masks(model))
platform = start_platform("cpu")
config = dataclasses.replace(config, perf=resolve_perf(config.perf, platform.device, "deepspeed"))
engine = build_engine(config, model, masks, platform)
engine.apply_masks({n: (torch.rand(m.shape) < 0.5).float() for n, m in masks.masks.items()})
images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
labels = torch.randint(0, 10, (16,))
flat = lambda: torch.cat([p.detach().flatten().clone() for p in model.parameters()])
before = flat()
engine.train_step(images, labels)
print("after 1 micro-batch", float((flat() - before).abs().max()))
engine.train_step(images, labels)
print("after 2 micro-batches", float((flat() - before).norm()))
print("residue", engine.pruned_residue())
"""


@pytest.mark.slow
@pytest.mark.deepspeed
def test_gradient_accumulation_and_clipping_reach_deepspeed_in_a_plain_python_process():
    """One process started with plain `python` (no launcher): the optimizer steps once per
    2 micro-batches, and the step is clipped (lr 1, no momentum yet, no weight decay: the
    update is the clipped gradient, norm <= 0.001)."""
    result = subprocess.run([sys.executable, "-c", ACCUMULATION_AND_CLIPPING], cwd=REPO,
                            env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    moved = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines()
                 if line.startswith("after"))
    assert float(moved["after 1 micro-batch"]) == 0.0
    assert 0 < float(moved["after 2 micro-batches"]) <= 0.001 * (1 + 1e-4)
    assert "residue {'weights': 0.0, 'master_weights': 0.0, 'optimizer_state': 0.0}" in (
        result.stdout)


def run_deepspeed(args: list[str], nproc: int = 2, env: dict[str, str] | None = None,
                  timeout: int = 400) -> subprocess.CompletedProcess[str]:
    """app_dist/train.py under the `deepspeed` launcher, `nproc` ranks (gloo on the CPU)."""
    return subprocess.run(trainer_command(args, nproc, launcher="deepspeed"), cwd=REPO,
                          env=trainer_env(env), capture_output=True, text=True,
                          timeout=timeout)


def ds_args(shards: Path, run_dir: Path, stage: int) -> list[str]:
    return deepspeed_run_args(shards, run_dir, stage)


@pytest.fixture(scope="module")
def ddp_without_channels_last(digits_shards, tmp_path_factory) -> Path:
    """The 2-rank DDP run DeepSpeed must reproduce: channels_last off, as auto chooses for
    DeepSpeed (DDP's auto turns it on, which changes float rounding)."""
    def make(run_dir: Path) -> None:
        result = run_trainer(digits_run_args(digits_shards, run_dir, "perf.channels_last=false"),
                             nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]

    return made_once(tmp_path_factory, "ddp-contiguous", make)


def engine_copies(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The model weights, the fp32 master weights and the momentum by parameter name, read
    back from a checkpoint's DeepSpeed files (independently of the engine's own audit).
    ZeRO 1/2 partitions: concatenated over ranks and cut by parameter as DeepSpeed's own
    zero_to_fp32 does."""
    tag = folder / "deepspeed" / "engine"
    model_states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    weights = model_states["module"]
    optim_files = sorted(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not optim_files:  # stage 0, fp32: the weights are the master; the client SGD's state
        names = [n for n in weights if n not in model_states["buffer_names"]]
        state = model_states["optimizer"]["state"]
        return {"model": weights, "master": {n: weights[n] for n in names},
                "momentum": {n: state[i]["momentum_buffer"] for i, n in enumerate(names)}}
    shapes = model_states["param_shapes"]
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in optim_files]
    copies: dict[str, dict[str, torch.Tensor]] = {"model": weights, "master": {},
                                                  "momentum": {}}
    for group, group_shapes in enumerate(shapes):
        flats = {
            "master": torch.cat([p["single_partition_of_fp32_groups"][group] for p in parts]),
            "momentum": torch.cat([p["base_optimizer_state"]["state"][group]["momentum_buffer"]
                                   for p in parts]),
        }
        paddings = parts[0].get("param_alignment_paddings")
        offset = 0
        for index, (name, shape) in enumerate(group_shapes.items()):
            count = shape.numel()
            for kind, flat in flats.items():
                copies[kind][name] = flat.narrow(0, offset, count).view(shape)
            offset += count + (paddings[group][index] if paddings else 0)
    return copies


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_pruned_weights_are_exactly_zero_in_every_copy_and_masks_agree(zero_runs, stage):
    run_dir = zero_runs(stage)
    schedule = density_schedule("app", 3, 4.5)
    for t in range(1, 4):
        folder = checkpoint_folder(run_dir, t)
        masks = torch.load(folder / "state.pt", weights_only=True)["masks"]
        kept = sum(int(m.sum()) for m in masks.values())
        assert kept == round(schedule[t - 1] * sum(m.numel() for m in masks.values()))
        for rank in range(2):
            audit = torch.load(folder / f"rank-{rank:05d}.pt", weights_only=True)
            for name, mask in masks.items():
                assert torch.equal(audit["masks"][name], mask), (t, rank, name)
            assert audit["pruned_residue"] == {"weights": 0.0, "master_weights": 0.0,
                                               "optimizer_state": 0.0}, (t, rank)
        copies = engine_copies(folder)
        for name, mask in masks.items():
            pruned = ~mask
            assert pruned.any()
            for kind in ("model", "master", "momentum"):
                assert torch.count_nonzero(copies[kind][name][pruned]) == 0, (t, kind, name)
            # The master is what the model computes with: no stale copy anywhere.
            assert torch.equal(copies["master"][name], copies["model"][name]), (t, name)
        assert any(copies["momentum"][name].any() for name in masks)  # momentum is real


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_computes_what_ddp_computes(zero_runs, ddp_without_channels_last, stage):
    """Same data order, same SGD, same masks: two ranks summing two gradients is exact in
    either order, so DeepSpeed at every ZeRO stage reproduces the DDP run's metrics."""
    assert read_metrics(zero_runs(stage)) == read_metrics(ddp_without_channels_last)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_export_reads_the_deepspeed_checkpoint_into_the_masked_model(zero_runs, tmp_path):
    """`app-dist export` of a ZeRO-2 run: the module DeepSpeed saved, masks folded in."""
    from app_dist.engine.deepspeed_engine import saved_module_state
    from app_dist.models.sparse_file import load_exported
    from app_dist.results.export import export_run

    run_dir = zero_runs(2)
    exported = export_run(run_dir, tmp_path / "model.pt", latency=False)
    final = checkpoint_folder(run_dir, 3)
    masks = torch.load(final / CheckpointFiles.STATE, weights_only=True)["masks"]
    module_state = saved_module_state(final)
    assert exported.density == pytest.approx(
        sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))
    weights = load_exported(exported.path).state_dict()
    for name, value in weights.items():
        want = module_state[name] * masks[name] if name in masks else module_state[name]
        assert torch.equal(value, want), name


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_killed_deepspeed_run_resumes_and_matches_the_uninterrupted_run(digits_shards,
                                                                         zero_runs, tmp_path):
    reference = zero_runs(2)
    run_dir = tmp_path / "killed"
    launcher = launch_trainer(ds_args(digits_shards, run_dir, 2), nproc=2, launcher="deepspeed")
    assert wait_for(checkpoint_folder(run_dir, 1) / CheckpointFiles.MARKER, launcher,
                    timeout=300)
    # A crash: SIGKILL the launcher's whole process group (runner, launch.py, both ranks).
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    assert not checkpoint_folder(run_dir, 3).exists()
    # DeepSpeed's CPU all-reduce buffers (69 MB a rank, in RAM) are not left behind.
    assert not shared_allreduce_buffers(launcher.args)

    command = trainer_command(ds_args(digits_shards, run_dir, 2), 2, launcher="deepspeed")
    resumed = subprocess.run(command, cwd=REPO, env=trainer_env(), capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not shared_allreduce_buffers(command)
    assert "resuming after megabatch" in resumed.stdout
    assert read_metrics(run_dir) == read_metrics(reference)
    final = [checkpoint_folder(d, 3) for d in (run_dir, reference)]
    masks = [torch.load(f / "state.pt", weights_only=True)["masks"] for f in final]
    for name, mask in masks[0].items():
        assert torch.equal(mask, masks[1][name]), name
    copies = [engine_copies(f) for f in final]
    for kind in ("model", "master", "momentum"):
        for name, value in copies[0][kind].items():
            assert torch.equal(value, copies[1][kind][name]), (kind, name)


RECORD_AT_RESUME = """
import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from app_dist.config import load_config
from app_dist.data.workers import stop_readers
from app_dist.foundations.distributed import start_platform
from app_dist.train import setup_logging, train
from app_dist.training.run_input import prepare
from app_dist.training.events import Callback


class RecordAtResume(Callback):
    '''When the engine is restored, before any step: the masks, the module's state and every
    parameter's fp32 master and momentum, gathered whole by DeepSpeed (all ranks call the
    gathers), written by rank 0.'''

    def __init__(self, rank):
        self.rank = rank

    def run_start(self, engine):
        record = {"masks": engine.masks.state_dict(), "model": engine.module.state_dict(),
                  "master": {}, "momentum": {}}
        for name, parameter in engine.module.named_parameters():
            record["master"][name] = safe_get_full_fp32_param(parameter)
            record["momentum"][name] = safe_get_full_optimizer_state(parameter,
                                                                     "momentum_buffer")
        if self.rank == 0:
            torch.save(record, os.environ["RECORD_AT_RESUME"])


if __name__ == "__main__":  # reader processes start from a fork server that imports this
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    config = load_config(args[1], args[2:])
    manifest, stream = prepare(config)
    platform = start_platform(config.run.device, config.engine.timeout_s)
    setup_logging(platform)
    try:
        train(config, manifest, stream, platform, callbacks=[RecordAtResume(platform.rank)])
    finally:
        stop_readers()
        platform.shutdown()
"""


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("saved_ranks, resumed_ranks", [(2, 1), (1, 2)])
def test_zero2_checkpoint_resumes_on_another_number_of_ranks(digits_shards, zero_runs, tmp_path,
                                                             saved_ranks, resumed_ranks):
    """A ZeRO-2 checkpoint of megabatch 1 resumes on another number of ranks
    (checkpoint.allow_world_size_change): the restored engine holds exactly the saved masks,
    module state, fp32 master weights and momentum (read back from DeepSpeed's partition
    files of the saved run on one side, gathered from the live engine on the other), and the
    run trains on to its end on the new number of ranks with every copy still masked. The
    1-rank checkpoint comes from a run SIGKILLed after megabatch 1; the 2-rank one is the
    shared ZeRO-2 run as it stood after megabatch 1 (its later checkpoints removed, as a
    crash there leaves it)."""
    run_dir = tmp_path / "run"
    if saved_ranks == 2:
        args = ds_args(digits_shards, run_dir, 2) + ["log.wandb.mode=disabled"]
        rewound_copy(zero_runs(2), run_dir, 1)
        megabatches = 3
    else:
        args = ds_args(digits_shards, run_dir, 2) + ["data.megabatches=2", "train.epochs=1",
                                                     "log.wandb.mode=disabled"]
        first = launch_trainer(args, nproc=saved_ranks, launcher="deepspeed")
        assert wait_for(checkpoint_folder(run_dir, 1) / CheckpointFiles.MARKER, first,
                        timeout=300)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        megabatches = 2
    assert not checkpoint_folder(run_dir, 2).exists()

    script = tmp_path / "record_at_resume.py"
    script.write_text(RECORD_AT_RESUME)
    record_path = tmp_path / "at-resume.pt"
    command = trainer_command([*args, "checkpoint.allow_world_size_change=true"],
                              resumed_ranks, launcher="deepspeed")
    command[command.index(str(REPO / "app_dist" / "train.py"))] = str(script)
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                             env=trainer_env({"RECORD_AT_RESUME": str(record_path)}))
    assert resumed.returncode == 0, (resumed.stdout[-2000:], resumed.stderr[-3000:])
    assert "resuming after megabatch 1" in resumed.stdout

    saved_folder = checkpoint_folder(run_dir, 1)
    saved = engine_copies(saved_folder)
    saved_masks = torch.load(saved_folder / "state.pt", weights_only=True)["masks"]
    record = torch.load(record_path, weights_only=True)
    assert record["masks"].keys() == saved_masks.keys()
    for name, mask in saved_masks.items():
        assert torch.equal(record["masks"][name], mask), name
    assert record["model"].keys() == saved["model"].keys()
    for kind in ("model", "master", "momentum"):
        for name, value in saved[kind].items():
            assert torch.equal(record[kind][name], value), (kind, name)
    assert any(value.any() for value in saved["momentum"].values())  # momentum is real

    assert [r["megabatch"] for r in read_metrics(run_dir)] == list(range(1, megabatches + 1))
    final = checkpoint_folder(run_dir, megabatches)
    marker = json.loads((final / CheckpointFiles.MARKER).read_text())
    assert marker["world_size"] == resumed_ranks
    masks = torch.load(final / "state.pt", weights_only=True)["masks"]
    for rank in range(resumed_ranks):
        audit = torch.load(final / CheckpointFiles.rank(rank), weights_only=True)
        for name, mask in masks.items():
            assert torch.equal(audit["masks"][name], mask), (rank, name)
        assert audit["pruned_residue"] == {"weights": 0.0, "master_weights": 0.0,
                                           "optimizer_state": 0.0}, rank
