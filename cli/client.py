"""A small HTTP client of the InCo API for the CLI. Every failure is a :class:`ClientError` whose
message is one line that says what went wrong and what to do."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from server.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 30.0
PLOT_TIMEOUT_S = 600.0
"""A picture the API computes first (an embedding map: a backbone over the test images, then t-SNE)."""
BUSY_WAIT_S = 300.0
"""How long a request the API answers 429 (busy) is retried, as its Retry-After says."""
TOKEN_FIX = "set INCO_TOKEN or run `inco up`"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ClientError(Exception):
    """A request to the API failed; ``str(exc)`` is the one line to show, ``status`` the HTTP status of
    the answer when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _stack(path: Path) -> dict[str, Any]:
    """The local stack's state (``inco up``), or {} when it is not running."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read the local stack file {path} ({exc}): run `inco down` and `inco up`") from None
    return state if isinstance(state, dict) else {}


def resolve(settings: Settings | None = None) -> tuple[str, str | None]:
    """The API's base URL and the token: ``INCO_API_URL``/``INCO_TOKEN``, else the local stack file,
    else the default URL and no token."""
    settings = settings or Settings()
    url = settings.api_url if "api_url" in settings.model_fields_set else None
    token = settings.token
    if url is None or token is None:
        state = _stack(settings.stack_file)
        url = url or state.get("api_url") or DEFAULT_URL
        token = token or state.get("token")
    return str(url).rstrip("/"), token


def job_path(job_id: str, tail: str = "") -> str:
    """``/v1/jobs/<id><tail>``; an id that cannot be a job's is refused before any request."""
    if not _JOB_ID.match(job_id):
        raise ClientError(f"no job {job_id!r}: job ids are letters and digits; list them with `inco jobs`")
    return f"/v1/jobs/{job_id}{tail}"


ARCHIVE_SUFFIXES = {".zip": "application/zip", ".tar": "application/x-tar", ".tar.gz": "application/gzip"}


def archive_type(path: Path) -> str:
    """The Content-Type of an archive, from its name (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``)."""
    name = path.name.lower()
    if name.endswith(".tgz"):
        return ARCHIVE_SUFFIXES[".tar.gz"]
    for suffix in (".tar.gz", ".zip", ".tar"):
        if name.endswith(suffix):
            return ARCHIVE_SUFFIXES[suffix]
    raise ClientError(f"{path.name} is not a .zip, .tar or .tar.gz file: pack the class folders into one of these")


