"""One run per run directory: a lock file that rank 0 holds while its run writes there.

    RUN_DIR/run.lock    {"host", "pid", "pid_started", "started", "heartbeat", "token"}

The file is created with O_CREAT | O_EXCL (atomic on local file systems and on NFSv3 and
later), so of two launches of one run directory exactly one creates it; the other stops with
RunDirectoryInUse: one line naming the holder's pid, host and start time, exit code 2.
A daemon thread rewrites the heartbeat every HEARTBEAT_S seconds (in place, one write of a
fixed length, then fsync). A lock is stale, and the next launch takes it over by itself, when

  - its host is this host and its pid no longer runs (or is a zombie, or is now another
    process: its start time differs): a SIGKILLed run, or a rank killed under
    `torchrun --max-restarts`, whose restarted rank 0 takes over without user action;
  - its heartbeat is older than STALE_AFTER_S: a run on a host that died (nothing on this host
    can ask whether a pid there runs). The heartbeat is the holder's wall clock, so clocks of
    the nodes sharing the file system must agree to well within STALE_AFTER_S.

The lock is released (the file removed) when the run ends, finished, failed or pre-empted.
Two launches that find one stale lock at the same moment take it over one at a time
(RUN_DIR/run.lock.takeover, another O_EXCL file), so at most one of them gets it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from app_dist.foundations.errors import AppDistError
from app_dist.foundations.run_layout import RunLayout

log = logging.getLogger("app_dist")

HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 300.0  # a heartbeat older than this marks a lock stale (a dead host)
TAKEOVER_GUARD_S = 60.0  # a takeover guard older than this was left by a killed launch
_RECORD_BYTES = 1024  # every write of the lock file has this length (padded JSON)
_ATTEMPTS = 5


class RunDirectoryInUse(AppDistError):
    """Another live run holds the run directory's lock."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run directory's lock. Times are seconds since the epoch."""

    host: str
    pid: int
    pid_started: int | None  # the process's start time in clock ticks after boot (Linux)
    started: float
    heartbeat: float
    token: str

    def stale_because(self, now: float, host: str) -> str | None:
        """Why this lock may be taken over, or None while its holder may still run."""
        if self.host == host:
            running, started = _process_status(self.pid)
            if not running:
                return f"pid {self.pid} no longer runs on {host}"
            if None not in (started, self.pid_started) and started != self.pid_started:
                return f"pid {self.pid} on {host} is now another process"
        age = now - self.heartbeat
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
        return None


def _process_status(pid: int) -> tuple[bool, int | None]:
    """(runs, start time in clock ticks after boot) of a process on this host. A zombie (dead,
    not yet reaped: a SIGKILLed rank whose parent died too) does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False, None
    except OSError:  # no /proc (macOS): ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, None
        except PermissionError:
            pass
        return True, None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (command)": state is field 3
    return fields[0] not in ("Z", "X"), int(fields[19])  # field 22: starttime


def this_process() -> LockHolder:
    now = round(time.time(), 3)
    return LockHolder(host=socket.gethostname(), pid=os.getpid(),
                      pid_started=_process_status(os.getpid())[1], started=now, heartbeat=now,
                      token=uuid.uuid4().hex)


def read_holder(path: Path) -> LockHolder | None:
    """The holder a lock file names; None when there is no lock file. A file that stays
    unreadable (a launch killed between creating and writing it) names an unknown holder on
    an unknown host whose heartbeat is the file's modification time."""
    for attempt in range(3):
        try:
            content = path.read_bytes()  # json.loads decodes it: bytes that are no text fail
            stamp = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            record = json.loads(content)
            return LockHolder(host=str(record["host"]), pid=int(record["pid"]),
                              pid_started=record.get("pid_started"),
                              started=float(record["started"]),
                              heartbeat=float(record["heartbeat"]), token=str(record["token"]))
        except (ValueError, KeyError, TypeError):
            time.sleep(0.1 * (attempt + 1))  # caught between two writes: read again
    return LockHolder(host="?", pid=0, pid_started=None, started=stamp, heartbeat=stamp,
                      token="")


