"""The GPU-only switches on a real GPU: mixed precision with masks, channels_last, nvJPEG
decoding, inductor compilation (training and the folded evaluation copy, with no
recompilation when masks change), and a whole run with all of them. Skipped without CUDA (the
CPU stand-ins of these paths are in test_perf_switches.py); run on a GPU machine with
`python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from app_dist.config import Config, TrainSettings, load_config, plain_perf
from app_dist.data.augment import SampleTransform
from app_dist.data.device_decode import decode_batch
from app_dist.data.pipeline import pack_encoded
from app_dist.data.prepare.shards import write_shards
from app_dist.engine.acceleration import accelerate, resolve_perf
from app_dist.engine.ddp import DDPEngine
from app_dist.foundations.distributed import Platform
from app_dist.foundations.torch_files import load_torch_file
from app_dist.pruning.masks import MaskSet
from tests.conftest import (
    IMAGENET_SAMPLE,
    compiled_megabatches_do_not_recompile,
    gpu_imagenet_run_args,
    pruned_model,
    read_metrics,
    run_trainer,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = Platform(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))


def _losses(engine: DDPEngine, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (32,), generator=generator)
        result = engine.train_step(images.cuda(), labels.cuda())
        losses.append(float(result.loss_sum) / result.count)
    return losses


def _assert_pruned_weights_zero(masks: MaskSet) -> None:
    for key, weight in masks.weights.items():
        assert not weight[~masks.masks[key].bool()].any(), key


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_channels_last_keeps_masks_exact(precision: str) -> None:
    reference, reference_masks = pruned_model()
    want = _losses(DDPEngine(reference, reference_masks, GPU,
                             Config(train=TrainSettings(lr=0.01))), 1)
    model, masks = pruned_model()
    perf = plain_perf(autocast=precision, channels_last=True, cudnn_benchmark=True)
    accelerate(model, perf, GPU.device)
    assert torch.backends.cudnn.benchmark
    engine = DDPEngine(model, masks, GPU, Config(train=TrainSettings(lr=0.01), perf=perf))
    got = _losses(engine, 5)
    assert got[0] == pytest.approx(want[0], rel=0.02) and got[0] != want[0]
    assert all(torch.isfinite(torch.tensor(got)))
    assert masks.weights["net.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    _assert_pruned_weights_zero(masks)
    assert masks.checksums().equal(reference_masks.checksums())


def test_inductor_compiled_model_matches_eager_and_sees_new_masks() -> None:
    torch._dynamo.reset()
    eager, eager_masks = pruned_model()
    compiled, compiled_masks = pruned_model()
    eager, compiled = eager.cuda().eval(), compiled.cuda().eval()
    compiled.compile()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device="cuda")
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-3, atol=1e-3)
    for masks in (eager_masks, compiled_masks):
        masks.set({key: torch.zeros_like(mask) for key, mask in masks.masks.items()})
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-3, atol=1e-3)


def test_auto_compiled_training_and_evaluation_do_not_recompile_when_masks_change() -> None:
    """What auto turns on for a DDP run on CUDA (compile, channels_last, fold_batchnorm,
    cudnn_benchmark), on ResNet-20: after the first megabatch compiled the training step and
    the folded evaluation copy, pruning in place recompiles nothing, pruned weights stay
    exactly zero, and evaluation sees the new weights (TF32 convolutions: 1% tolerance)."""
    config = load_config(None, ["run.device=cuda"])
    config = dataclasses.replace(config, perf=resolve_perf(config.perf, GPU.device, "ddp"))
    perf = config.perf
    assert perf.compile and perf.channels_last and perf.fold_batchnorm and perf.cudnn_benchmark
    model, masks = pruned_model()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)
    compiled_megabatches_do_not_recompile(config, GPU, model, masks, images, labels, batch=64,
                                          loss_tolerance=1e-2)


def test_nvjpeg_decoding_matches_cpu_decoding_within_decoder_rounding() -> None:
    """nvJPEG and libjpeg-turbo differ only by IDCT and chroma-upsampling rounding."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip("the ImageNet sample is not on this machine")
    files = sorted(IMAGENET_SAMPLE.glob("*/*.JPEG"))[:32]
    encoded = pack_encoded([f.read_bytes() for f in files])
    labels = torch.arange(len(files))
    for train in (True, False):
        transform = SampleTransform(3, "imagenet", 224, train=train)
        generator = torch.Generator().manual_seed(0)
        draws = [transform.draw(*_size(f), generator) if train else None for f in files]
        on_gpu, gpu_labels = decode_batch(encoded, labels, draws, transform, GPU.device)
        on_cpu, _ = decode_batch(encoded, labels, draws, transform, torch.device("cpu"))
        assert on_gpu.device.type == "cuda" and torch.equal(gpu_labels.cpu(), labels)
        difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
        high = difference.flatten().kthvalue(int(0.99 * difference.numel())).values
        print(f"train={train}: mean |gpu - cpu| {difference.mean():.3f}, 99th pct {high:.0f}")
        assert difference.mean() < 2.0


def _size(file: Path) -> tuple[int, int]:
    from torchvision.io import decode_jpeg

    height, width = decode_jpeg(torch.frombuffer(bytearray(file.read_bytes()),
                                                 dtype=torch.uint8)).shape[-2:]
    return height, width


@pytest.mark.slow
def test_a_gpu_run_with_every_gpu_switch_trains_and_keeps_masks_exact(tmp_path: Path) -> None:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip("the ImageNet sample is not on this machine")
    shards = tmp_path / "shards"
    write_shards("imagefolder", str(IMAGENET_SAMPLE), str(shards), samples_per_shard=16,
                 seed=0, test_fraction=0.2)
    run_dir = tmp_path / "run"
    result = run_trainer(gpu_imagenet_run_args(  # compile and fold: auto
        shards, run_dir, "perf.channels_last=true", "perf.gpu_decode=true",
        "perf.cudnn_benchmark=true", "perf.persistent_workers=true",
        "log.wandb.mode=disabled"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["megabatch"] for r in records] == [1, 2]
    assert records[1]["density"] < records[0]["density"] < 1.0
    state = load_torch_file(run_dir / "checkpoints" / "megabatch-0002" / "engine.pt")["model"]
    masked = [key for key in state if key.endswith("weight_mask")]
    assert masked
    for key in masked:
        weight = state[key.removesuffix("_mask")]
        assert not weight[state[key] == 0].any(), key
