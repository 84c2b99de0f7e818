"""The local Ray a sweep starts when no cluster is running, in a session of its own.

`ray.init()` would start Ray's GCS and raylet as children in the driver's process group, so a
stop signal to the group (`timeout`, SLURM's scancel, a terminal's hang-up) killed them
together with the driver: Tune could then neither stop its trials nor save the experiment,
waited 60 s for the dead GCS and exited without its summary. Here `ray start --head --block`
runs in a session of its own, which group signals do not reach; the driver alone takes them
(as Ctrl-C: runner.stop_signals_as_ctrl_c), stops Tune, and then stops this Ray. The kernel
sends it SIGTERM should the driver die without that (a SIGKILL: PR_SET_PDEATHSIG), and
`ray start --block` stops every process it started when it gets one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_dist.foundations.errors import ConfigError
from app_dist.foundations.processes import signal_me_when_parent_dies

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
ADDRESS_FILE = "ray_current_cluster"  # `ray start` writes the GCS address there once it is up


class LocalRay:
    """`ray start --head --block` with `num_cpus` CPUs (None: all of them) in its own session
    and temp dir, started by `start` and stopped by `stop`."""

    def __init__(self, num_cpus: int | None) -> None:
        self.num_cpus = num_cpus
        # Ray's socket paths must stay short: /tmp, not a deep tempfile.gettempdir().
        self.temp_dir = Path(tempfile.mkdtemp(prefix="app-dist-ray-", dir="/tmp"))
        self.log = self.temp_dir / "ray-start.log"
        self.address = ""
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        """Start it and wait until its GCS answers; returns its address."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                   "--port", str(port), "--temp-dir", str(self.temp_dir),
                   "--disable-usage-stats"]
        if self.num_cpus is not None:
            command += ["--num-cpus", str(self.num_cpus)]
        # As ray.init()'s own local Ray: without the token authentication that `ray start`
        # turns on by default (the driver would need the token), and stopped at once rather
        # than after draining its node for up to 30 s (which lets Ray Serve's replicas move; a
        # sweep that has ended has nothing to move).
        env = {**os.environ, "RAY_AUTH_MODE": "disabled",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=signal_me_when_parent_dies)
        address_file = self.temp_dir / ADDRESS_FILE
        deadline = time.monotonic() + START_TIMEOUT_S
        while not address_file.is_file() or not address_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
                raise ConfigError(f"the local Ray did not start ({tail[0]}); see {self.log}")
            time.sleep(0.1)
        self.address = address_file.read_text().strip()
        return self.address

    def stop(self) -> None:
        """SIGTERM to `ray start --block`, which stops what it started; its whole session
        SIGKILLed if anything is left after STOP_TIMEOUT_S."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left, e.g. a worker
        if self.process.poll() is None:
            self.process.wait(timeout=STOP_TIMEOUT_S)
