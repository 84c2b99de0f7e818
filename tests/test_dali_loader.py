"""perf.loader=dali: the same readers, samples, order, labels, draws and batch counts as the
default path, decoded by NVIDIA DALI; pixels equal to decoder and resize rounding (measured
here). On a CPU-only machine DALI runs its CPU operators; the gpu-marked tests check the
"mixed" (nvJPEG) decoder and are skipped without CUDA (`python -m pytest
tests/test_dali_loader.py -m gpu` on a GPU machine)."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from app_dist.config import DataSettings, PerfSettings, load_config, plain_perf
from app_dist.data.augment import SampleTransform
from app_dist.data.dali_decode import DaliDecoder, centre_window
from app_dist.data.device_decode import decode_batch
from app_dist.data.image_headers import image_header
from app_dist.data.manifest import Manifest
from app_dist.data.pipeline import pack_encoded
from app_dist.data.prepare.shards import write_shards
from app_dist.data.reader import StreamReader
from app_dist.data.source import LocalShards
from app_dist.data.stream import MegabatchStream
from app_dist.engine.acceleration import resolve_perf
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import ConfigError, DataError
from tests.conftest import (
    CIFAR_TAR,
    IMAGENET_SAMPLE,
    REPO,
    every_pass,
    gpu_imagenet_run_args,
    read_metrics,
    run_trainer,
)

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI (nvidia-dali-cuda120 or -cuda130) is not "
                                         "installed")

CPU = torch.device("cpu")
DEFAULT = plain_perf()
DALI = dataclasses.replace(plain_perf(), loader="dali")
# Measured on the ImageNet sample at 224x224 (DALI 2.4.0's CPU operators against torchvision
# 0.29 on the CPU): mean |difference| 0.17 grey levels (training crops) and 0.16 (centre
# crops), 99th percentile 1. Both decode with libjpeg-turbo; what differs is the antialiased
# resize's rounding. The tolerance leaves room for other builds, not for a wrong crop (a box
# off by a few pixels or a missed flip costs 10 to 40 grey levels).
MEAN_TOLERANCE = 0.5


# ------------------------------------------------------------------------------ shards

def _cifar_files(count_per_class: dict[str, int]) -> dict[str, bytes]:
    """The first N real CIFAR-10 JPEGs of each class of each split (`split` -> N)."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} is not on this machine")
    files: dict[str, bytes] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            split, _, name = member.name.partition("/")
            if (split in count_per_class and name.endswith(".jpg")
                    and int(Path(name).stem) < count_per_class[split]):
                files[member.name] = tar.extractfile(member).read()
    return files


def _folder_shards(root: Path, files: dict[str, bytes], per_shard: int) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    out = root.parent / f"{root.name}-shards"
    write_shards("imagefolder", str(root), str(out), samples_per_shard=per_shard, seed=0)
    return out


@pytest.fixture(scope="module")
def cifar_jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 training and 100 test images of the real CIFAR-10 JPEGs, shards of 25."""
    root = tmp_path_factory.mktemp("cifar") / "jpg"
    return _folder_shards(root, _cifar_files({"train": 40, "test": 10}), per_shard=25)


@pytest.fixture(scope="module")
def gray_jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same CIFAR images converted to single-channel JPEGs: a channels=1 manifest."""
    from PIL import Image

    files = {}
    for name, data in _cifar_files({"train": 20, "test": 5}).items():
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("L").save(out, "JPEG", quality=90)
        files[name] = out.getvalue()
    shards = _folder_shards(tmp_path_factory.mktemp("gray") / "jpg", files, per_shard=25)
    assert Manifest.load(str(shards)).channels == 1
    return shards


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 203 full-size ImageNet photos of the restricted sample (one is grayscale)."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} is not on this machine")
    out = tmp_path_factory.mktemp("imagenet") / "shards"
    write_shards("imagefolder", str(IMAGENET_SAMPLE), str(out), samples_per_shard=20, seed=0,
                 test_fraction=0.2)
    return out


# ------------------------------------------------------------------------------ passes

