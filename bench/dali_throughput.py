"""Decoding + augmenting throughput of full-size ImageNet JPEGs on one GPU, three ways.

    python bench/dali_throughput.py --out dali.json [--copies 80] [--batch 256]
                                    [--workers 12] [--batches 40] [--warmup 5]

Data: the restricted sample's 203 photos, each linked `--copies` times into one image folder
and written once into our shards (bench/gpu_resnet50.py's folder and shards, reused). Each
way is the trainer's own data path, `StreamReader.train_epoch` (augment=imagenet at 224x224:
RandomResizedCrop boxes and flips drawn by the readers), with `--workers` persistent reader
processes, batch `--batch`, the batches ending on the GPU:
- cpu-readers: the readers decode and augment with torchvision; batches are copied over;
- gpu-decode: perf.gpu_decode, torchvision's nvJPEG in a thread of the training process;
- dali: perf.loader=dali, DALI's "mixed" decoder (nvJPEG and the hardware JPEG engine,
  region-of-interest decode) in that thread.
images/s = batches after `--warmup` / seconds, i.e. the most a training step could be fed.
"decoder alone" rows time each GPU decoder on one batch already read (no readers): the
decoder's own ceiling, to tell a reader bottleneck from a decoder one.
Without a GPU it prints one line saying so and exits 0. Results: JSON at `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import IMAGENET_SAMPLE, load_average, machine  # noqa: E402
from bench.gpu_resnet50 import replicated_folder, shards_of  # noqa: E402

WAYS = {"cpu-readers": {}, "gpu-decode": {"gpu_decode": True}, "dali": {"loader": "dali"}}


def reader_rate(shards: Path, settings: dict, batch: int, workers: int, batches: int,
                warmup: int) -> float:
    """images/s of the trainer's training batches on cuda:0, the way `settings` decodes."""
    from app_dist.config import DataSettings, plain_perf
    from app_dist.data.manifest import Manifest
    from app_dist.data.reader import StreamReader
    from app_dist.data.source import LocalShards
    from app_dist.data.stream import MegabatchStream
    from app_dist.foundations.distributed import Platform

    manifest = Manifest.load(str(shards))
    stream = MegabatchStream(manifest, 1, 0.05, "full", 2, 1000, seed=1)
    data = DataSettings(shards=str(shards), augment="imagenet", image_size=224,
                        num_workers=workers, shuffle_buffer=1000)
    perf = dataclasses.replace(plain_perf(persistent_workers=True), **settings)
    device = torch.device("cuda", 0)
    reader = StreamReader(LocalShards(shards), manifest, stream, data, batch,
                          Platform(0, 1, 0, device), seed=1, perf=perf)
    done, started, epoch = 0, time.perf_counter(), 0
    while done < warmup + batches:
        for images, _ in reader.train_epoch(1, epoch):
            images = images.to(device, non_blocking=True)  # a no-op for the GPU decoders
            done += 1
            if done == warmup:
                torch.cuda.synchronize()
                started = time.perf_counter()
            if done == warmup + batches:
                break
        epoch += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if reader.pool is not None:
        reader.pool.close()
    return batch * batches / seconds


def decoder_rates(batch: int, workers: int, repeats: int = 10) -> dict:
    """images/s of each GPU decoder alone on one batch of `batch` photos with drawn crops:
    the sample's 203 distinct photos, repeated to fill the batch."""
    from app_dist.data.augment import SampleTransform
    from app_dist.data.dali_decode import DaliDecoder
    from app_dist.data.device_decode import decode_batch
    from app_dist.data.image_headers import image_header
    from app_dist.data.pipeline import pack_encoded

    device = torch.device("cuda", 0)
    photos = [path.read_bytes() for path in sorted(IMAGENET_SAMPLE.glob("*/*.JPEG"))]
    files = [photos[index % len(photos)] for index in range(batch)]
    transform = SampleTransform(3, "imagenet", 224, train=True)
    generator = torch.Generator().manual_seed(0)
    draws = [transform.draw(*image_header(data)[:2], generator) for data in files]
    encoded, labels = pack_encoded(files), torch.zeros(len(files), dtype=torch.int64)
    rates = {}
    for name, decode in (("gpu-decode decoder alone", decode_batch),
                         ("dali decoder alone", DaliDecoder(device, workers))):
        for _ in range(3):  # warm-up: nvJPEG handles, DALI's pipeline build, allocator
            decode(encoded, labels, draws, transform, device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            decode(encoded, labels, draws, transform, device)
        torch.cuda.synchronize()
        rates[name] = len(files) * repeats / (time.perf_counter() - started)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--copies", type=int, default=80, help="links per sample image")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12, help="reader processes")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per way")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"of: {', '.join(WAYS)}")
    args = parser.parse_args()
    ways = [name for name in args.ways.split(",") if name]
    if unknown := [name for name in ways if name not in WAYS]:
        sys.exit(f"error: --ways: unknown {unknown[0]!r}; choose from {', '.join(WAYS)}")
    if not torch.cuda.is_available():
        print("bench/dali_throughput.py: no CUDA GPU is visible; nothing measured")
        return
    import nvidia.dali

    folder = replicated_folder(args.copies)
    shards = shards_of(folder)
    rates = {}
    for name in ways:
        rates[name] = reader_rate(shards, WAYS[name], args.batch, args.workers, args.batches,
                                  args.warmup)
        print(f"{name}: {rates[name]:.0f} img/s", flush=True)
    rates.update(decoder_rates(args.batch, args.workers))
    result = {"gpu": torch.cuda.get_device_name(), "machine": machine(),
              "dali": nvidia.dali.__version__, "batch": args.batch, "workers": args.workers,
              "copies": args.copies, "timed_batches": args.batches,
              "images_per_second": {name: round(rate, 1) for name, rate in rates.items()},
              "host_load_after": load_average()}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
