"""FastAPI dependencies: the store session, Redis, settings, and the caller's team checked against the
scope a route needs (``TeamDep``: read, ``SubmitTeamDep``: submit, ``AdminTeamDep``: admin,
``PredictTeamDep``: predict)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from server.errors import Forbidden, StoreUnavailable, Unauthorized
from server.settings import Settings
from server.store import access
from server.store.models import ApiToken, Scope, Team

bearer = HTTPBearer(auto_error=False, description="an API token: `inco admin token create --team NAME`")


# dependencies that do no I/O are ``async``: FastAPI runs them on the event loop instead of handing
# each to the thread pool (a measurable share of a request's CPU on a small machine, bench/load.py)
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request, committed when the route returns (rolled back when it raises).

    ``async`` although the session does I/O: making it does none (it connects at its first query, in
    the route's thread), so only its end goes to the thread pool. A sync generator here cost two
    thread-pool hops per request, a measurable share of a request's CPU (bench/load.py)."""
    migrator = request.app.state.migrator
    if not migrator.ready.is_set():
        raise StoreUnavailable(f"the store is not ready (the API retries every few seconds): {migrator.error}")
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    except OperationalError as exc:
        await run_in_threadpool(session.close)  # closing rolls back
        raise _unreachable(exc) from exc
    except Exception:
        await run_in_threadpool(session.close)
        raise
    except BaseException:  # cancelled: no thread-pool hop from a cancelled task
        session.close()
        raise
    try:
        await run_in_threadpool(_commit_and_close, session)
    except OperationalError as exc:
        raise _unreachable(exc) from exc


def _unreachable(exc: OperationalError) -> StoreUnavailable:
    return StoreUnavailable(f"the database is unreachable, nothing was changed: {exc.orig}")


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    finally:
        session.close()


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


SessionDep = Annotated[Session, Depends(get_session)]
RedisDep = Annotated[Redis, Depends(get_redis)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's team and the token row (its scopes, its prefix)."""

    team: Team
    token: ApiToken


def current_caller(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The team and token of the bearer token; 401 without a valid one. The team's name is kept on
    the request for its log line (never the token)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (inco admin token create)")
    try:
        found = access.authenticate(session, token=credentials.credentials)
    except OperationalError as exc:
        raise StoreUnavailable("the database is unreachable") from exc
    if found is None:
        raise Unauthorized("unknown or revoked token: create one with `inco admin token create --team NAME`")
    team, token = found
    request.state.team = team.name
    return Caller(team=team, token=token)


def require(scope: Scope) -> Callable[[Caller], Team]:
    """A dependency giving the caller's team if its token has ``scope``, else 403 naming the scope."""

    async def scoped(caller: Annotated[Caller, Depends(current_caller)]) -> Team:
        if scope.value not in caller.token.scopes:
            raise Forbidden(
                f"this token ({caller.token.prefix}...) lacks the {scope.value!r} scope "
                f"(it has: {', '.join(caller.token.scopes) or 'none'}); create one that has it with "
                f"`inco admin token create --team {caller.team.name} --scope {scope.value}` "
                "or POST /v1/tokens with an admin token"
            )
        return caller.team

    scoped.__name__ = f"require_{scope.value}"
    return scoped


async def current_team(caller: Annotated[Caller, Depends(current_caller)]) -> Team:
    """The caller's team, whatever the token's scopes."""
    return caller.team


TeamDep = Annotated[Team, Depends(require(Scope.read))]
"""The caller's team; the token needs the ``read`` scope (every GET route)."""
SubmitTeamDep = Annotated[Team, Depends(require(Scope.submit))]
"""The caller's team; the token needs the ``submit`` scope (submit and cancel jobs, register data sets)."""
AdminTeamDep = Annotated[Team, Depends(require(Scope.admin))]
"""The caller's team; the token needs the ``admin`` scope (the team's tokens)."""
PredictTeamDep = Annotated[Team, Depends(require(Scope.predict))]
"""The caller's team; the token needs the ``predict`` scope (run a model on images)."""
CallerDep = Annotated[Caller, Depends(current_caller)]
