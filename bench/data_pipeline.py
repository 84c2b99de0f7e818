"""The data pipeline alone: images per second that one reader process delivers (decode +
training augmentation + batching) from our shards against torchvision's ImageFolder on the
same JPEG files, for 32x32 CIFAR-10 and full-size ImageNet images cropped to 224x224.

    python bench/data_pipeline.py [--rounds 3] [--no-write]

Both sides: one DataLoader worker, batches of 64 uint8 images, the usual training
augmentation (CIFAR: pad-4 random crop + flip; ImageNet: RandomResizedCrop 224 + flip), the
main process only receives. Ours decodes with torchvision.io (libjpeg-turbo) on tensors,
ImageFolder with PIL. For CIFAR the decode-once cache is shown too (augmenting decoded
tensors in the training process, no reader process at all). Rounds take turns; medians.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CIFAR_JPG,
    IMAGENET_SAMPLE,
    WORK,
    append_row,
    cifar_shards,
    load_average,
    median,
)

CIFAR_IMAGES = 5000


def imagenet_shards() -> Path:
    from app_dist.data.prepare.shards import write_shards

    out = WORK / "imagenet-sample"
    if not (out / "manifest.json").exists():
        write_shards("imagefolder", str(IMAGENET_SAMPLE), str(out), samples_per_shard=20,
                     seed=0, test_fraction=0.01, overwrite=True)
    return out


def shard_sources(shards: Path, root: Path) -> set[str]:
    """The files the training shards were written from (each sample's `.src`)."""
    sources = set()
    for tar in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".src"):
                    sources.add(str(root / archive.extractfile(member).read().decode()))
    return sources


def shard_reader(shards: Path, augment: str, passes: int):
    """A function reading every training sample `passes` times through our shard readers
    (1 worker process); returns images read."""
    from app_dist.data.augment import SampleTransform
    from app_dist.data.batches import make_batches
    from app_dist.data.manifest import Manifest
    from app_dist.data.shard_files import ShardFiles
    from app_dist.data.stream import Selection

    manifest = Manifest.load(str(shards))
    split = manifest.splits["train"]
    selection = Selection(split, torch.arange(split.num_samples).numpy())
    transform = SampleTransform(3, augment, 224, train=True)

    def read() -> int:
        count = 0
        for _ in range(passes):
            files, plan = ShardFiles(shards), [list(selection.shard_counts)]
            for images, _ in make_batches(files, plan, selection, transform=transform,
                                          image_ext="jpg", num_classes=manifest.num_classes,
                                          batch_size=64, num_workers=1, train=False, seed=0):
                count += len(images)
        return count

    return read


def cache_reader(shards: Path, passes: int):
    """Every CIFAR training sample `passes` times from the decode-once cache (warm)."""
    from app_dist.data.augment import SampleTransform
    from app_dist.data.batches import decode_samples
    from app_dist.data.cache import DecodedCache
    from app_dist.data.manifest import Manifest
    from app_dist.data.shard_files import ShardFiles
    from app_dist.data.stream import Selection

    manifest = Manifest.load(str(shards))
    split = manifest.splits["train"]
    selection = Selection(split, torch.arange(split.num_samples).numpy())
    plan = [list(selection.shard_counts)]
    cache = DecodedCache(1 << 30)
    cache.ensure(plan, selection, lambda s: decode_samples(ShardFiles(shards), s, channels=3,
                                                           image_ext="jpg", num_classes=10,
                                                           num_workers=1))
    transform = SampleTransform(3, "cifar", 32, train=True)

    def read() -> int:
        count = 0
        for _ in range(passes):
            for images, _ in cache.batches(plan, selection, transform=transform, batch_size=64,
                                           train=False, seed=0):
                count += len(images)
        return count

    return read


def imagefolder_reader(root: Path, files: set[str], augment: str, passes: int):
    import torchvision
    from torchvision import transforms

    if augment == "cifar":
        crop = [transforms.RandomCrop(32, padding=4)]
    else:
        crop = [transforms.RandomResizedCrop(224)]
    pipeline = transforms.Compose([*crop, transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    # ImageFolder's default loader: PIL, converted to RGB (one sample is grayscale).
    dataset = torchvision.datasets.ImageFolder(str(root), transform=pipeline)
    keep = [i for i, (path, _) in enumerate(dataset.samples) if path in files]
    subset = torch.utils.data.Subset(dataset, keep)

    def read() -> int:
        count = 0
        for _ in range(passes):
            loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=1)
            for images, _ in loader:
                count += len(images)
        return count

    return read


def rate(read) -> float:
    started = time.perf_counter()
    count = read()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    loads = [load_average()]
    cifar = cifar_shards(CIFAR_IMAGES, None)
    imagenet = imagenet_shards()
    readers = {
        "cifar shards": shard_reader(cifar, "cifar", passes=1),
        "cifar imagefolder": imagefolder_reader(CIFAR_JPG / "train",
                                                shard_sources(cifar, CIFAR_JPG), "cifar", 1),
        "cifar cache": cache_reader(cifar, passes=2),
        "imagenet shards": shard_reader(imagenet, "imagenet", passes=2),
        "imagenet imagefolder": imagefolder_reader(IMAGENET_SAMPLE,
                                                   shard_sources(imagenet, IMAGENET_SAMPLE),
                                                   "imagenet", 2),
    }
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for round_index in range(args.rounds):
        for name, read in readers.items():
            rates[name].append(rate(read))
        loads.append(load_average())
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {r[-1]:.0f}"
                                                       for n, r in rates.items()), flush=True)
    m = {name: median(values) for name, values in rates.items()}
    result = (f"img/s per reader process: 32x32 CIFAR shards {m['cifar shards']:.0f} vs "
              f"ImageFolder {m['cifar imagefolder']:.0f} "
              f"({m['cifar shards'] / m['cifar imagefolder']:.2f}x), decode-once cache "
              f"{m['cifar cache']:.0f} (in the training process); 224x224 ImageNet shards "
              f"{m['imagenet shards']:.0f} vs ImageFolder {m['imagenet imagefolder']:.0f} "
              f"({m['imagenet shards'] / m['imagenet imagefolder']:.2f}x); "
              f"load {min(loads):.2f}..{max(loads):.2f}")
    print(result)
    if not args.no_write:
        append_row("data pipeline (1 reader process)", "bench/data_pipeline.py", result)


if __name__ == "__main__":
    main()
