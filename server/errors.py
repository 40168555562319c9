"""Service errors, extending the ``inco_core`` tree (see :mod:`inco_core.errors`).

    InCoError
    ├── ConfigError, DataError, CheckpointError      (inco_core: the user's spec or data)  -> 422
    ├── NotFound             no such job / data set / artifact / model for this team   -> 404
    ├── Gone                 the model exists but its file was deleted                  -> 410
    ├── Conflict             the request clashes with stored state                     -> 409
    ├── Unauthorized         no token, or a token that is unknown or revoked           -> 401
    ├── Forbidden            the token lacks the scope the route needs                 -> 403
    ├── TooLarge             the body or upload is over the server's limit             -> 413
    ├── LimitReached         the team is at its limit of active jobs or GPUs           -> 429
    │   └── Busy             every prediction slot is taken; retry in a second          -> 429
    ├── ServiceUnavailable   a dependency is down; try again                           -> 503
    │   ├── StoreUnavailable the SQL store
    │   └── QueueUnavailable Redis
    └── Canceled             raised inside training when a job is canceled (never an HTTP answer)

The API maps this tree to HTTP in one exception handler; the CLI prints the message.
"""

from __future__ import annotations

from inco_core.errors import InCoError


class NotFound(InCoError):
    """No such object for this team (another team's object is 'not found' too)."""


class Gone(InCoError):
    """The object is registered but what it points at is gone (a model whose file was deleted)."""


class Conflict(InCoError):
    """The request clashes with what is stored (a duplicate name, a job that already finished)."""


class Unauthorized(InCoError):
    """No bearer token, or one that is unknown or revoked."""


class Forbidden(InCoError):
    """The token is valid but lacks the scope (read, submit, admin, predict) the route needs."""


class TooLarge(InCoError):
    """The request body or upload is larger than the server accepts."""


class LimitReached(InCoError):
    """The team is at its limit of queued + running jobs or GPUs; try again when one ends."""


class Busy(LimitReached):
    """Every slot of a bounded resource (the API's prediction slots) is in use; retry shortly."""

    retry_after_s = 1


class ServiceUnavailable(InCoError):
    """A service the request needs is down; nothing was stored."""


class StoreUnavailable(ServiceUnavailable):
    """The SQL store does not answer."""


class QueueUnavailable(ServiceUnavailable):
    """Redis does not answer."""


class Canceled(InCoError):
    """Raised inside training when the job's cancel flag is set; the job ends ``canceled``."""
