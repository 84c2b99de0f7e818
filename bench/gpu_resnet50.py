"""ResNet-50 at 224x224 on one GPU: our trainer against a bare PyTorch loop and against the
compute limit, and the fraction of the GPU's measured matrix throughput that each reaches.

    python bench/gpu_resnet50.py [--copies 80] [--batch 256] [--steps 60] [--workers 12]
                                 [--ours auto,auto-dali,cpu-decode,gpu-decode,dali,
                                         gpu-decode-compiled,restricted,restricted-dali]
                                 [--compiled] [--no-write]

Data: the 203 full-size ImageNet JPEGs of the restricted sample, each linked `--copies`
times into one image folder (decoding cost is that of real ImageNet photos; the content does
not matter for speed), written once into our shards.
In one run, on the same GPU, all with bf16 autocast and channels_last, SGD, batch `--batch`:
- matrix: an 8192^3 bf16 matrix product, the GPU's measured ceiling (TFLOP/s);
- in memory: training from uint8 batches already on the GPU (dense and masked at density
  0.8): the compute limit of the model itself;
- bare loop: torchvision ImageFolder + DataLoader (`--workers` processes, PIL decode,
  RandomResizedCrop + flip, pinned memory), the loop most people write;
- ours: `app_dist/train.py` on the shards (configs/imagenet.yaml with the DDP engine, APP
  with SNIP, 2 megabatches of 2 epochs): `auto`, the defaults (CPU decoding in reader
  processes, compiled, as `perf.compile=auto` chooses on a GPU), `auto-dali` (the same
  with `perf.loader=dali`); then eagerly: with CPU
  decoding in reader processes, with
  `perf.gpu_decode` (nvJPEG), with `perf.loader=dali` (DALI's nvJPEG / hardware JPEG
  decoder; bench/dali_throughput.py times the data paths alone), and with gpu_decode and
  `perf.compile`, each with `perf.cudnn_benchmark`; the figure is megabatch 2's (warm:
  workers started, cuDNN tuned, graphs compiled). `--compiled` adds the in-memory limit
  under torch.compile. Each megabatch's wall time up to its checkpoint is split into
  pruning, training, validation, test and the rest (the records' *_seconds);
- `restricted`, `restricted-dali`: configs/restricted_imagenet.yaml (32x32 crops of the same
  photos, the CIFAR stem, its batch of 64), for the phase shares of that config's megabatch.
Training FLOPs per image are counted by torch.utils.flop_counter on one forward + backward,
so "fraction of the matrix ceiling" = img/s x FLOPs per image / measured matrix FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    IMAGENET_SAMPLE,
    WORK,
    append_row,
    load_average,
    metrics,
    run_trainer,
    trainable,
)

WARMUP_STEPS = 10


def replicated_folder(copies: int) -> Path:
    """The sample's JPEGs, each hard-linked (or copied) `copies` times, in ImageFolder layout."""
    folder = WORK / f"imagenet-sample-x{copies}"
    done = folder / ".complete"
    if done.exists():
        return folder
    for image in sorted(IMAGENET_SAMPLE.glob("*/*.JPEG")):
        target = folder / image.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            link = target / f"{image.stem}_{copy:03d}.JPEG"
            if not link.exists():
                try:
                    os.link(image, link)
                except OSError:  # another file system
                    link.write_bytes(image.read_bytes())
    done.touch()
    return folder


def shards_of(folder: Path) -> Path:
    from app_dist.data.prepare.shards import write_shards

    out = WORK / f"{folder.name}-shards"
    if not (out / "manifest.json").exists():
        write_shards("imagefolder", str(folder), str(out), samples_per_shard=256, seed=0,
                     test_fraction=0.05, workers=8, overwrite=True)
    return out


def matrix_tflops() -> float:
    """Measured bf16 matrix-product rate: the ceiling every fraction below refers to."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def resnet50(masked: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from app_dist.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("resnet50", 1000, stem="imagenet", mean=[0.485, 0.456, 0.406],
                        std=[0.229, 0.224, 0.225]).cuda().to(memory_format=torch.channels_last)
    return trainable(model, masked)


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             labels: torch.Tensor) -> None:
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training_flops_per_image() -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = resnet50(masked=False)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, device="cuda")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), torch.zeros(2, dtype=torch.long, device="cuda")).backward()
    return counter.get_total_flops() / 2


def in_memory(batch: int, steps: int, masked: bool, compiled: bool = False) -> float:
    model, optimizer = resnet50(masked)
    if compiled:
        model.compile()
    generator = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda",
                              generator=generator),
                torch.randint(0, 1000, (batch,), device="cuda", generator=generator))
               for _ in range(4)]
    for step in range(WARMUP_STEPS):
        sgd_step(model, optimizer, *batches[step % 4])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(steps):
        sgd_step(model, optimizer, *batches[step % 4])
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def bare_loop(folder: Path, batch: int, steps: int, workers: int) -> float:
    """DataLoader(ImageFolder) as most people write it; timed after WARMUP_STEPS batches."""
    import torchvision
    from torchvision import transforms

    pipeline = transforms.Compose([transforms.RandomResizedCrop(224),
                                   transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=pipeline)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                         num_workers=workers, pin_memory=True, drop_last=True,
                                         persistent_workers=True, prefetch_factor=4)
    model, optimizer = resnet50(masked=False)
    done, started = 0, time.perf_counter()
    while done < WARMUP_STEPS + steps:
        for images, labels in loader:
            if done == WARMUP_STEPS:
                torch.cuda.synchronize()
                started = time.perf_counter()
            sgd_step(model, optimizer, images.cuda(non_blocking=True),
                     labels.cuda(non_blocking=True))
            done += 1
            if done == WARMUP_STEPS + steps:
                break
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def ours(shards: Path, batch: int, workers: int, config: str, perf: list[str]) -> dict:
    """Our trainer, 2 megabatches x 2 epochs: each megabatch's training img/s, its wall time
    up to the checkpoint and that time's phase shares."""
    # ImageNet's config at the benchmark's batch; Restricted ImageNet's at its own (64).
    sizes = ([f"train.batch_size={batch}", f"data.eval_batch_size={batch}"]
             if config == IMAGENET else [])
    with tempfile.TemporaryDirectory(prefix="app-dist-gpu-") as run_dir:
        run_trainer(["--config", config, f"data.shards={shards}",
                     f"run.dir={run_dir}", "data.megabatches=2", "train.epochs=2",
                     "train.milestones=[]", *sizes, f"data.num_workers={workers}",
                     "engine.kind=ddp", "perf.autocast=bf16", "perf.channels_last=true",
                     "perf.cudnn_benchmark=true", "perf.persistent_workers=true",
                     "log.progress=false", "log.wandb.mode=disabled",
                     "checkpoint.resume=false", *perf])
        records = metrics(Path(run_dir))
    return {"images_per_second": [r["train_images_per_second"] for r in records],
            "phases": [phase_shares(r) for r in records],
            "seconds": [r["seconds"] for r in records]}


