"""The perf.* switches: each one is either exact (the same batches, the same metrics) or
within float tolerance, the GPU-only ones are refused on the CPU with one clear line, and
`auto` (the default of most) resolves per device and engine, as the run's log says."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import operator
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from app_dist.config import (
    AUTO_SWITCHES,
    Config,
    DataSettings,
    PerfSettings,
    TrainSettings,
    changed_settings,
    computation_settings,
    config_hash,
    load_config,
    plain_perf,
)
from app_dist.data.augment import SampleTransform
from app_dist.data.batches import make_batches
from app_dist.data.device_decode import decode_on_device
from app_dist.data.manifest import Manifest
from app_dist.data.pipeline import pack_encoded
from app_dist.data.plan import evaluation_plan, training_plan
from app_dist.data.prepare.shards import write_shards
from app_dist.data.reader import StreamReader
from app_dist.data.shard_files import ShardFiles
from app_dist.data.source import LocalShards
from app_dist.data.stream import MegabatchStream
from app_dist.engine import build_engine
from app_dist.engine.acceleration import (
    accelerate,
    check_device,
    describe_perf,
    resolve_perf,
)
from app_dist.engine.ddp import DDPEngine
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import ConfigError, DataError
from app_dist.models.registry import build_model
from app_dist.pruning.masks import MaskSet, attach_masks
from tests.conftest import (
    IMAGENET_SAMPLE,
    REPO,
    compiled_megabatches_do_not_recompile,
    digits_run_args,
    every_pass,
    pruned_model,
    read_metrics,
    run_trainer,
    short_run_args,
)

CPU = Platform(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ---------------------------------------------------------------- data: exact equality

def _every_pass(shards: Path, perf: PerfSettings, workers: int, rank: int = 0,
                world_size: int = 1) -> list:
    """Every batch of a 3-megabatch CIFAR-augmented stream (see conftest.every_pass)."""
    return every_pass(shards, perf, megabatches=3, workers=workers, rank=rank,
                      world_size=world_size, augment="cifar", eval_batch_size=40)


def _assert_same_batches(expected: list, got: list) -> None:
    assert [b[:-1] for b in got] == [b[:-1] for b in expected]
    for want, have in zip(expected, got):
        assert torch.equal(want[-1][0], have[-1][0]), want[:-1]
        assert torch.equal(want[-1][1], have[-1][1]), want[:-1]


@pytest.mark.parametrize("workers,rank,world_size", [
    (0, 0, 1),
    pytest.param(2, 0, 1, marks=pytest.mark.slow),  # worker processes: 5-20 s
    pytest.param(3, 1, 2, marks=pytest.mark.slow),
])
def test_cache_and_worker_pool_give_the_shard_readers_batches(digits_shards: Path, workers: int,
                                                              rank: int,
                                                              world_size: int) -> None:
    """Same images (augmentation included), labels and order, pass by pass, whether the
    samples come from the shards, the decoded cache or a persistent worker pool."""
    expected = _every_pass(digits_shards, plain_perf(), workers, rank, world_size)
    assert len(expected) > 50
    variants = [plain_perf(cache_decoded=True)]
    if workers:  # a pool needs worker processes; its cache fills through them
        variants += [plain_perf(persistent_workers=True),
                     plain_perf(cache_decoded=True, persistent_workers=True)]
    for perf in variants:
        _assert_same_batches(expected, _every_pass(digits_shards, perf, workers, rank,
                                                   world_size))


def test_cache_decodes_each_sample_once_and_respects_its_budget(digits_shards: Path,
                                                                caplog) -> None:
    manifest = Manifest.load(str(digits_shards))
    stream = MegabatchStream(manifest, 3, 0.1, "full", 2, 1000, seed=1)
    settings = DataSettings(shards=str(digits_shards), augment="cifar", num_workers=0)
    reader = StreamReader(LocalShards(digits_shards), manifest, stream, settings, 16, CPU, seed=1,
                          perf=plain_perf(cache_decoded=True))
    decoded = []
    real_decode = reader._decode
    reader._decode = lambda selection: (decoded.append(len(selection))
                                        or real_decode(selection))
    for epoch in range(3):
        list(reader.train_epoch(1, epoch))
    assert sum(decoded) == len(stream.train_selection(1)) == len(reader.cache)

    # A budget below one megabatch: the first fill goes in, later ones are refused with one
    # warning, and those passes read the shards (still the same batches).
    reference = StreamReader(LocalShards(digits_shards), manifest, stream, settings, 16, CPU,
                             seed=1)
    small = StreamReader(LocalShards(digits_shards), manifest, stream, settings, 16, CPU, seed=1,
                         perf=plain_perf(cache_decoded=True))
    small.cache.max_bytes = len(stream.train_selection(1)) * 64 + 100  # 8x8x1 uint8 each
    with caplog.at_level(logging.WARNING, logger="app_dist"):
        for megabatch in (1, 2, 3):
            got = list(small.train_epoch(megabatch, 0))
            want = list(reference.train_epoch(megabatch, 0))
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                       for a, b in zip(want, got)) and len(got) == len(want)
    assert small.cache.bytes <= small.cache.max_bytes
    assert sum("perf.cache_max_mb" in r.message for r in caplog.records) == 1


@pytest.mark.slow
def test_a_process_holding_a_worker_pool_exits_by_itself(digits_shards: Path) -> None:
    """Pool workers ignore SIGTERM (pre-emption is the trainer's to handle); the pool must
    still let its process exit when nobody closes it."""
    script = f"""
import torch
from pathlib import Path
from app_dist.config import DataSettings, plain_perf
from app_dist.data.manifest import Manifest
from app_dist.data.reader import StreamReader
from app_dist.data.stream import MegabatchStream
from app_dist.foundations.distributed import Platform
from app_dist.data.source import LocalShards
shards = Path({str(digits_shards)!r})
manifest = Manifest.load(str(shards))
stream = MegabatchStream(manifest, 3, 0.1, "full", 2, 1000, 1)
reader = StreamReader(LocalShards(shards), manifest, stream, DataSettings(num_workers=2), 16,
                      Platform(0, 1, 0, torch.device("cpu")), 1,
                      perf=plain_perf(persistent_workers=True))
print(sum(len(labels) for _, labels in reader.train_epoch(1, 0)))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) > 0