def _every_pass(shards: Path, perf: PerfSettings, *, augment: str, image_size: int = 224,
                workers: int = 0, rank: int = 0, world_size: int = 1, megabatches: int = 2,
                device: torch.device = CPU) -> list:
    """Every batch of a stream (see conftest.every_pass), images moved to the CPU."""
    return every_pass(shards, perf, megabatches=megabatches, workers=workers, rank=rank,
                      world_size=world_size, device=device, augment=augment,
                      image_size=image_size, eval_batch_size=24)


def _compare(expected: list, got: list) -> torch.Tensor:
    """Asserts the same passes, batch counts, labels, shapes and dtypes; returns every
    pixel's absolute difference (float) for the caller to judge."""
    assert [b[:-1] for b in got] == [b[:-1] for b in expected]  # same passes, same counts
    differences = []
    for want, have in zip(expected, got):
        (want_images, want_labels), (images, labels) = want[-1], have[-1]
        assert torch.equal(labels, want_labels), want[:-1]
        assert images.dtype == torch.uint8 and images.shape == want_images.shape, want[:-1]
        differences.append((images.float() - want_images.float()).abs().flatten())
    return torch.cat(differences)


def test_dali_passes_equal_the_default_passes_on_cifar_jpegs(cifar_jpeg_shards: Path) -> None:
    """Pad-and-crop training (augment=cifar) and unaugmented evaluation: the same samples in
    the same order with the same labels, batch counts and draws. No resize is involved and
    both decoders are libjpeg-turbo, so the pixels are equal too (measured, and asserted)."""
    expected = _every_pass(cifar_jpeg_shards, DEFAULT, augment="cifar")
    got = _every_pass(cifar_jpeg_shards, DALI, augment="cifar")
    assert len(expected) > 30 and {b[0] for b in expected} == {"train", "val", "score", "test"}
    assert _compare(expected, got).max() == 0


@pytest.mark.slow  # reader processes: 10-20 s
def test_dali_passes_equal_the_default_passes_with_reader_processes_on_rank_1_of_2(
        cifar_jpeg_shards: Path) -> None:
    """With 2 reader processes per rank, as rank 1 of 2: DALI's batches are the readers'
    interleaving, not its own."""
    options = {"augment": "cifar", "workers": 2, "rank": 1, "world_size": 2}
    expected = _every_pass(cifar_jpeg_shards, DEFAULT, **options)
    got = _every_pass(cifar_jpeg_shards, DALI, **options)
    assert _compare(expected, got).max() == 0


def test_dali_applies_the_drawn_imagenet_crops_within_resize_rounding(
        imagenet_shards: Path) -> None:
    """Full-size photos, augment=imagenet at 224x224: training batches are the drawn boxes
    (ROI-decoded, resized, flipped by DALI), evaluation the resize + centre crop. Same
    samples, labels and counts; pixels within MEAN_TOLERANCE grey levels on average."""
    expected = _every_pass(imagenet_shards, DEFAULT, augment="imagenet")
    got = _every_pass(imagenet_shards, DALI, augment="imagenet")
    assert all(b[-1][0].shape[-2:] == (224, 224) for b in got)
    for kind in ("train", "val", "test"):
        want = [b for b in expected if b[0] == kind]
        have = [b for b in got if b[0] == kind]
        difference = _compare(want, have)
        high = difference.kthvalue(int(0.99 * difference.numel())).values
        print(f"{kind}: mean |dali - torch| {difference.mean():.3f} grey levels, "
              f"99th percentile {high:.0f}, max {difference.max():.0f}")
        assert difference.mean() < MEAN_TOLERANCE and high <= 2, kind
        # Per batch too: a single wrong box or flip shows as a batch far off the mean.
        for want_batch, have_batch in zip(want, have):
            batch = (have_batch[-1][0].float() - want_batch[-1][0].float()).abs()
            assert batch.mean() < 2 * MEAN_TOLERANCE, want_batch[:-1]


def test_dali_decodes_single_channel_manifests_to_one_channel(gray_jpeg_shards: Path) -> None:
    """channels=1: DALI decodes to GRAY, batches are (B, 1, H, W) like torchvision's; equal
    pixels for pad-crops, resize rounding for resized crops (32 -> 24)."""
    for augment, size in (("cifar", 224), ("imagenet", 24)):
        expected = _every_pass(gray_jpeg_shards, DEFAULT, augment=augment, image_size=size,
                               megabatches=1)
        got = _every_pass(gray_jpeg_shards, DALI, augment=augment, image_size=size,
                          megabatches=1)
        assert got[0][-1][0].shape[1] == 1
        difference = _compare(expected, got)
        if augment == "cifar":
            assert difference.max() == 0
        else:
            assert difference.mean() < MEAN_TOLERANCE


