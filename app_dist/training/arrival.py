"""Waiting for a megabatch to arrive (data.follow=true): ALMA's stream as it really is, the
next megabatch trained as soon as it is published.

Before megabatch t starts, all ranks wait together until the stream's manifest lists it. Rank 0
reads the manifest every data.follow_poll_s seconds and tells the others what it found (one
broadcast per poll), so that the ranks stay in step and a pre-emption notice that reaches
any rank while they wait is agreed at once: the run stops with exit 75, its newest checkpoint
being megabatch t-1's, and the same command waits again. Rank 0 prints what it waits for and
since when, then a line every minute. Waiting longer than data.follow_timeout_s for one
megabatch stops the run as bad input (exit 2), its checkpoints intact.
"""

from __future__ import annotations

import logging
import time

from app_dist.config import DataSettings
from app_dist.data.manifest import Manifest
from app_dist.data.source import load_manifest
from app_dist.data.stream import MegabatchStream
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import AppDistError, DataError, agreed
from app_dist.foundations.storage import redact
from app_dist.training.preemption import Preempted, PreemptionNotice

log = logging.getLogger("app_dist")

STATUS_EVERY_S = 60.0


def await_megabatch(megabatch: int, stream: MegabatchStream, settings: DataSettings,
                    platform: Platform, preemption: PreemptionNotice) -> None:
    """Return once `megabatch` is published (`stream` extended to it), on every rank."""
    if megabatch <= stream.published:
        return
    where = redact(settings.shards)
    started = time.monotonic()
    since = time.strftime("%H:%M:%S")
    last_status = started
    if platform.is_primary:
        log.info("waiting for megabatch %d of %d at %s since %s (%d published; "
                 "data.follow_timeout_s=%.0f)", megabatch, stream.megabatches, where, since,
                 stream.published, settings.follow_timeout_s)
    while True:
        found: tuple[Manifest | None, AppDistError | None] = (None, None)
        if platform.is_primary:
            found = _read(settings)
        manifest, error = platform.broadcast_object(found)
        if error is not None:
            raise agreed(error, platform.is_primary)
        if manifest is not None and manifest.stream is not None \
                and manifest.stream.published >= megabatch:
            stream.extend(manifest)
            if platform.is_primary:
                log.info("megabatch %d arrived after %.1f s of waiting", megabatch,
                         time.monotonic() - started)
            return
        if preemption.agreed_now(platform):
            raise Preempted(f"pre-empted while waiting for megabatch {megabatch}; the newest "
                            f"checkpoint is megabatch {megabatch - 1}'s")
        waited = time.monotonic() - started
        if waited > settings.follow_timeout_s:
            raise agreed(DataError(
                f"{where}: megabatch {megabatch} of {stream.megabatches} has not arrived "
                f"after {waited:.0f} s (data.follow_timeout_s={settings.follow_timeout_s:g}); "
                "run the same command again to keep waiting"), platform.is_primary)
        if platform.is_primary and time.monotonic() - last_status >= STATUS_EVERY_S:
            last_status = time.monotonic()
            log.info("still waiting for megabatch %d of %d at %s since %s (%.0f s)",
                     megabatch, stream.megabatches, where, since, waited)
        time.sleep(settings.follow_poll_s)


def _read(settings: DataSettings) -> tuple[Manifest | None, AppDistError | None]:
    try:
        return load_manifest(settings.shards, settings), None
    except AppDistError as error:
        return None, error