def test_prefetch_reads_ahead_the_next_megabatchs_new_shards(digits_shards: Path) -> None:
    manifest = Manifest.load(str(digits_shards))
    stream = MegabatchStream(manifest, 3, 0.1, "full", 2, 1000, seed=1)
    reader = StreamReader(LocalShards(digits_shards), manifest, stream,
                          DataSettings(shards=str(digits_shards), num_workers=0), 16, CPU, 1)
    reader.train_epoch(1, 0)
    assert reader.prefetched == [str(digits_shards / s.name) for s in stream.megabatch_shards(2)]
    reader.prefetched = []
    reader.train_epoch(1, 1)  # only at a megabatch's first epoch
    reader.train_epoch(3, 0)  # and never past the last megabatch
    assert reader.prefetched == []


def test_decoding_batches_on_a_device_matches_decoding_in_workers(tmp_path: Path) -> None:
    """perf.gpu_decode's path, run with the CPU as the device: workers only read headers and
    draw the augmentation, the training process decodes the batch; same pixels exactly."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip("the ImageNet sample is not on this machine")
    shards = tmp_path / "imagenet"
    write_shards("imagefolder", str(IMAGENET_SAMPLE), str(shards), samples_per_shard=20,
                 seed=0, test_fraction=0.2)
    manifest = Manifest.load(str(shards))
    selection = MegabatchStream(manifest, 2, 0.1, "full", 2, 1000, seed=1).train_selection(2)
    plan = training_plan(selection, seed=1, megabatch=2, epoch=0, rank=0, world_size=1,
                         num_workers=2, batch_size=8)
    reader = StreamReader(
        LocalShards(shards), manifest, MegabatchStream(manifest, 2, 0.1, "full", 2, 1000,
                                                            seed=1),
                          DataSettings(augment="imagenet", image_size=64), 8, CPU, 1)
    for transform, worker_shards, train in (
            (reader.train_transform, plan.worker_shards, True),
            (reader.eval_transform, evaluation_plan(selection, rank=0, world_size=1,
                                                    num_workers=2), False)):
        options = {"transform": transform, "image_ext": "jpg",
                   "num_classes": manifest.num_classes, "batch_size": 8, "num_workers": 2,
                   "train": train, "seed": 3, "shuffle_buffer": 30,
                   "count": plan.batches if train else None}
        expected = list(make_batches(ShardFiles(shards), worker_shards, selection, **options))
        got = list(decode_on_device(make_batches(ShardFiles(shards), worker_shards, selection,
                                                 encoded=True, **options),
                                    transform, torch.device("cpu")))
        assert len(got) == len(expected) > 1
        for (want_images, want_labels), (images, labels) in zip(expected, got):
            assert images.shape[-2:] == (64, 64)
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def _encoded_batches(count: int, fail_at: int | None = None):
    """`count` batches of two 8x8 JPEGs in the readers' encoded form; DataError at `fail_at`."""
    from torchvision.io import encode_jpeg

    for index in range(count):
        if index == fail_at:
            raise DataError(f"shard-{index}.tar: truncated")
        images = [torch.full((3, 8, 8), 10 * index + j, dtype=torch.uint8) for j in range(2)]
        files = [encode_jpeg(image).numpy().tobytes() for image in images]
        yield pack_encoded(files), torch.tensor([index, index]), [None] * 2