def test_the_centre_window_is_torchvisions_resize_then_centre_crop() -> None:
    """The evaluation crop as one window of the original image: resizing it must sample the
    points torchvision's resize-short-side + centre-crop samples (nearest-exact: exact)."""
    from torchvision.transforms.v2 import functional as TF

    for height, width, size in ((375, 500, 224), (500, 333, 224), (257, 256, 224),
                                (60, 90, 32), (224, 224, 224)):
        image = torch.arange(height * width, dtype=torch.int64).reshape(1, height, width)
        resize = int(round(size * 256 / 224))
        nearest = TF.InterpolationMode.NEAREST_EXACT  # pixel centres, as resize filters use
        want = TF.center_crop(TF.resize(image, [resize], interpolation=nearest), [size] * 2)
        top, left, bottom, right = centre_window(height, width, size)
        # Nearest sampling of the window: pixel centres at start + (i + 0.5) * step.
        rows = (top + (torch.arange(size) + 0.5) * (bottom - top) / size).floor().long()
        columns = (left + (torch.arange(size) + 0.5) * (right - left) / size).floor().long()
        assert torch.equal(image[0][rows][:, columns], want[0]), (height, width, size)


def test_a_corrupt_jpeg_is_one_data_error_and_the_next_batch_decodes() -> None:
    decoder = DaliDecoder(CPU, num_threads=1)
    transform = SampleTransform(3, "cifar", 0, train=False)
    from torchvision.io import encode_jpeg

    good = encode_jpeg(torch.full((3, 8, 8), 77, dtype=torch.uint8)).numpy().tobytes()
    with pytest.raises(DataError, match="perf.loader=dali: cannot decode a batch of 2"):
        decoder(pack_encoded([good, good[:40]]), torch.tensor([0, 1]), [None, None],
                transform, CPU)
    images, labels = decoder(pack_encoded([good, good]), torch.tensor([3, 4]), [None, None],
                             transform, CPU)
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [3, 4]
    assert (images.float() - 77).abs().max() <= 1


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides", [
    ["perf.loader=nvidia"],
    ["perf.loader=dali", "perf.gpu_decode=true"],
    ["perf.loader=dali", "perf.cache_decoded=true"],
    ["perf.loader=dali", "data.bad_samples=skip"],
])
def test_impossible_dali_settings_are_refused_naming_the_key(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match="'perf.loader'") as refused:
        load_config(REPO / "configs/digits.yaml", overrides)
    assert "\n" not in str(refused.value)


def test_dali_refuses_png_shards_and_keeps_the_cache_off(digits_shards: Path) -> None:
    manifest = Manifest.load(str(digits_shards))
    stream = MegabatchStream(manifest, 3, 0.1, "full", 2, 10, 1)
    with pytest.raises(ConfigError, match="'perf.loader' = 'dali': needs JPEG shards"):
        StreamReader(LocalShards(digits_shards), manifest, stream, DataSettings(), 16,
                     Platform(0, 1, 0, CPU), 1, perf=DALI)
    # auto would switch the cache on for digits; with DALI it stays off (it is refused).
    configured = dataclasses.replace(PerfSettings(), loader="dali")
    assert resolve_perf(configured, CPU, "ddp", manifest).cache_decoded is False
    assert resolve_perf(PerfSettings(), CPU, "ddp", manifest).cache_decoded is True


def test_dali_is_imported_only_when_the_loader_is_dali() -> None:
    script = ("import sys, app_dist.train, app_dist.data.reader, app_dist.data.dali_decode;"
              "print('nvidia.dali' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------ a real run

@pytest.fixture(scope="module")
def digits_jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 real 8x8 digits as grayscale JPEGs (quality 95), class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        out = io.BytesIO()
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).save(out, "JPEG", quality=95)  # 2-d uint8: mode L
        split = "test" if index % 6 == 0 else "train"
        files[f"{split}/{label}/{index:04d}.jpg"] = out.getvalue()
    return _folder_shards(tmp_path_factory.mktemp("digits-jpg") / "jpg", files, per_shard=50)