def _detail(response: httpx.Response) -> str:
    """The server's ``detail`` message, or a short description of an answer that has none (then
    the server is probably not the InCo API)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's default validation answer
        detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    if detail:
        return str(detail)
    text = " ".join(response.text.split())[:200]
    return (
        f"HTTP {response.status_code} {response.reason_phrase}"
        + (f" ({text})" if text else "")
        + f" from {response.request.url.copy_with(query=None)}: is INCO_API_URL the InCo API?"
    )


def _retry_after(response: httpx.Response) -> float:
    """The seconds a 429 answer's Retry-After header asks for (1 to 30; 1 when absent)."""
    try:
        return min(30.0, max(1.0, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


class ApiClient:
    """``with ApiClient.from_env() as api: api.get_job(id)``; JSON in, JSON out."""

    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        bad = f"INCO_API_URL {base_url!r} is not an http(s) URL: use one like {DEFAULT_URL}"
        if not self.base_url.startswith(("http://", "https://")):
            raise ClientError(bad)
        try:
            self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        except (httpx.InvalidURL, ValueError):
            raise ClientError(bad) from None

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> ApiClient:
        url, token = resolve(settings)
        if not token:
            raise ClientError(f"no API token: {TOKEN_FIX} (tokens come from `inco admin token create --team NAME`)")
        return cls(url, token)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- the one place requests are made ---------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content: IO[bytes] | None = None,
        content_type: str | None = None,
        files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
        raw: bool = False,
        timeout_s: float | None = None,
        busy_wait_s: float = 0.0,
    ) -> Any:
        """``body`` is sent as JSON; ``content`` (an open file, streamed) as ``content_type``; ``files``
        as multipart form fields. Returns the JSON answer, or with ``raw`` the response itself.
        ``timeout_s`` replaces the client's timeout for this request; a 429 (busy) answer is retried for up
        to ``busy_wait_s`` seconds, waiting what its Retry-After header says."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        deadline = time.monotonic() + busy_wait_s
        while True:
            response = self._send(method, path, params, body, content, content_type, files, timeout_s)
            left = deadline - time.monotonic()
            if response.status_code != 429 or left <= 0:
                break
            time.sleep(min(left, _retry_after(response)))
        if response.status_code == 401:
            raise ClientError(f"{_detail(response)} ({TOKEN_FIX})", response.status_code)
        if response.status_code >= 400:
            raise ClientError(_detail(response), response.status_code)
        if raw:
            return response
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"{self.base_url} answered {method} {path} with something that is not JSON: "
                "is INCO_API_URL the InCo API?"
            ) from None

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, Any],
        body: Any,
        content: IO[bytes] | None,
        content_type: str | None,
        files: list[tuple[str, tuple[str, bytes, str]]] | None,
        timeout_s: float | None,
    ) -> httpx.Response:
        # the client's own timeout unless this request has one (a per-request timeout only when given:
        # Starlette's TestClient, which the tests put in place of the client, warns at any)
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            if content is not None:
                return self.http.request(
                    method, path, params=params, content=content, headers={"Content-Type": str(content_type)}, **extra
                )
            if files is not None:
                return self.http.request(method, path, params=params, files=files, **extra)
            return self.http.request(method, path, params=params, json=body, **extra)
        except httpx.ConnectError:
            raise ClientError(
                f"cannot reach the InCo API at {self.base_url}: start it with `inco up` or set INCO_API_URL"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(
                f"the InCo API at {self.base_url} did not answer within {timeout_s or self.timeout_s:.0f} s: "
                "check that it runs (`inco up`) or set INCO_API_URL"
            ) from None
        except httpx.HTTPError as exc:
            raise ClientError(f"request to the InCo API at {self.base_url} failed: {exc}; check INCO_API_URL") from None

    # -- pictures (PNG or SVG, drawn by the API) ---------------------------------------------------------
    def image(
        self, path: str, *, params: dict[str, Any] | None = None, timeout_s: float | None = None, busy_wait_s: float = 0
    ) -> bytes:
        """The bytes of a picture the API draws; an answer that is not an image is a ClientError."""
        response = self.request("GET", path, params=params, raw=True, timeout_s=timeout_s, busy_wait_s=busy_wait_s)
        kind = response.headers.get("content-type", "")
        if not kind.startswith("image/"):
            raise ClientError(
                f"{self.base_url} answered GET {path} with {kind or 'no content type'}, not an image: "
                "is INCO_API_URL the InCo API?"
            )
        return response.content

    def figure4(self, fmt: str, **filters: str | None) -> bytes:
        """Figure 4 (accuracy against the labelled ratio) of the leaderboard rows these filters keep."""
        return self.image(f"/v1/results/figure4.{fmt}", params=filters)

    def job_plot(self, job_id: str, name: str, fmt: str, **params: Any) -> bytes:
        """One of a job's plots: curves, confusion, embedding (computed first: a long timeout, and
        retried while the API is busy computing another) or trials."""
        slow = name == "embedding"
        return self.image(
            job_path(job_id, f"/plots/{name}.{fmt}"),
            params=params,
            timeout_s=PLOT_TIMEOUT_S if slow else None,
            busy_wait_s=BUSY_WAIT_S if slow else 0,
        )

    # -- jobs ----------------------------------------------------------------------------------------
    def submit_job(
        self,
        *,
        kind: str,
        spec: dict[str, Any],
        pretrained_job: str | None = None,
        tune: dict[str, Any] | None = None,
        from_tune: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "spec": spec, "pretrained_job": pretrained_job}
        if tune is not None:
            body["tune"] = tune
        if from_tune is not None:
            body["from_tune"] = from_tune
        return self.request("POST", "/v1/jobs", body=body)

    def trials(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", job_path(job_id, "/trials"))

    def list_jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/jobs", params={"status": status, "limit": limit, "offset": offset})

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", job_path(job_id))

    def metrics(self, job_id: str, *, stage: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", job_path(job_id, "/metrics"), params={"stage": stage})

    def logs(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", job_path(job_id, "/logs"))

    def job_results(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", job_path(job_id, "/results"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", job_path(job_id, "/cancel"))

    # -- models ----------------------------------------------------------------------------------------
    def models(self, **filters: Any) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models", params=filters)

    def model_file(self, model_id: int, fmt: str) -> httpx.Response:
        return self.request("GET", f"/v1/models/{model_id}/file", params={"format": fmt}, raw=True)

    def model_card(self, model_id: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/models/{model_id}/card")

    def predict(
        self, model_id: int, images: list[tuple[str, bytes]], *, level: float | None, top_k: int
    ) -> dict[str, Any]:
        files = [("files", (name, data, "application/octet-stream")) for name, data in images]
        return self.request(
            "POST", f"/v1/models/{model_id}/predict", params={"level": level, "top_k": top_k}, files=files
        )

    # -- results and data sets -------------------------------------------------------------------------
    def leaderboard(self, **filters: str | None) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/results", params=filters)

    def datasets(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/datasets")

    def add_dataset(self, *, name: str, path: str) -> dict[str, Any]:
        return self.request("POST", "/v1/datasets", body={"name": name, "path": path})

    def upload_dataset(self, *, name: str, archive: Path) -> dict[str, Any]:
        """Stream a zip, tar or tar.gz of class folders to the server, which unpacks and registers it."""
        content_type = archive_type(archive)
        try:
            handle = archive.open("rb")
        except OSError as exc:
            raise ClientError(
                f"cannot read {archive} ({exc.strerror or exc}): pass the path of a .zip or .tar.gz"
            ) from None
        with handle:
            return self.request(
                "POST", "/v1/datasets", params={"name": name}, content=handle, content_type=content_type
            )