def test_device_decoding_runs_ahead_in_order_and_stops_with_its_consumer() -> None:
    transform = SampleTransform(3, "none", 0, train=False)
    labels = [labels[0].item() for _, labels in
              decode_on_device(_encoded_batches(5), transform, torch.device("cpu"))]
    assert labels == [0, 1, 2, 3, 4]

    early = decode_on_device(_encoded_batches(50), transform, torch.device("cpu"))
    next(early)
    early.close()
    assert not [t for t in threading.enumerate() if t.name == "gpu-decode"]

    failing = decode_on_device(_encoded_batches(5, fail_at=2), transform, torch.device("cpu"))
    assert next(failing)[1][0] == 0 and next(failing)[1][0] == 1
    with pytest.raises(DataError, match="shard-2.tar"):
        next(failing)
    assert not [t for t in threading.enumerate() if t.name == "gpu-decode"]


# ---------------------------------------------------------------- auto

CUDA = torch.device("cuda", 0)  # a device object only: nothing here runs on a GPU


def test_auto_resolves_per_device_and_engine(digits_shards: Path) -> None:
    manifest = Manifest.load(str(digits_shards))
    auto = load_config(REPO / "configs/digits.yaml").perf
    assert all(getattr(auto, name) == "auto" for name in AUTO_SWITCHES)
    switches = operator.attrgetter(*AUTO_SWITCHES)  # cache, workers, NHWC, fold, compile, cuDNN
    assert switches(resolve_perf(auto, CPU.device, "ddp", manifest)) == (
        True, True, True, True, False, False)
    assert switches(resolve_perf(auto, CPU.device, "deepspeed", manifest)) == (
        True, True, False, True, False, False)
    assert switches(resolve_perf(auto, CUDA, "ddp", manifest)) == (
        True, True, True, True, True, True)
    assert switches(resolve_perf(auto, CUDA, "deepspeed", manifest)) == (
        True, True, False, True, False, True)
    assert resolve_perf(auto, CPU.device, "ddp").cache_decoded is False  # no dataset known


def test_explicit_switches_are_kept_as_set(digits_shards: Path) -> None:
    manifest = Manifest.load(str(digits_shards))
    config = load_config(REPO / "configs/digits.yaml",
                         ["perf.channels_last=false", "perf.fold_batchnorm=false",
                          "perf.cache_decoded=false", "perf.compile=true"])
    resolved = resolve_perf(config.perf, CPU.device, "ddp", manifest)
    assert (resolved.channels_last, resolved.fold_batchnorm, resolved.cache_decoded,
            resolved.compile, resolved.persistent_workers) == (False, False, False, True, True)
    assert resolve_perf(resolved, CUDA, "deepspeed", manifest) == resolved  # nothing left


