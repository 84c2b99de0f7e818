"""The reader processes' lifecycle: where they start from (a fork server, started early),
how they end with the training process (SIGTERM ignored, a pidfd watch, `stop_readers`),
and how a reader is run (`reader_loader`: in this process, in DataLoader workers started for
one pass, or in the persistent workers of a `ReaderPool`).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import queue as queue_module
import select
import signal
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from functools import partial

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from app_dist.data.pipeline import ShardReader
from app_dist.foundations.errors import DataError
from app_dist.foundations.signals import ignore_preemption_signals


def reader_context() -> multiprocessing.context.BaseContext:
    """Reader processes start from a fork server, not as forks of the training process. A fork
    copies every lock that another thread holds at that instant (a finished pass's queue
    feeder thread exiting, gloo's or wandb's threads), and the reader can wait on it forever;
    this was seen as a reader stuck in CPython's after-fork thread cleanup. The server is a
    fresh single-threaded process that has imported the reading code once, so starting a
    reader from it is still cheap."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()  # no fork server (Windows): spawn
    # app_dist.train too: every reader re-runs the main script (`app_dist/train.py`), and
    # with its imports already loaded that costs milliseconds instead of 0.2 s per reader.
    # app_dist.data.fork_server first: it makes the server ignore the stop signals.
    multiprocessing.set_forkserver_preload(["app_dist.data.fork_server", "app_dist.data.workers",
                                            "app_dist.train"])
    return multiprocessing.get_context("forkserver")


def start_reader_server(num_workers: int) -> None:
    """Start the fork server now, so that its imports (2-3 s) overlap the trainer's own
    start-up instead of delaying the first pass."""
    if num_workers > 0 and reader_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def _start_reader(trainer_pid: int, worker_id: int) -> None:
    """A pre-emption notice is for the training process to act on (finish the step, write a
    checkpoint); readers must not die first and break the step in flight, so they ignore
    the stop signals. They end with the trainer instead: `stop_readers` kills them on its way
    out, and `_exit_with` ends them when it is gone, however it went (SIGKILL included)."""
    ignore_preemption_signals()
    _exit_with(trainer_pid)
    if not logging.getLogger().handlers:
        # A fresh process: log skipped samples the way the trainer logs.
        logging.basicConfig(format="[app-dist] %(message)s", stream=sys.stdout,
                            level=logging.INFO)


def _exit_with(trainer_pid: int) -> None:
    """Exit this reader as soon as the training process ends. A reader's parent is the fork
    server, which lives as long as any reader does, so torch's own check (has my parent
    changed?) never fires, and a reader blocked on a full queue would never check at all."""
    try:
        handle = os.pidfd_open(trainer_pid)
    except ProcessLookupError:  # it ended while this reader was starting
        os._exit(0)
    except (AttributeError, OSError):  # not Linux >= 5.3: torch's own check remains
        return

    def watch() -> None:
        select.select([handle], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=watch, name="app-dist-trainer-watch", daemon=True).start()


def stop_readers() -> None:
    """Kill reader processes still alive (an error left an epoch unfinished). Call before the
    process exits: multiprocessing would otherwise SIGTERM them, which they ignore, and wait
    for them forever."""
    # torch's SIGCHLD handler would report these deliberate kills as a crashed worker. It is
    # only ever installed from the main thread (a Ray Train worker runs us in another one,
    # where signal.signal itself would raise).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


class ReaderPool:
    """DataLoader worker processes that live for the whole run (perf.persistent_workers)
    instead of being started for every pass. Each pass hands every worker its reader (the
    same ShardReader a one-pass DataLoader would pickle) through the worker's own queue;
    torch restarts the persistent workers' iteration and each one reads its share. Workers
    beyond the pass's reader count read nothing, which keeps the batch order of a one-pass
    DataLoader with one worker per reader."""

    def __init__(self, num_workers: int, pin_memory: bool) -> None:
        context = reader_context()
        self.jobs = [context.Queue() for _ in range(num_workers)]
        self.loader = DataLoader(_PooledReader(self.jobs), batch_size=None,
                                 num_workers=num_workers, persistent_workers=True,
                                 multiprocessing_context=context, pin_memory=pin_memory,
                                 prefetch_factor=4,
                                 worker_init_fn=partial(_start_reader, os.getpid()))
        # Registered after multiprocessing's own exit handler, so it runs first: the workers
        # ignore SIGTERM, and multiprocessing would terminate them with it and wait forever.
        atexit.register(_close_pool, weakref.ref(self))

    def pass_over(self, reader: ShardReader) -> Iterable:
        return _PoolPass(self, reader)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the pool is garbage collected)."""
        iterator = self.loader._iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None


def _close_pool(pool: weakref.ref) -> None:
    alive = pool()
    if alive is not None:
        alive.close()


class _PoolPass:
    def __init__(self, pool: ReaderPool, reader: ShardReader) -> None:
        self.pool = pool
        self.reader = reader

    def __iter__(self) -> Iterator:
        # The job is queued before the iteration starts, so a worker always finds it there.
        for queue in self.pool.jobs:
            queue.put(self.reader)
        return iter(self.pool.loader)


class _PooledReader(IterableDataset):
    JOB_TIMEOUT_S = 600

    def __init__(self, jobs: list) -> None:
        super().__init__()
        self.jobs = jobs

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        assert info is not None, "a pooled reader runs in DataLoader workers only"
        try:
            job = self.jobs[info.id].get(timeout=self.JOB_TIMEOUT_S)
        except queue_module.Empty:
            raise DataError(f"reader process {info.id} received no work for "
                            f"{self.JOB_TIMEOUT_S} s") from None
        while True:  # a pass stopped before this worker started leaves its job behind
            try:
                job = self.jobs[info.id].get_nowait()
            except queue_module.Empty:
                break
        return job.read(info.id)


def reader_loader(reader: ShardReader, num_workers: int, pin_memory: bool,
                  pool: ReaderPool | None) -> Iterable:
    """What runs `reader`: a pass of `pool`'s persistent workers, a DataLoader with one
    process per reader for this pass only, or (num_workers 0) the reader in this process."""
    if pool is not None and num_workers > 0:
        return pool.pass_over(reader)
    processes = len(reader.urls) if num_workers > 0 else 0
    return DataLoader(reader, batch_size=None, num_workers=processes, pin_memory=pin_memory,
                      prefetch_factor=4 if processes else None,
                      multiprocessing_context=reader_context() if processes else None,
                      worker_init_fn=partial(_start_reader, os.getpid()) if processes else None)
