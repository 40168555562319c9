"""FastAPI dependencies: the store session, Redis, settings and the caller's team."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from server.errors import StoreUnavailable, Unauthorized
from server.settings import Settings
from server.store import access
from server.store.models import Team

bearer = HTTPBearer(auto_error=False, description="an API token: `inco admin token create --team NAME`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise StoreUnavailable(f"the database is unreachable, nothing was changed: {exc.orig}") from exc
        except BaseException:
            session.rollback()
            raise


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


SessionDep = Annotated[Session, Depends(get_session)]
RedisDep = Annotated[Redis, Depends(get_redis)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def current_team(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Team:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (inco admin token create)")
    try:
        team = access.team_for_token(session, token=credentials.credentials)
    except OperationalError as exc:
        raise StoreUnavailable("the database is unreachable") from exc
    if team is None:
        raise Unauthorized("unknown or revoked token: create one with `inco admin token create --team NAME`")
    return team


TeamDep = Annotated[Team, Depends(current_team)]