def test_auto_caches_only_a_dataset_of_one_image_size_that_fits(digits_shards: Path) -> None:
    """digits: 1,797 images of 8x8x1 bytes. The whole dataset decoded is the bound."""
    manifest = Manifest.load(str(digits_shards))
    auto = PerfSettings()
    assert resolve_perf(auto, CPU.device, "ddp", manifest).cache_decoded
    varying = dataclasses.replace(manifest, image_size=None)  # ImageNet: sizes vary
    assert not resolve_perf(auto, CPU.device, "ddp", varying).cache_decoded
    large = dataclasses.replace(manifest, image_size=(2048, 2048))  # 7,188 MB decoded
    assert not resolve_perf(auto, CPU.device, "ddp", large).cache_decoded  # 4,096 MB
    roomy = PerfSettings(cache_max_mb=8192)
    assert resolve_perf(roomy, CPU.device, "ddp", large).cache_decoded
    on_gpu_decoder = PerfSettings(gpu_decode=True)  # the cache holds CPU-decoded images
    assert not resolve_perf(on_gpu_decoder, CUDA, "ddp", manifest).cache_decoded


def test_switches_read_auto_true_and_false_from_files_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("perf:\n  compile: true\n  channels_last: false\n  fold_batchnorm: auto\n")
    perf = load_config(path, ["perf.cudnn_benchmark=false", "perf.cache_decoded=true"]).perf
    assert (perf.compile, perf.channels_last, perf.fold_batchnorm, perf.cudnn_benchmark,
            perf.cache_decoded, perf.persistent_workers) == (True, False, "auto", False, True,
                                                             "auto")
    assert load_config(path, ["perf.compile=auto"]).perf.compile == "auto"
    for bad in ("perf.compile=maybe", "perf.compile=1", "perf.fold_batchnorm=on-gpu"):
        with pytest.raises(ConfigError, match="'perf.(compile|fold_batchnorm)'"):
            load_config(path, [bad])
    # auto is what these combinations need: it resolves to off where an explicit true is
    # refused (channels_last under DeepSpeed, the cache with GPU decoding).
    load_config(REPO / "configs/digits.yaml", ["engine.kind=deepspeed"])
    load_config(REPO / "configs/digits.yaml", ["perf.gpu_decode=true", "run.device=cuda"])


# A run directory's config.yaml from before auto: every switch written out as false.
SAVED_BEFORE_AUTO = """perf:
  cache_decoded: false
  cache_max_mb: 4096
  persistent_workers: false
  prefetch_shards: true
  pin_memory: true
  channels_last: false
  autocast: 'off'
  compile: false
  gpu_decode: false
  cudnn_benchmark: false
  fold_batchnorm: false
"""


def test_a_config_saved_before_auto_loads_and_resumes_as_it_ran(tmp_path: Path) -> None:
    """Its explicit false values stay booleans: the same settings hash, and the same
    computation settings its checkpoints recorded, so it resumes exactly; the defaults now
    resolve to other switches, which a resume with them lists as changed."""
    path = tmp_path / "config.yaml"
    path.write_text((REPO / "configs/digits.yaml").read_text() + SAVED_BEFORE_AUTO)
    saved = load_config(path)
    assert all(getattr(saved.perf, name) is False for name in AUTO_SWITCHES)
    explicit = load_config(REPO / "configs/digits.yaml",
                           [f"perf.{name}=false" for name in AUTO_SWITCHES])
    assert config_hash(saved) == config_hash(explicit) != config_hash(load_config(
        REPO / "configs/digits.yaml"))
    recorded = computation_settings(saved)  # what its checkpoints hold: switches as booleans
    assert changed_settings(recorded, _resolved(saved)) == []
    assert changed_settings(recorded, _resolved(load_config(REPO / "configs/digits.yaml"))) == [
        "perf.channels_last: False -> True", "perf.fold_batchnorm: False -> True"]


