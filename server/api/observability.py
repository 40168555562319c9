"""What the API tells operators: ``GET /metrics`` for Prometheus, and one log line per request.

Metrics (text exposition format, no token needed; each app has its own registry):

==================================  =========  ==================================================
name                                type       labels and meaning
==================================  =========  ==================================================
inco_api_request_duration_seconds   histogram  method, route (the template), status
inco_queue_depth                    gauge      queue: jobs waiting in Redis (NaN: Redis is down)
inco_jobs                           gauge      state: jobs of all teams (NaN: the database is down)
inco_epoch_images_per_second        gauge      job_id, team, stage: images/s of the latest epoch
                                               of each running job
inco_dependency_up                  gauge      dependency (redis, database): 1 answered, 0 not
==================================  =========  ==================================================

The gauges are computed when Prometheus scrapes, so they are never stale; a dependency that is down
makes its gauges NaN (or leaves the throughput out) and ``/metrics`` still answers 200.

The request log line (logger ``inco.api``) carries ``method``, ``route``, ``status``,
``duration_ms``, ``team`` (the token's team, once known) and ``job_id`` (routes about one job);
never a header or the query string, so never a token.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import queue
from server.errors import ServiceUnavailable
from server.store import access, models

log = logging.getLogger("inco.api")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "unmatched"
"""The route label of a request no route matched (a label per raw path would be unbounded)."""
THROUGHPUT_KEY = "img_per_s"
"""The key of the epoch metrics (``Metric.values``) that holds images per second."""


def route_of(scope: Scope) -> str:
    """The route template a request matched (``/v1/jobs/{job_id}``), else :data:`UNMATCHED`."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


class RequestMetrics:
    """Pure ASGI middleware: times each HTTP request, counts it in the latency histogram and logs one
    line for it (a request that raised counts as a 500)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            self._record(scope, status, start, failed=True)
            raise
        self._record(scope, status, start)

    def _record(self, scope: Scope, status: int, start: float, *, failed: bool = False) -> None:
        elapsed = time.perf_counter() - start
        method, route = scope["method"], route_of(scope)
        self.histogram.labels(method=method, route=route, status=str(status)).observe(elapsed)
        team = (scope.get("state") or {}).get("team")
        job_id = (scope.get("path_params") or {}).get("job_id")
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(
            level,
            "%s %s %d",
            method,
            route,
            status,
            exc_info=failed,
            extra={
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "team": team,
                "job_id": job_id,
            },
        )


class ServiceCollector(Collector):
    """The scrape-time gauges: queue depth from Redis, jobs by state and epoch throughput from the
    store. Each dependency is asked once per scrape; one that fails makes its gauges NaN."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "inco_dependency_up", "1 when the dependency answered this scrape", labels=["dependency"]
        )
        depth = GaugeMetricFamily("inco_queue_depth", "jobs waiting in the Redis queue", labels=["queue"])
        name = self.app.state.settings.queue
        try:
            depth.add_metric([name], float(queue.depth(self.app.state.redis, name)))
            up.add_metric(["redis"], 1.0)
        except (RedisError, ServiceUnavailable, OSError) as exc:
            log.warning("metrics: Redis did not answer: %s", exc)
            depth.add_metric([name], math.nan)
            up.add_metric(["redis"], 0.0)
        jobs = GaugeMetricFamily("inco_jobs", "jobs of all teams by state", labels=["state"])
        speed = GaugeMetricFamily(
            "inco_epoch_images_per_second",
            "images per second of the latest epoch of each running job",
            labels=["job_id", "team", "stage"],
        )
        try:
            counts, rates = self._from_store()
            up.add_metric(["database"], 1.0)
        except SQLAlchemyError as exc:
            log.warning("metrics: the database did not answer: %s", exc)
            counts, rates = {state.value: math.nan for state in models.JobStatus}, []
            up.add_metric(["database"], 0.0)
        for state, count in counts.items():
            jobs.add_metric([state], count)
        for job_id, team, stage, rate in rates:
            speed.add_metric([job_id, team, stage], rate)
        yield from (depth, jobs, speed, up)

    def _from_store(self) -> tuple[dict[str, float], list[tuple[str, str, str, float]]]:
        with Session(self.app.state.engine) as s:
            by_state = access.count_jobs_by_status(s)
            latest = access.latest_metrics_of_running_jobs(s)
        counts = {state.value: float(by_state.get(state.value, 0)) for state in models.JobStatus}
        rates = [
            (m.job_id, team, m.stage, float(m.values[THROUGHPUT_KEY]))
            for m, team in latest
            if isinstance(m.values.get(THROUGHPUT_KEY), int | float)
        ]
        return counts, rates


def install(app: FastAPI) -> CollectorRegistry:
    """Add the request middleware and ``GET /metrics`` to ``app``, with a registry of its own."""
    registry = CollectorRegistry()
    histogram = Histogram(
        "inco_api_request_duration_seconds",
        "API request latency by method, route template and status",
        ["method", "route", "status"],
        registry=registry,
        buckets=LATENCY_BUCKETS,
    )
    registry.register(ServiceCollector(app))
    app.state.metrics = registry
    app.add_middleware(RequestMetrics, histogram=histogram)

    @app.get("/metrics", tags=["health"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def metrics(request: Request) -> Response:
        """Prometheus metrics: API latency, queue depth, jobs by state, epoch throughput (no token)."""
        body: Any = generate_latest(request.app.state.metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return registry