def phase_shares(record: dict) -> str:
    """A megabatch record's phases as shares of its wall time up to the checkpoint."""
    from app_dist.training.record import PHASE_KEYS

    wall = record["seconds"]
    spent = {key.removesuffix("_seconds"): record[key] for key in PHASE_KEYS}
    spent["other"] = wall - sum(spent.values())
    return ", ".join(f"{phase} {seconds / wall:.0%}" for phase, seconds in spent.items())


IMAGENET, RESTRICTED = "configs/imagenet.yaml", "configs/restricted_imagenet.yaml"
OURS = {"auto": (IMAGENET, []),  # every switch at its default: auto compiles on a GPU
        "auto-dali": (IMAGENET, ["perf.loader=dali"]),  # the defaults, DALI decoding
        "cpu-decode": (IMAGENET, ["perf.gpu_decode=false", "perf.compile=false"]),
        "gpu-decode": (IMAGENET, ["perf.gpu_decode=true", "perf.compile=false"]),
        "dali": (IMAGENET, ["perf.loader=dali", "perf.compile=false"]),
        "gpu-decode-compiled": (IMAGENET, ["perf.gpu_decode=true", "perf.compile=true"]),
        # Restricted ImageNet's config (32x32 crops of the same photos, the CIFAR stem, batch
        # 64): its phase shares; its img/s is not comparable with the 224x224 rows.
        "restricted": (RESTRICTED, []),
        "restricted-dali": (RESTRICTED, ["perf.loader=dali"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=80, help="links per sample image")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per baseline")
    parser.add_argument("--workers", type=int, default=12, help="DataLoader / reader processes")
    parser.add_argument("--ours", default="cpu-decode,gpu-decode",
                        help=f"our trainer's variants, of: {', '.join(OURS)}")
    parser.add_argument("--compiled", action="store_true",
                        help="also the in-memory compute limit under torch.compile")
    parser.add_argument("--no-write", action="store_true", help="print, do not append a row")
    args = parser.parse_args()
    variants = [name for name in args.ours.split(",") if name]
    if unknown := [name for name in variants if name not in OURS]:
        sys.exit(f"error: --ours: unknown variant {unknown[0]!r}; choose from {', '.join(OURS)}")
    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu_resnet50.py needs a CUDA GPU; none is visible")
    torch.backends.cudnn.benchmark = True
    folder = replicated_folder(args.copies)
    shards = shards_of(folder)
    gpu = torch.cuda.get_device_name()
    ceiling = matrix_tflops()
    flops = training_flops_per_image()
    rates = {"in-memory dense": in_memory(args.batch, args.steps, masked=False),
             "in-memory masked": in_memory(args.batch, args.steps, masked=True)}
    if args.compiled:
        rates["in-memory masked compiled"] = in_memory(args.batch, args.steps, masked=True,
                                                       compiled=True)
    rates["bare loop"] = bare_loop(folder, args.batch, args.steps, args.workers)
    print(", ".join(f"{name} {rate:.0f} img/s" for name, rate in rates.items()), flush=True)
    for name in variants:
        config, perf = OURS[name]
        run = ours(shards, args.batch, args.workers, config, perf)
        print(f"ours {name}: per megabatch "
              + "; ".join(f"{r:.0f} img/s, {s:.1f} s up to the checkpoint ({phases})"
                          for r, s, phases in zip(run["images_per_second"], run["seconds"],
                                                  run["phases"])), flush=True)
        if config == IMAGENET:
            rates[f"ours {name}"] = run["images_per_second"][-1]  # megabatch 2: warm

    def fraction(rate: float) -> float:
        return rate * flops / (ceiling * 1e12)

    dense = rates["in-memory dense"]
    cells = [f"{gpu}, bf16 + channels_last, batch {args.batch}, {args.workers} workers; "
             f"matrix {ceiling:.0f} TFLOP/s; training {flops / 1e9:.1f} GFLOP/img"]
    cells += [f"{name} {rate:.0f} img/s ({rate / dense:.2f}x in-memory dense, "
              f"{100 * fraction(rate):.0f}% of matrix)" for name, rate in rates.items()]
    result = "; ".join(cells) + f"; host load {load_average():.2f}"
    print(result)
    if not args.no_write:
        append_row("GPU: resnet50 224x224, one GPU", "bench/gpu_resnet50.py", result)


if __name__ == "__main__":
    main()