@pytest.mark.slow
def test_a_run_with_the_dali_loader_on_the_cpu_trains(digits_jpeg_shards: Path,
                                                      tmp_path: Path) -> None:
    """One process, DALI's CPU operators, the digits config: the run finishes, prunes on
    schedule, and learns (the default loader reaches 93-96% test accuracy on this config)."""
    run_dir = tmp_path / "run"
    result = run_trainer(["--config", str(REPO / "configs/digits.yaml"),
                          f"data.shards={digits_jpeg_shards}", f"run.dir={run_dir}",
                          "data.megabatches=2", "train.epochs=4", "data.num_workers=1",
                          "log.progress=false", "perf.loader=dali", "run.device=cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["megabatch"] for r in records] == [1, 2]
    assert records[1]["density"] < records[0]["density"] < 1.0
    assert 0.8 <= records[-1]["test_accuracy"] <= 1.0, records[-1]


# ------------------------------------------------------------------------------ GPU

GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a CUDA GPU (DALI's mixed decoder)")
GPU = torch.device("cuda", 0)


def _sample_batch(count: int, train: bool, size: int = 224) -> tuple:
    files = sorted(IMAGENET_SAMPLE.glob("*/*.JPEG"))[:count]
    data = [file.read_bytes() for file in files]
    transform = SampleTransform(3, "imagenet", size, train=train)
    generator = torch.Generator().manual_seed(0)
    draws = [transform.draw(*image_header(d)[:2], generator) for d in data]
    return pack_encoded(data), torch.arange(len(data)), draws, transform


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.gpu
@GPU_ONLY
def test_dali_nvjpeg_matches_the_cpu_path_within_decoder_rounding(train: bool) -> None:
    """The mixed decoder (nvJPEG, hardware engine where present) with libjpeg-turbo's
    chroma upsampling, against torchvision on the CPU. nvJPEG's IDCT rounds differently:
    torchvision's own nvJPEG path (perf.gpu_decode) measured 0.19 grey levels on an H200."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} is not on this machine")
    encoded, labels, draws, transform = _sample_batch(64, train)
    images, gpu_labels = DaliDecoder(GPU, num_threads=4)(encoded, labels, draws, transform, GPU)
    assert images.device.type == "cuda" and images.dtype == torch.uint8
    assert images.shape == (64, 3, 224, 224) and torch.equal(gpu_labels.cpu(), labels)
    on_cpu, _ = decode_batch(encoded, labels, draws, transform, CPU)
    difference = (images.cpu().float() - on_cpu.float()).abs()
    high = difference.flatten().kthvalue(int(0.99 * difference.numel())).values
    print(f"train={train}: mean |dali mixed - torch cpu| {difference.mean():.3f}, "
          f"99th percentile {high:.0f}")
    assert difference.mean() < 2.0
    assert difference.flatten(1).mean(1).max() < 4.0  # no sample with a wrong box or flip


@pytest.mark.gpu
@GPU_ONLY
def test_dali_on_the_gpu_gives_the_default_passes(imagenet_shards: Path) -> None:
    """A StreamReader on CUDA with perf.loader=dali (2 reader processes): the same samples,
    labels and counts as the default path, images on the GPU within decoder rounding."""
    expected = _every_pass(imagenet_shards, DEFAULT, augment="imagenet", workers=2)
    got = _every_pass(imagenet_shards, DALI, augment="imagenet", workers=2, device=GPU)
    difference = _compare(expected, got)
    print(f"mean |dali mixed - torch cpu| over every pass {difference.mean():.3f}")
    assert difference.mean() < 2.0


@pytest.mark.slow
@pytest.mark.gpu
@GPU_ONLY
def test_a_gpu_run_with_the_dali_loader_trains_and_keeps_masks_exact(imagenet_shards: Path,
                                                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_trainer(gpu_imagenet_run_args(imagenet_shards, run_dir, "perf.loader=dali",
                                               "perf.compile=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["megabatch"] for r in records] == [1, 2]
    assert records[1]["density"] < records[0]["density"] < 1.0
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in records)
