"""End to end against the issue's reference setting: real CIFAR-10 JPEGs, resnet20s, batch 64,
SGD, 2 epochs per megabatch, 4 megabatches of 1,250 with full replay, SNIP APP, the full
10,000-image test pass after every megabatch.

    python bench/end_to_end.py [--rounds 2] [--no-write]

In one run, taking turns: our trainer (shards -> 4 megabatches -> metrics, as
`app_dist/train.py` runs it) with configs/cifar10.yaml as shipped ("defaults": every perf
switch as auto resolves it on this machine, which the trainer's log line shows) and with
every speed switch off ("all off": no decode-once cache, reader processes per pass, no shard
read-ahead, contiguous layout, unfolded evaluation); a bare PyTorch loop
(torchvision ImageFolder + DataLoader, 2 workers, the unpacked JPEGs); and training from
tensors already in memory (the compute limit: no decoding, no augmentation, no DataLoader).
Figures: training img/s (ours: images trained / time in training epochs, cache filling
included), the 4 megabatches' wall time, and the ratios to the reference figures measured
with the authors' code on a quiet 2-core machine: 486 training img/s and 79.8 s. That
machine trained 618 img/s from tensors in memory; scaled by the in-memory rate measured here,
the 79.8 s implies what the same code would take on this machine (also reported).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CIFAR_JPG,
    append_row,
    cifar_shards,
    load_average,
    median,
    metrics,
    run_trainer,
    trainable,
)

REFERENCE_IMAGES_PER_SECOND = 486.0  # authors' code, training
REFERENCE_SECONDS = 79.8  # authors' code, the 4 megabatches
REFERENCE_IN_MEMORY = 618.0  # the reference machine, training from tensors in memory
TRAIN_IMAGES = 5000  # 4 megabatches of 1,250
STEPS_PER_ROUND = 60  # steps of batch 64 timed per baseline round (3,840 images)


# Every speed switch off; the rest of the config as shipped.
ALL_OFF = ["perf.cache_decoded=false", "perf.persistent_workers=false",
           "perf.prefetch_shards=false", "perf.channels_last=false", "perf.fold_batchnorm=false",
           "perf.compile=false", "perf.cudnn_benchmark=false"]


def trainer_run(shards: Path, perf: list[str]) -> dict:
    """Our trainer on the reference setting; per-megabatch seconds and img/s, whole-run img/s,
    and the switches as the run resolved them (its log line)."""
    with tempfile.TemporaryDirectory(prefix="app-dist-e2e-") as run_dir:
        started = time.perf_counter()
        result = run_trainer(["--config", "configs/cifar10.yaml", f"data.shards={shards}",
                     f"run.dir={run_dir}", "data.megabatches=4", "train.epochs=2",
                     "data.num_workers=2", "log.progress=false", "checkpoint.resume=false",
                     "log.wandb.mode=disabled", *perf])
        process_seconds = time.perf_counter() - started
        records = metrics(Path(run_dir))
    images = trained_images(shards)
    train_seconds = [n / r["train_images_per_second"] for n, r in zip(images, records)]
    switches = next((line.split("speed switches: ", 1)[1] for line in result.stdout.splitlines()
                     if "speed switches: " in line), "?")
    return {"seconds": [r["seconds"] for r in records], "switches": switches,
            "images_per_second": [r["train_images_per_second"] for r in records],
            "whole_run_images_per_second": sum(images) / sum(train_seconds),
            "wall": sum(r["seconds"] for r in records), "process": process_seconds,
            "test_accuracy": records[-1]["test_accuracy"]}


def trained_images(shards: Path) -> list[int]:
    """Images each megabatch trains on over its 2 epochs (full batches of each reader; the
    plan is pure bookkeeping, so this is exactly what the trainer did)."""
    from app_dist.data.manifest import Manifest
    from app_dist.data.plan import training_plan
    from app_dist.data.stream import MegabatchStream

    stream = MegabatchStream(Manifest.load(str(shards)), 4, 0.1, "full", 2, 1000, seed=1)
    return [sum(64 * training_plan(stream.train_selection(t), seed=1, megabatch=t, epoch=e,
                                   rank=0, world_size=1, num_workers=2, batch_size=64).batches
                for e in range(2)) for t in range(1, 5)]


def resnet20s(masked: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from app_dist.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("resnet20s", 10, mean=[0.4914, 0.4822, 0.4465],
                        std=[0.2470, 0.2435, 0.2616])
    return trainable(model, masked)


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             labels: torch.Tensor) -> None:
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def in_memory_round(images: torch.Tensor, labels: torch.Tensor, masked: bool,
                    channels_last: bool = False) -> float:
    """img/s training from a uint8 tensor in memory: shuffled batches, nothing else."""
    model, optimizer = resnet20s(masked)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    batches = [order[i : i + 64] for i in range(0, 64 * (STEPS_PER_ROUND + 3), 64)]
    for index in batches[:3]:  # warm-up: allocator, thread pool
        sgd_step(model, optimizer, images[index], labels[index])
    started = time.perf_counter()
    for index in batches[3:]:
        sgd_step(model, optimizer, images[index], labels[index])
    return 64 * STEPS_PER_ROUND / (time.perf_counter() - started)


def imagefolder_dataset(shards: Path) -> torch.utils.data.Dataset:
    """torchvision's ImageFolder over the same 5,000 training JPEGs our shards hold (each
    sample's `.src` names its file), with the usual CIFAR pipeline: PIL decode, pad-4 random
    crop, flip, to tensor."""
    import tarfile

    import torchvision
    from torchvision import transforms

    sources = set()
    for tar in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".src"):
                    sources.add(str(CIFAR_JPG / archive.extractfile(member).read().decode()))
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    dataset = torchvision.datasets.ImageFolder(str(CIFAR_JPG / "train"), transform=transform)
    keep = [i for i, (path, _) in enumerate(dataset.samples) if path in sources]
    assert len(keep) == TRAIN_IMAGES, f"found {len(keep)} of the sharded images"
    return torch.utils.data.Subset(dataset, keep)


def bare_loop_round(dataset) -> float:
    """img/s of a plain DataLoader(ImageFolder, 2 workers) training loop, startup included."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=2,
                                         drop_last=True)
    model, optimizer = resnet20s(masked=False)
    started, steps = time.perf_counter(), 0
    for images, labels in loader:
        sgd_step(model, optimizer, images, labels)
        steps += 1
        if steps == STEPS_PER_ROUND:
            break
    return 64 * steps / (time.perf_counter() - started)