def test_resume_compares_the_switches_as_resolved() -> None:
    """A checkpoint records the switches a run computed with. The same command on the same
    device resumes; writing the resolved value explicitly resumes too (same computation);
    another device where auto decides otherwise is a changed setting, listed."""
    auto = load_config(REPO / "configs/digits.yaml")
    recorded = computation_settings(_resolved(auto))
    assert changed_settings(recorded, _resolved(auto)) == []
    assert changed_settings(recorded, _resolved(load_config(
        REPO / "configs/digits.yaml", ["perf.channels_last=true", "perf.compile=false"]))) == []
    assert changed_settings(computation_settings(_resolved(auto, CUDA)), _resolved(auto)) == [
        "perf.compile: True -> False", "perf.cudnn_benchmark: True -> False"]


def test_the_resolved_switches_read_as_one_line() -> None:
    configured = PerfSettings(channels_last=False)
    line = describe_perf(configured, resolve_perf(configured, CPU.device, "ddp"))
    assert line == ("cache_decoded=false (auto), persistent_workers=true (auto), "
                    "channels_last=false, fold_batchnorm=true (auto), compile=false (auto), "
                    "cudnn_benchmark=false (auto)")


def test_acting_on_an_unresolved_switch_is_refused(digits_shards: Path) -> None:
    """auto is a truthy string: code that acts on the switches takes them resolved."""
    model, _ = pruned_model(name="digits_cnn")
    with pytest.raises(ValueError, match="perf.cache_decoded is 'auto'"):
        accelerate(model, PerfSettings(), CPU.device)
    manifest = Manifest.load(str(digits_shards))
    with pytest.raises(ValueError, match="resolve_perf"):
        StreamReader(
            LocalShards(digits_shards), manifest, MegabatchStream(manifest, 3, 0.1, "full", 2, 10,
                                                              1),
                     DataSettings(), 16, CPU, 1, perf=PerfSettings())


@pytest.mark.slow
def test_a_run_logs_the_resolved_switches_and_resumes_only_as_resolved(
        finished_run: Path, finished_run_stdout: str, digits_shards: Path,
        tmp_path: Path) -> None:
    assert finished_run_stdout.count("speed switches: ") == 1
    assert ("speed switches: cache_decoded=true (auto), persistent_workers=true (auto), "
            "channels_last=true (auto), fold_batchnorm=true (auto), compile=false (auto), "
            "cudnn_benchmark=false (auto)") in finished_run_stdout
    assert "  channels_last: auto\n" in (finished_run / "config.yaml").read_text()
    run_dir = tmp_path / "app"
    shutil.copytree(finished_run, run_dir)
    same = run_trainer(short_run_args(digits_shards, run_dir, "perf.channels_last=true"))
    assert same.returncode == 0, same.stderr[-3000:]
    assert "resuming after megabatch 2" in same.stdout
    assert "channels_last=true, " in same.stdout  # written explicitly: no (auto)
    changed = run_trainer(short_run_args(digits_shards, run_dir, "perf.channels_last=false"))
    assert changed.returncode == 2
    assert "perf.channels_last: True -> False" in changed.stderr
    assert "compared as resolved" in changed.stderr


# ---------------------------------------------------------------- GPU-only switches

