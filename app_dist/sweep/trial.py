"""One sweep trial: a Tune function that runs the project's own training on N Ray Train workers.

    Tune trial (driver)  -> TorchTrainer(train_worker, N workers)  -> app_dist.train.train(...)
        ^                                                                   |
        +----- TuneReportCallback <- ray.train.report, once per megabatch <-+  (MegabatchReporter)

Ray Train starts the process group and sets RANK / WORLD_SIZE / LOCAL_RANK on every worker, so
`start_platform` joins the group Ray made; the loop is the trainer's, unchanged. Each report
carries the megabatch checkpoint folder, so a restarted worker group (or trial) resumes from
the last reported megabatch: `train_worker` puts that checkpoint into the run directory before
`train` looks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app_dist.config import load_config, run_directory
from app_dist.data.workers import stop_readers
from app_dist.foundations.distributed import Platform, start_platform
from app_dist.sweep.resume import restore_reported_checkpoint, set_aside_unreported
from app_dist.sweep.settings import Sweep
from app_dist.train import setup_logging, train
from app_dist.training.events import Callback
from app_dist.training.run_input import prepare


def make_trainable(sweep: Sweep) -> Any:
    """The Tune trainable of `sweep`: a function trainable with the driver's resources."""
    from ray import tune

    def app_dist_trial(sampled: dict[str, Any]) -> None:
        run_trial(sweep, sampled)

    driver = sweep.settings.trial_driver
    resources: dict[str, float] = {"CPU": driver.CPU, "memory": driver.memory_mb * 2**20,
                                   **driver.resources}
    return tune.with_resources(app_dist_trial, resources)


def run_trial(sweep: Sweep, sampled: dict[str, Any]) -> None:
    """Tune's side of one trial: fit a TorchTrainer named after the trial id. Ray Train
    restarts failed workers from the last reported checkpoint; a run of the same name (Tune
    retrying this trial, or a restored sweep) continues from Ray Train's snapshot of it."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    overrides = sweep.trial_overrides(trial_id, sampled)
    config = load_config(sweep.base_config, overrides)
    settings = sweep.settings
    per_worker = {"CPU": settings.resources_per_worker.CPU}
    if settings.resources_per_worker.GPU > 0:
        per_worker["GPU"] = settings.resources_per_worker.GPU
    worker_env = dict(settings.worker_env)
    sizes = sweep.world_sizes  # several: an elastic trial, (fewest, most) workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"base_config": str(sweep.base_config), "overrides": overrides},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers_per_trial if len(sizes) == 1 else (sizes[0], sizes[-1]),
            elastic_resize_monitor_interval_s=settings.resize_interval_s,
            use_gpu="GPU" in per_worker, resources_per_worker=per_worker),
        torch_config=TorchConfig(timeout_s=config.engine.timeout_s),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=str(sweep.train_storage),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )
    trainer.fit()


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's side: one rank of the trial's training, on the group Ray Train started."""
    import ray.train

    config = load_config(loop_config["base_config"], loop_config["overrides"])
    manifest, stream = prepare(config)
    platform = start_platform(config.run.device, config.engine.timeout_s)
    setup_logging(platform)
    run_dir = run_directory(config)
    if platform.is_primary:
        reported = ray.train.get_checkpoint()
        if reported is None:
            set_aside_unreported(run_dir, after=0)
        else:
            with reported.as_directory() as folder:
                restore_reported_checkpoint(Path(folder), run_dir)
    platform.barrier()
    reporter = MegabatchReporter(platform, config.data.megabatches)
    # Ray Train owns the process group and tears it down: no platform.shutdown() here.
    try:
        state = train(config, manifest, stream, platform, callbacks=[reporter])
    finally:
        stop_readers()  # as app_dist/train.py: leftover reader processes would block the exit
    if reporter.reports == 0 and state.history:
        # The restored checkpoint was the run's last: Ray Train had registered that report,
        # but the sweep may have been stopped before Tune heard of it, and Tune would keep
        # the megabatch before as the trial's result. Saying it again costs nothing (Tune
        # keeps the latest report; ASHA ignores a rung it has already judged).
        reporter.report(state.history[-1])


class MegabatchReporter(Callback):
    """One ray.train.report per megabatch, on every rank (it is a barrier), with rank 0
    attaching the megabatch's checkpoint folder."""

    def __init__(self, platform: Platform, megabatches: int) -> None:
        self.platform = platform
        self.megabatches = megabatches
        self.reports = 0

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        self.report(record, folder)

    def report(self, record: dict[str, Any], folder: Path | None = None) -> None:
        """Report `record`'s metrics, with the checkpoint in `folder` when given."""
        import ray.train

        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}
        metrics.update(megabatches=self.megabatches)
        if folder is None:
            ray.train.report(metrics)
        else:
            checkpoint = (ray.train.Checkpoint.from_directory(str(folder))
                          if self.platform.is_primary else None)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder.name)
        self.reports += 1

