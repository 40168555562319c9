"""What a Ray Train controller that died leaves behind: its workers' placement group, which holds
their CPUs and GPUs until its Ray job (driver) ends. Read from Ray's GCS, not the Ray dashboard."""

from __future__ import annotations

import logging

import ray

log = logging.getLogger("inco.worker")


def free_orphaned_placement_groups() -> int:
    """Remove the placement groups of this Ray job whose creator, an actor, died: a Ray Train
    controller that ended with its Tune trial (ASHA stopped it, or it crashed) leaves its workers'
    CPUs and GPUs held until the job ends, which for a search is when the search ends. Placement
    groups that this job's driver made itself (Tune's, one per trial) and detached ones are left
    alone. Returns how many it removed. Reads Ray's GCS directly, not the Ray dashboard."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if (
            pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and created_by_actor
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.creator_job_id.hex() == job_id
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


def release_orphaned_placement_groups(of: str) -> None:
    """:func:`free_orphaned_placement_groups`, logged; a GCS that does not answer is logged too, not
    raised (what ``of`` names goes on without: the next call tries again)."""
    try:
        if removed := free_orphaned_placement_groups():
            log.info("freed %d placement group(s) of %s", removed, of)
    except Exception as exc:
        log.warning("placement groups of %s not checked: %s", of, exc)