@pytest.mark.parametrize("overrides,key", [
    (["perf.autocast=bf16", "run.device=cpu"], "perf.autocast"),
    (["perf.gpu_decode=true", "run.device=cpu"], "perf.gpu_decode"),
    (["perf.autocast=fp16", "engine.kind=deepspeed"], "perf.autocast"),
    (["perf.channels_last=true", "engine.kind=deepspeed"], "perf.channels_last"),
    (["perf.gpu_decode=true", "perf.cache_decoded=true"], "perf.gpu_decode"),
    (["perf.autocast=fp8"], "perf.autocast"),
    (["perf.cache_max_mb=0"], "perf.cache_max_mb"),
])
def test_impossible_perf_settings_are_refused_naming_the_key(overrides: list[str],
                                                             key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(REPO / "configs/digits.yaml", overrides)


def test_gpu_only_switches_are_refused_when_auto_picks_the_cpu(digits_shards: Path) -> None:
    for perf in (PerfSettings(autocast="bf16"), PerfSettings(gpu_decode=True)):
        with pytest.raises(ConfigError, match="perf.(autocast|gpu_decode).*cpu"):
            check_device(perf, torch.device("cpu"))
    check_device(PerfSettings(autocast="fp16", gpu_decode=True), torch.device("cuda", 0))
    manifest = Manifest.load(str(digits_shards))
    with pytest.raises(ConfigError, match="perf.gpu_decode"):
        StreamReader(
            LocalShards(digits_shards), manifest, MegabatchStream(manifest, 3, 0.1, "full", 2, 10,
                                                              1),
                     DataSettings(), 16, CPU, 1, perf=plain_perf(gpu_decode=True))
    reader = StreamReader(
            LocalShards(digits_shards), manifest, MegabatchStream(manifest, 3, 0.1, "full", 2,
                                                                   10, 1),
                          DataSettings(), 16, CPU, 1, perf=plain_perf(pin_memory=True))
    assert reader.pin_memory is False  # page-locked memory is for host-to-GPU copies only


# ---------------------------------------------------------------- model-side switches

def _train_steps(model: torch.nn.Module, masks: MaskSet, steps: int = 3,
                 perf: PerfSettings | None = None) -> list[float]:
    # A small learning rate: rounding differences are not amplified into chaos in 3 steps.
    engine = DDPEngine(model, masks, CPU,
                       Config(train=TrainSettings(lr=0.01), perf=perf or plain_perf()))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        result = engine.train_step(images, labels)
        losses.append(float(result.loss_sum) / result.count)
    return losses


def _assert_pruned_weights_zero(masks: MaskSet) -> None:
    for name, weight in masks.weights.items():
        assert not weight[~masks.masks[name].bool()].any(), name


@pytest.mark.slow
def test_channels_last_trains_like_contiguous_within_float_tolerance() -> None:
    dense_layout, dense_masks = pruned_model()
    nhwc, nhwc_masks = pruned_model()
    accelerate(nhwc, plain_perf(channels_last=True), torch.device("cpu"))
    weight = nhwc_masks.weights["net.conv1.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert weight is dict(nhwc.named_parameters())["net.conv1.weight"]  # identity kept
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(nhwc.eval()(images), dense_layout.eval()(images),
                               rtol=1e-4, atol=1e-4)
    expected = _train_steps(dense_layout.train(), dense_masks)
    got = _train_steps(nhwc.train(), nhwc_masks)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, param in dense_layout.state_dict().items():
        torch.testing.assert_close(nhwc.state_dict()[name], param, rtol=1e-3, atol=1e-3)
    _assert_pruned_weights_zero(nhwc_masks)
    assert nhwc_masks.checksums().equal(dense_masks.checksums())


def test_cudnn_benchmark_is_a_gpu_setting_only() -> None:
    model, _ = pruned_model(name="digits_cnn")
    accelerate(model, plain_perf(cudnn_benchmark=True), torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark


def test_masked_resnet_compiles_as_one_graph_without_breaks() -> None:
    model, _ = pruned_model()
    explanation = torch._dynamo.explain(model)(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_masked_model_matches_eager_and_sees_new_masks() -> None:
    """The traced graph reads weight * weight_mask from the live buffers: pruning in place
    changes the compiled model's output exactly as the eager one's. (The aot_eager backend
    checks tracing and autograd; inductor's code generation is checked by the slow test.
    A small CNN keeps tracing quick; the ResNet's single graph is checked above.)"""
    torch._dynamo.reset()
    eager, eager_masks = pruned_model(name="digits_cnn")
    compiled, compiled_masks = pruned_model(name="digits_cnn")
    compiled.compile(backend="aot_eager")
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_train_steps(compiled, compiled_masks),
                               _train_steps(eager, eager_masks), rtol=1e-4, atol=1e-5)
    _assert_pruned_weights_zero(compiled_masks)
    for masks in (eager_masks, compiled_masks):
        masks.set({name: torch.zeros_like(mask) for name, mask in masks.masks.items()})
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-5, atol=1e-5)
    # A deep copy (as evaluation code may take) is an eager model of the same weights.
    torch.testing.assert_close(copy.deepcopy(compiled)(images), eager(images))


def _digits_model() -> tuple[torch.nn.Module, MaskSet]:
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.3], std=[0.4])
    return model, MaskSet(model, attach_masks(model))


