"""Measured inference speed of exported models against the dense network, on this machine.

Models take turns round by round (dense, exported, dense, ...), so load from other work on
the machine hits them alike; each figure is the median over rounds. Written by `app-dist
export` beside a channel export (export_summary), shown by `app-dist report`, and used by
bench/structured_inference.py.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from app_dist.foundations.distributed import device_time

# The batch sizes measured: one image (latency) and a large batch (throughput).
BATCHES = (1, 256)


@torch.inference_mode()
def _seconds_per_batch(model: nn.Module, images: torch.Tensor, repeats: int) -> float:
    # From an idle device to an idle device: a GPU's kernels run asynchronously.
    started = device_time(images.device)
    for _ in range(repeats):
        model(images)
    return (device_time(images.device) - started) / repeats


def compare_inference(models: dict[str, nn.Module], input_shape: tuple[int, ...],
                      batches: tuple[int, ...] = BATCHES, rounds: int = 5,
                      budget_s: float = 0.3, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[int, dict[str, float]]:
    """{batch: {model name: median milliseconds per batch}} for models in eval mode, already
    on `device` (a GPU: timed with synchronisation), inputs of `input_shape` (C, H, W) in
    `dtype`. Each round runs every model for about `budget_s` seconds (at least once); one
    warm-up round is not counted."""
    results: dict[int, dict[str, float]] = {}
    for model in models.values():
        model.eval()
    for batch in batches:
        images = torch.rand(batch, *input_shape, device=device).to(dtype)
        repeats = {name: max(1, int(budget_s / max(_seconds_per_batch(m, images, 1), 1e-6)))
                   for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(_seconds_per_batch(model, images, repeats[name]))
        results[batch] = {name: 1e3 * statistics.median(values)
                          for name, values in times.items()}
    return results
