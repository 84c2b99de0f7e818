"""The metrics record of one megabatch: what metrics.jsonl, wandb, the summary table and Ray
Tune receive (docs/METHOD.md section 4: test accuracy, CER, generalisation gap, densities)."""

from __future__ import annotations

from typing import Any

from app_dist.pruning.masks import MaskSet
from app_dist.training.evaluation import Evaluation
from app_dist.training.metrics import cumulative_error
from app_dist.training.state import MegabatchProgress

# The phases of a megabatch's wall time (`seconds`, up to its checkpoint), in their order;
# disjoint, so the rest of `seconds` is bookkeeping between them.
PHASE_KEYS = ("prune_seconds", "train_seconds", "validation_seconds", "test_seconds")
# The fields that measure time. They legitimately differ between two runs of one config, so a
# comparison of runs (a resumed one against an uninterrupted one) leaves them out.
WALL_CLOCK_KEYS = ("seconds", "train_images_per_second", *PHASE_KEYS)


def training_record(progress: MegabatchProgress, best: dict[str, Any], masks: MaskSet,
                    total_parameters: int, target_density: float, train_samples: int,
                    val_samples: int, world_size: int) -> dict[str, Any]:
    """The record of a trained megabatch, before its test pass: densities, the
    best-validation epoch's accuracies, the training throughput, and the number of ranks
    that trained it."""
    return {
        "megabatch": progress.megabatch,
        # An elastic sweep trial (or a resume with checkpoint.allow_world_size_change) may
        # train its megabatches on different numbers of ranks.
        "world_size": world_size,
        "target_density": target_density,
        "density": masks.density(),
        "kept_parameters": masks.kept,
        "prunable_parameters": masks.total,
        "total_parameters": total_parameters,
        "layer_density": masks.layer_densities(),
        # prune.structure=channel: channel groups kept and the convolutions' FLOPs fraction.
        **masks.structure_record(),
        "train_samples": train_samples,
        "val_samples": val_samples,
        "best_epoch": best["epoch"],
        "epochs_trained": progress.epoch,
        "train_accuracy": best["train_accuracy"],
        "train_loss": best["train_loss"],
        "val_accuracy": best["val_accuracy"],
        "generalization_gap": 100 * (best["train_accuracy"] - best["val_accuracy"]),
        # images_seen is already summed over ranks (each epoch's count is all-reduced).
        "train_images": progress.images_seen,
        "train_seconds": progress.train_seconds,
        "train_images_per_second": progress.images_seen / max(progress.train_seconds, 1e-9),
        "prune_seconds": progress.prune_seconds,
        "validation_seconds": progress.validation_seconds,
        # Bad samples skipped (data.bad_samples=skip), counted once per pass that met
        # them: training epochs, validations and the test pass.
        "skipped_samples": progress.skipped,
    }


def add_test_results(record: dict[str, Any], test: Evaluation,
                     history: list[dict[str, Any]], seconds: float, test_seconds: float
                     ) -> None:
    """Complete `record` with its test pass (and its wall seconds), the CER over this and the
    earlier megabatches (`history`), and the megabatch's wall time in seconds up to its
    checkpoint (including time before a pre-emption)."""
    record["skipped_samples"] += test.skipped
    errors = [r["test_errors"] for r in history] + [test.count - test.correct]
    cer_count, cer = cumulative_error(errors, test.count)
    record.update(test_accuracy=test.accuracy, test_loss=test.loss,
                  test_errors=test.count - test.correct, cer_count=cer_count, cer=cer,
                  test_seconds=test_seconds, seconds=seconds)