def _resolved(config: Config, device: torch.device = CPU.device) -> Config:
    """`config` with its perf switches resolved as a run on `device` resolves them."""
    return dataclasses.replace(config, perf=resolve_perf(config.perf, device,
                                                         config.engine.kind))


@pytest.mark.slow
def test_compiled_training_and_evaluation_do_not_recompile_when_masks_change() -> None:
    """perf.compile with the other defaults (channels_last, fold_batchnorm) on the CPU, with
    inductor: masks changed in place between megabatches cost no recompilation, in training
    or in the folded evaluation copy (compiled once, refolded in place), and pruned weights
    stay exactly zero. tests/test_gpu.py runs the same on CUDA. About 30 s of compiling."""
    config = _resolved(load_config(REPO / "configs/digits.yaml", ["perf.compile=true"]))
    assert config.perf.fold_batchnorm and config.perf.channels_last
    model, masks = _digits_model()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    compiled_megabatches_do_not_recompile(config, CPU, model, masks, images, labels, batch=16)


@pytest.mark.slow
def test_accelerate_compiles_with_inductor_through_build_engine() -> None:
    torch._dynamo.reset()
    config = _resolved(load_config(REPO / "configs/digits.yaml",
                                   ["perf.compile=true", "perf.channels_last=true"]))
    model, masks = _digits_model()
    engine = build_engine(config, model, masks, CPU)
    assert model._compiled_call_impl is not None
    reference, reference_masks = _digits_model()
    reference_engine = DDPEngine(reference, reference_masks, CPU,
                                 Config(train=config.train))
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    for _ in range(2):
        got = engine.train_step(images, labels)
        want = reference_engine.train_step(images, labels)
        torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.eval()(images), reference.eval()(images), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_autocast_keeps_masks_exact(precision: str) -> None:
    """The DDP engine's mixed-precision step (CPU autocast stands in for the GPU here; the
    run-level switch refuses the CPU): the first loss (same weights) is close to fp32's,
    pruned weights stay exactly zero after every step, and only fp16 scales its loss (its
    first steps may be skipped while the scale settles, so later losses are not compared)."""
    model, masks = pruned_model(name="digits_cnn")  # small: CPU half precision is slow
    reference, reference_masks = pruned_model(name="digits_cnn")
    perf = PerfSettings(autocast=precision)
    engine = DDPEngine(model, masks, CPU, Config(perf=perf))
    assert engine.scaler.is_enabled() == (precision == "fp16")
    got = _train_steps(model, masks, steps=3, perf=perf)
    want = _train_steps(reference, reference_masks, steps=1)
    assert got[0] == pytest.approx(want[0], rel=0.02)
    assert got[0] != want[0]  # the forward really ran in half precision
    assert all(torch.isfinite(torch.tensor(got)))
    _assert_pruned_weights_zero(masks)
    assert masks.checksums().equal(reference_masks.checksums())


