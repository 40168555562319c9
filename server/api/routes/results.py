"""``/v1/results``: the leaderboard, laid out like the paper's Table 1 by the clients."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from inco_core.config import METHODS, parse_ratio
from inco_core.errors import ConfigError
from server.api.deps import SessionDep, TeamDep
from server.store import access
from server.store.models import LeaderboardRow

router = APIRouter(prefix="/v1/results", tags=["results"])


@router.get("", response_model=list[LeaderboardRow])
def leaderboard(
    team: TeamDep,
    session: SessionDep,
    method: str | None = None,
    ratio: str | None = None,
    eval: Literal["finetune", "linear"] | None = None,
    preset: Literal["paper", "cpu", "smoke"] | None = None,
    dataset: str | None = None,
) -> list[LeaderboardRow]:
    """Mean, sample standard deviation and count of test accuracy over seeds, per data set, preset,
    method variant, ratio and evaluation."""
    if method is not None and method not in METHODS:
        raise ConfigError(f"method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if ratio is not None:
        try:
            ratio = f"1:{parse_ratio(ratio)}"
        except ConfigError as exc:
            raise ConfigError(f"ratio: {exc}") from None
    rows = access.board_rows(
        session, team_id=team.id, method=method, ratio=ratio, eval=eval, preset=preset, dataset=dataset
    )
    return access.leaderboard(rows)