def in_use(run_dir: Path, holder: LockHolder, now: float | None = None) -> RunDirectoryInUse:
    """The one-line error of a launch that finds `run_dir` held by `holder`."""
    age = (now or time.time()) - holder.heartbeat
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder.started))
    lock = RunLayout(run_dir).lock
    return RunDirectoryInUse(
        f"run directory {run_dir} is in use by pid {holder.pid} on host {holder.host} since "
        f"{since} (heartbeat {max(age, 0):.0f} s ago); wait for that run to end or stop it, or "
        f"use another run.dir. If that host is dead, remove {lock} (a lock without a heartbeat "
        f"for {STALE_AFTER_S:.0f} s is taken over by itself)")


def check_free(run_dir: Path) -> None:
    """Raise RunDirectoryInUse when a live run holds `run_dir`'s lock (takes nothing). A lock
    that cannot be read (permissions) is left for rank 0 to report when it takes the lock."""
    try:
        holder = read_holder(RunLayout(run_dir).lock)
    except OSError:
        return
    if holder is not None and holder.stale_because(time.time(), socket.gethostname()) is None:
        raise in_use(run_dir, holder)


class RunLock:
    """The held lock of one run directory: `RunLock.acquire(run_dir)`, later `release()`
    (also as a context manager). Only one process (rank 0) takes it."""

    def __init__(self, path: Path, descriptor: int, holder: LockHolder) -> None:
        self.path = path
        self.holder = holder
        self._descriptor: int | None = descriptor
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                           daemon=True)

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take `run_dir`'s lock (the folder must exist), taking over a stale one; raise
        RunDirectoryInUse when a live run holds it. OSError when the folder is unwritable."""
        layout = RunLayout(run_dir)
        for _ in range(_ATTEMPTS):
            try:
                descriptor = os.open(layout.lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                holder = read_holder(layout.lock)
                if holder is None:
                    continue  # released in the meantime
                reason = holder.stale_because(time.time(), socket.gethostname())
                if reason is None:
                    raise in_use(run_dir, holder) from None
                _take_over(layout, holder, reason)
                continue
            lock = cls(layout.lock, descriptor, this_process())
            try:
                lock._write()
            except BaseException:
                lock.release()
                raise
            lock._heartbeat.start()
            return lock
        raise RunDirectoryInUse(f"run directory {run_dir}: could not take its lock {layout.lock} "
                                f"in {_ATTEMPTS} attempts (other launches of it are starting at "
                                "the same moment); start one run per run directory")

    def _write(self) -> None:
        """Write the record (a fresh heartbeat) over the whole file in one write of a fixed
        length, so that a reader sees the old record or the new one."""
        self.holder = replace(self.holder, heartbeat=round(time.time(), 3))
        record = json.dumps(asdict(self.holder)).ljust(_RECORD_BYTES - 1) + "\n"
        assert self._descriptor is not None
        os.pwrite(self._descriptor, record.encode(), 0)
        os.fsync(self._descriptor)

    def owned(self) -> bool:
        """Whether the lock file is still the one this process created (not taken over)."""
        if self._descriptor is None:
            return False
        try:
            mine, current = os.fstat(self._descriptor), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.owned():
                    log.warning("the lock %s was taken over by another launch (this run's "
                                "heartbeat stalled for more than %.0f s?)", self.path,
                                STALE_AFTER_S)
                    return
                self._write()
            except OSError as error:  # a hiccup of a network file system: try again later
                log.warning("cannot refresh the heartbeat of %s: %s", self.path, error)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's."""
        self._stop.set()
        if self._heartbeat.is_alive() and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        if self._descriptor is None:
            return
        try:
            if self.owned():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _take_over(layout: RunLayout, stale: LockHolder, reason: str) -> None:
    """Remove the stale lock `stale`, unless another launch has replaced it meanwhile; one
    launch at a time (the takeover guard), so two launches cannot both remove a lock and each
    create their own."""
    guard = layout.lock_takeover
    try:
        descriptor = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > TAKEOVER_GUARD_S:
                guard.unlink(missing_ok=True)  # left by a launch killed while taking over
        except FileNotFoundError:
            pass
        time.sleep(0.5)  # another launch is taking it over: look again
        return
    try:
        if read_holder(layout.lock) == stale:
            layout.lock.unlink(missing_ok=True)
            log.warning("taking over the stale lock of %s (pid %d on host %s since %s): %s",
                        layout.root, stale.pid, stale.host,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stale.started)),
                        reason)
    finally:
        os.close(descriptor)
        guard.unlink(missing_ok=True)