def _with_trained_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(channels, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("name,stem,size", [
    ("resnet20s", "cifar", 32),
    pytest.param("resnet18", "imagenet", 64, marks=pytest.mark.slow),  # 4 s of CPU each
    pytest.param("vgg16_bn", "cifar", 32, marks=pytest.mark.slow),
])
def test_folded_batchnorm_evaluates_like_the_model_with_pruned_weights_still_zero(
        name: str, stem: str, size: int) -> None:
    from app_dist.engine.folding import conv_batchnorm_pairs, folded_copy

    model, masks = pruned_model(name=name, stem=stem)
    model = _with_trained_batchnorm_statistics(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pairs = conv_batchnorm_pairs(model)
    norms = [key for key, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sorted(norm for _, norm in pairs) == sorted(norms)  # every one of them folds
    folded = folded_copy(model, pairs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-4)
    for conv, _ in pairs:
        weight = folded.get_submodule(conv).weight
        assert not weight[~masks.masks[f"{conv}.weight"].bool()].any(), conv
    for key, value in model.state_dict().items():  # the training model is untouched
        assert torch.equal(value, before[key]), key


def test_a_model_that_cannot_be_traced_is_evaluated_unfolded_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    from app_dist.engine.folding import EvaluationModel

    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) if x.sum() > 0 else x

    model = Branching()
    with caplog.at_level(logging.WARNING, logger="app_dist"):
        assert EvaluationModel(fold_batchnorm=True)(model) is model
    assert "perf.fold_batchnorm: cannot trace Branching" in caplog.text


def test_evaluation_batch_size_changes_no_count(digits_shards: Path) -> None:
    """Large evaluation batches under inference_mode: the same correct/count, the same loss
    up to summation order; so does perf.fold_batchnorm (with BatchNorm statistics that are
    not the identity, so folding really changes the weights)."""
    from app_dist.training.evaluation import Evaluator

    manifest = Manifest.load(str(digits_shards))
    stream = MegabatchStream(manifest, 3, 0.1, "full", 2, 1000, seed=1)
    torch.manual_seed(0)
    model = build_model("digits_cnn", manifest.num_classes, in_channels=1, mean=[0.3],
                        std=[0.4])
    attach_masks(model)
    plain = Evaluator(Config(perf=plain_perf()), CPU)
    results = []
    for size in (7, 64, 1000):
        reader = StreamReader(LocalShards(digits_shards), manifest, stream,
                              DataSettings(augment="none", num_workers=0,
                                           eval_batch_size=size), 16, CPU, 1)
        test_pass = functools.partial(reader.evaluation, stream.test_selection())
        results.append(plain.evaluate(model, test_pass))
    folding = Evaluator(Config(perf=plain_perf(fold_batchnorm=True)), CPU)
    _with_trained_batchnorm_statistics(model)
    unfolded = plain.evaluate(model, lambda: reader.evaluation(stream.test_selection()))
    folded = folding.evaluate(model, lambda: reader.evaluation(stream.test_selection()))
    assert (folded.correct, folded.count) == (unfolded.correct, unfolded.count)
    assert folded.loss == pytest.approx(unfolded.loss, rel=1e-5)
    assert len({(r.correct, r.count) for r in results}) == 1
    assert results[0].count == len(stream.test_selection())
    for result in results[1:]:
        assert result.loss == pytest.approx(results[0].loss, rel=1e-5)


# ---------------------------------------------------------------- whole runs

@pytest.mark.slow
def test_a_run_with_every_exact_switch_on_has_identical_metrics(digits_shards: Path,
                                                               tmp_path: Path) -> None:
    base = ["data.megabatches=2", "train.epochs=2", "data.num_workers=2",
            "data.augment=cifar", "log.wandb.mode=disabled"]  # augmentation draws count too
    plain = run_trainer(digits_run_args(digits_shards, tmp_path / "plain", *base,
                                        "perf.prefetch_shards=false",
                                        "perf.cache_decoded=false",
                                        "perf.persistent_workers=false"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    fast = run_trainer(digits_run_args(digits_shards, tmp_path / "fast", *base,
                                       "perf.cache_decoded=true",
                                       "perf.persistent_workers=true",
                                       "perf.prefetch_shards=true"))
    assert fast.returncode == 0, fast.stderr[-3000:]
    assert read_metrics(tmp_path / "fast") == read_metrics(tmp_path / "plain")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_without_cache_and_pool_match_the_default_run(digits_shards: Path,
                                                                uninterrupted: Path,
                                                                tmp_path: Path) -> None:
    """The default run (uninterrupted) has both on by auto; reading the shards every pass
    with fresh reader processes gives the same metrics."""
    result = run_trainer(digits_run_args(digits_shards, tmp_path, "perf.cache_decoded=false",
                                         "perf.persistent_workers=false"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path) == read_metrics(uninterrupted)