def decoded_training_images(shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 training images decoded once into one uint8 tensor (not timed)."""
    from app_dist.data.batches import decode_samples
    from app_dist.data.manifest import Manifest
    from app_dist.data.shard_files import ShardFiles
    from app_dist.data.stream import Selection

    split = Manifest.load(str(shards)).splits["train"]
    selection = Selection(split, torch.arange(split.num_samples).numpy())
    images, labels = [], []
    for _, chunk_labels, chunk in decode_samples(ShardFiles(shards), selection, channels=3,
                                                 image_ext="jpg", num_classes=10,
                                                 num_workers=2):
        images += chunk
        labels += chunk_labels.tolist()
    return torch.stack(images), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="baseline rounds (medians)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append rows")
    args = parser.parse_args()
    loads = [load_average()]
    shards = cifar_shards(TRAIN_IMAGES, None)
    images, labels = decoded_training_images(shards)
    dataset = imagefolder_dataset(shards)

    rounds: dict[str, list[float]] = {"in-memory dense": [], "in-memory masked": [],
                                      "in-memory channels_last": [], "bare loop": []}
    trainers: dict[str, dict] = {}
    variants = [("defaults", []), ("all off", ALL_OFF)]
    for round_index in range(args.rounds):
        rounds["in-memory dense"].append(in_memory_round(images, labels, masked=False))
        rounds["in-memory masked"].append(in_memory_round(images, labels, masked=True))
        rounds["in-memory channels_last"].append(
            in_memory_round(images, labels, masked=True, channels_last=True))
        rounds["bare loop"].append(bare_loop_round(dataset))
        if round_index < len(variants):
            name, perf = variants[round_index]
            trainers[name] = trainer_run(shards, perf)
        loads.append(load_average())
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s"
                                                       for k, v in rounds.items()), flush=True)
    for name, perf in variants[args.rounds:]:  # fewer rounds than variants
        trainers[name] = trainer_run(shards, perf)

    dense, masked = median(rounds["in-memory dense"]), median(rounds["in-memory masked"])
    nhwc = median(rounds["in-memory channels_last"])
    bare = median(rounds["bare loop"])
    # The reference figures come from a faster machine: scale them by the in-memory rates
    # (theirs 618 img/s, ours measured now) to get what they imply on this one.
    machine_speed = dense / REFERENCE_IN_MEMORY
    implied = REFERENCE_SECONDS / machine_speed
    lines = [f"in memory: {dense:.0f} img/s dense, {masked:.0f} img/s masked (density 0.8), "
             f"{nhwc:.0f} img/s masked channels_last; bare ImageFolder loop: {bare:.0f} img/s "
             f"(medians of {args.rounds} rounds); this machine = {machine_speed:.2f}x the "
             f"reference machine in memory, so the reference 79.8 s implies {implied:.1f} s here"]
    cells = [f"in-memory {dense:.0f} img/s (masked {masked:.0f}, masked channels_last "
             f"{nhwc:.0f}), bare loop {bare:.0f} img/s; machine {machine_speed:.2f}x the "
             f"reference's, reference implies {implied:.1f} s here"]
    for name, run in trainers.items():
        ours = run["whole_run_images_per_second"]
        lines.append(
            f"ours ({name}): {ours:.0f} training img/s = {ours / dense:.3f}x in-memory dense, "
            f"{ours / masked:.3f}x masked, {ours / bare:.2f}x bare loop, "
            f"{ours / REFERENCE_IMAGES_PER_SECOND:.2f}x the authors' 486; per megabatch "
            + ", ".join(f"{s:.1f} s" for s in run["seconds"])
            + f" = {run['wall']:.1f} s = {run['wall'] / REFERENCE_SECONDS:.3f}x the reference "
            f"79.8 s, {run['wall'] / implied:.3f}x what it implies here (process "
            f"{run['process']:.1f} s); final test accuracy "
            f"{100 * run['test_accuracy']:.1f}%; switches {run['switches']}")
        cells.append(f"ours {name}: {ours:.0f} img/s = {ours / dense:.3f}x in-memory, "
                     f"4 megabatches {'/'.join(f'{s:.1f}' for s in run['seconds'])} s = "
                     f"{run['wall']:.1f} s = {run['wall'] / REFERENCE_SECONDS:.3f}x reference, "
                     f"{run['wall'] / implied:.3f}x implied here")
    if {"defaults", "all off"} <= set(trainers):
        ratio = trainers["all off"]["wall"] / trainers["defaults"]["wall"]
        lines.append(f"defaults are {ratio:.2f}x as fast as all off (4 megabatches' wall time)")
        cells.append(f"defaults {ratio:.2f}x as fast as all off")
    lines.append(f"load average during the run: {min(loads):.2f}..{max(loads):.2f}")
    print("\n".join(lines))
    if not args.no_write:
        append_row("end to end (CIFAR-10 JPEG, resnet20s, 4x1,250, 2 epochs)",
                   "bench/end_to_end.py",
                   "; ".join(cells) + f"; load {min(loads):.2f}..{max(loads):.2f}")


if __name__ == "__main__":
    main()
