"""``/v1/tokens``: a team's API tokens (``admin`` scope): list them, create one, revoke one.

A token is shown in full once, in the answer that creates it; the store keeps its SHA-256 only, and
lists show its first 12 characters (the prefix) to tell tokens apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import Field as PydField

from server.api.deps import AdminTeamDep, SessionDep
from server.api.errors import AUTH, INVALID, answer
from server.errors import Conflict, NotFound
from server.store import access
from server.store.models import DEFAULT_SCOPES, ApiToken, Scope

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], responses=AUTH)
PREFIX_PATTERN = r"^inco_[A-Za-z0-9_-]{7}$"


class TokenCreate(BaseModel):
    """Body of ``POST /v1/tokens``."""

    model_config = ConfigDict(extra="forbid")
    name: str = PydField("", max_length=128, description="a note, e.g. who or what uses the token")
    scopes: list[Scope] = PydField(
        default_factory=lambda: [Scope(s) for s in DEFAULT_SCOPES],
        min_length=1,
        max_length=len(Scope),
        description="what the token may do: read, submit (jobs, cancels, data sets), admin (tokens), "
        "predict (run the team's models on images)",
    )

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("control characters (newlines, NUL, ...) are not allowed; use plain text")
        return value


class TokenPublic(BaseModel):
    """A token as lists show it: never the token, never its hash."""

    prefix: str = PydField(description="the token's first 12 characters")
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = PydField(description="the bearer token; shown this once, store it now")


def _public(row: ApiToken) -> TokenPublic:
    return TokenPublic(
        prefix=row.prefix, name=row.name, scopes=list(row.scopes), created_at=row.created_at, revoked_at=row.revoked_at
    )


@router.get("", response_model=list[TokenPublic])
def list_tokens(team: AdminTeamDep, session: SessionDep) -> list[TokenPublic]:
    """The team's tokens, revoked ones included, oldest first."""
    return [_public(row) for row in access.list_tokens(session, team_id=team.id)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    responses={
        201: {
            "description": "the token, shown this once",
            "links": {
                "RevokeToken": {
                    "operationRef": "#/paths/~1v1~1tokens~1{prefix}~1revoke/post",
                    "parameters": {"prefix": "$response.body#/prefix"},
                }
            },
        },
        413: answer("the body is larger than the server's limit (INCO_MAX_BODY_BYTES)"),
        **INVALID,
    },
)
def create_token(body: TokenCreate, team: AdminTeamDep, session: SessionDep) -> TokenCreated:
    """A new token for the caller's team with the scopes asked for (default read and submit)."""
    token = access.create_token(session, team=team, name=body.name, scopes=[s.value for s in body.scopes])
    row = next(r for r in access.list_tokens(session, team_id=team.id) if r.prefix == token[:12])
    return TokenCreated(**_public(row).model_dump(), token=token)


@router.post(
    "/{prefix}/revoke",
    response_model=TokenPublic,
    responses={
        404: answer("no token of the team starts with it"),
        409: answer("revoked already"),
        413: answer("the body is larger than the server's limit (INCO_MAX_BODY_BYTES); send none"),
        **INVALID,
    },
)
def revoke_token(
    prefix: Annotated[str, Path(pattern=PREFIX_PATTERN, description="the token's first 12 characters")],
    team: AdminTeamDep,
    session: SessionDep,
) -> TokenPublic:
    """Revoke one of the team's tokens; requests with it get 401 from now on."""
    rows = [r for r in access.list_tokens(session, team_id=team.id) if r.prefix == prefix]
    if not rows:
        raise NotFound(f"no token of your team starts with {prefix!r}: list them with GET /v1/tokens")
    if all(r.revoked_at is not None for r in rows):
        raise Conflict(f"token {prefix} is revoked already")
    access.revoke_token(session, prefix=prefix, team_id=team.id)  # sets revoked_at on these same rows
    return _public(rows[-1])
