"""``/v1/results``: the leaderboard, laid out like the paper's Table 1 by the clients."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import SessionDep, TeamDep
from server.api.errors import AUTH, INVALID
from server.api.params import (
    DatasetFilter,
    EvalFilter,
    MethodFilter,
    PresetFilter,
    RatioFilter,
    checked_method,
    normal_ratio,
)
from server.store import access
from server.store.models import LeaderboardRow

router = APIRouter(prefix="/v1/results", tags=["results"], responses=AUTH)


@router.get("", response_model=list[LeaderboardRow], responses=INVALID)
def leaderboard(
    team: TeamDep,
    session: SessionDep,
    method: MethodFilter = None,
    ratio: RatioFilter = None,
    eval: EvalFilter = None,
    preset: PresetFilter = None,
    dataset: DatasetFilter = None,
) -> list[LeaderboardRow]:
    """Mean, sample standard deviation and count of test accuracy over seeds, per data set, preset,
    method variant, ratio and evaluation."""
    rows = access.board_rows(
        session,
        team_id=team.id,
        method=checked_method(method),
        ratio=normal_ratio(ratio),
        eval=eval,
        preset=preset,
        dataset=dataset,
    )
    return access.leaderboard(rows)
