"""Placement groups a dead Ray Train controller left behind, released by the sweep itself.

Ray ties a placement group's life to its job (the sweep's driver), not to the actor that
created it: when a trial's Ray Train controller dies (Tune stopped the trial and killed its
driver, or the node that ran the trial's driver was lost), the group holding the trial's worker
CPUs stays reserved until the whole sweep ends, and later trials, or the same trial retried by
Tune, wait for ever for those CPUs (ray-project/ray#54305). Ray Train's own
PlacementGroupCleaner would remove the group, but it asks the dashboard's state API whether the
controller lives, which `ray[tune,train]` does not install: it only logs "Failed to query Ray
Train Controller actor state". The GCS knows without the dashboard: each group's record says
which actor created it and whether that actor is dead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# How often the sweep's Tune loop looks for orphaned groups: one GCS call, a few ms.
CHECK_INTERVAL_S = 2.0


def orphaned_placement_groups() -> list[str]:
    """Ids (hex) of this job's placement groups that are still held although the actor that
    created them is dead. Groups the driver created itself (Tune's, whose creator is no
    actor) and other jobs' groups are never among them."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    nil_actor = ray.ActorID.nil().binary()
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (group.creator_job_id.hex() == job and group.creator_actor_id != nil_actor
                and group.creator_actor_dead and not group.is_detached
                and group.state != removed):
            orphans.append(group.placement_group_id.hex())
    return orphans


def release_orphaned_placement_groups() -> list[str]:
    """Remove every orphaned placement group of this job; their ids (hex). Never raises: it
    runs inside Tune's loop, where an exception would end the sweep."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        orphans = orphaned_placement_groups()
    except Exception as error:  # the GCS busy or failing over: the next check tries again
        log.warning("could not read Ray's placement groups (%s); trying again later", error)
        return []
    released = []
    for group_hex in orphans:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_hex))))
        except Exception as error:  # removed meanwhile (by Ray Train's cleaner, where it works)
            log.debug("placement group %s not removed: %s", group_hex, error)
            continue
        log.info("released placement group %s of a Ray Train controller that died", group_hex)
        released.append(group_hex)
    return released


def release_callback(interval_s: float = CHECK_INTERVAL_S) -> Any:
    """A Tune callback that releases orphaned placement groups when a trial ends and every
    `interval_s` of the Tune loop: a controller on a lost node is declared dead only after
    Ray misses the node's heartbeats, after Tune has already seen the trial fail."""
    from ray import tune

    class ReleaseOrphanedPlacementGroups(tune.Callback):
        def __init__(self) -> None:
            self.next_check = 0.0

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + interval_s
                release_orphaned_placement_groups()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            release_orphaned_placement_groups()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release_orphaned_placement_groups()

    return ReleaseOrphanedPlacementGroups()
