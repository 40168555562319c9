"""Pictures of the team's results and jobs, as PNG or SVG (drawn by :mod:`server.plots`):

* ``GET /v1/results/figure4.{fmt}``: accuracy against the labelled ratio (the filters of ``GET /v1/results``);
* ``GET /v1/jobs/{job_id}/plots/curves.{fmt}``: a job's training curves;
* ``GET /v1/jobs/{job_id}/plots/confusion.{fmt}``: the confusion matrix of one of its result rows;
* ``GET /v1/jobs/{job_id}/plots/embedding.{fmt}``: a t-SNE map of its backbone's embedding of its test
  images (:mod:`server.embedding`);
* ``GET /v1/jobs/{job_id}/plots/trials.{fmt}``: a tune job's trials.

Each answers what the JSON route of the same data answers for a job of another team (404), a token
without the read scope (403) and no token (401). matplotlib loads with the first picture, not with the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from server.api.deps import SessionDep, TeamDep
from server.api.errors import AUTH, INVALID, RETRY_AFTER, answer
from server.api.params import (
    INT32_MAX,
    DatasetFilter,
    EvalFilter,
    JobIdPath,
    MethodFilter,
    PresetFilter,
    RatioFilter,
    checked_method,
    normal_ratio,
)
from server.errors import NotFound
from server.store import access
from server.store.models import Job, JobKind, MetricPublic, ResultPublic, TrialPublic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from server.embedding import EmbeddingMaps

router = APIRouter(prefix="/v1", tags=["plots"], responses=AUTH)

MEDIA = {"png": "image/png", "svg": "image/svg+xml"}
Format = Annotated[Literal["png", "svg"], Path(description="`png` (900 px wide) or `svg`")]
RowSeed = Annotated[
    int | None, Query(ge=0, le=INT32_MAX, description="the result row's seed (default: the first row that matches)")
]
JobSeed = Annotated[
    int | None, Query(ge=0, le=INT32_MAX, description="which seed's backbone (default: the job's first)")
]


def _image(description: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": description,
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/svg+xml": {"schema": {"type": "string"}},
            },
        }
    }


def _answer(fig: Figure, fmt: str) -> Response:
    from server.plots import render

    return Response(render(fig, fmt), media_type=MEDIA[fmt])


def _job(session: Any, team_id: int | None, job_id: str) -> Job:
    return access.get_job(session, job_id=job_id, team_id=team_id)


def _about(job: Job) -> str:
    spec = job.spec
    return f"job {job.id} ({job.kind}, {spec.get('method', '?')}, {spec.get('preset', '?')} preset)"


@router.get(
    "/results/figure4.{fmt}",
    response_class=Response,
    responses={
        **_image("test accuracy (%) against the labelled ratio, a line per method variant and evaluation"),
        404: answer("no result of the team matches the filters"),
        **INVALID,
    },
)
def figure4(
    fmt: Format,
    team: TeamDep,
    session: SessionDep,
    method: MethodFilter = None,
    ratio: RatioFilter = None,
    eval: EvalFilter = None,
    preset: PresetFilter = None,
    dataset: DatasetFilter = None,
) -> Response:
    """Figure 4 of the paper from the rows ``GET /v1/results`` answers with the same filters: test accuracy
    (%) at each labelled ratio (1:32 ... 1:2), the mean over seeds with a band of one standard deviation."""
    filters = {"method": checked_method(method), "ratio": normal_ratio(ratio), "eval": eval, "preset": preset}
    rows = access.leaderboard(access.board_rows(session, team_id=team.id, dataset=dataset, **filters))
    if not rows:
        given = ", ".join(f"{k} {v}" for k, v in {**filters, "dataset": dataset}.items() if v is not None)
        raise NotFound(
            "no results" + (f" with {given}" if given else "") + " yet: submit a job (inco submit), "
            "or loosen the filters"
        )
    from server.plots import figure4 as draw

    return _answer(draw([r.model_dump() for r in rows]), fmt)


@router.get(
    "/jobs/{job_id}/plots/curves.{fmt}",
    response_class=Response,
    responses={
        **_image("a panel per metric (loss, BID, DWV, DWV weight, kNN accuracy, ...), a line per stage"),
        404: answer("the team has no job with this id, or the job has no metrics yet"),
        **INVALID,
    },
)
def curves(job_id: JobIdPath, fmt: Format, team: TeamDep, session: SessionDep) -> Response:
    """The job's per-epoch metrics (``GET /v1/jobs/{job_id}/metrics``) as curves."""
    job = _job(session, team.id, job_id)
    metrics = access.list_metrics(session, job_id=job.id)
    if not metrics:
        raise NotFound(
            f"job {job.id} has no metrics yet ({job.status}): plots appear once its first epoch ends "
            f"(inco wait {job.id})"
        )
    from server.plots import training_curves

    rows = [MetricPublic.model_validate(m, from_attributes=True).model_dump() for m in metrics]
    return _answer(training_curves(rows, title=f"{_about(job)}: training curves"), fmt)


@router.get(
    "/jobs/{job_id}/plots/confusion.{fmt}",
    response_class=Response,
    responses={
        **_image("the confusion matrix of one result row, per-class recall beside the rows"),
        404: answer("the team has no job with this id, or the job has no result row that matches"),
        **INVALID,
    },
)
def confusion(
    job_id: JobIdPath,
    fmt: Format,
    team: TeamDep,
    session: SessionDep,
    ratio: RatioFilter = None,
    eval: EvalFilter = None,
    seed: RowSeed = None,
) -> Response:
    """The confusion matrix of the job's result row at ``ratio``, ``eval`` and ``seed`` (each optional:
    the first row that matches, oldest first)."""
    job = _job(session, team.id, job_id)
    rows = access.list_results(session, team_id=team.id, job_id=job.id)
    if not rows:
        raise NotFound(
            f"job {job.id} has no results yet ({job.status}): confusion matrices appear once its "
            f"evaluation ends (inco wait {job.id})"
        )
    ratio = normal_ratio(ratio)
    match = [r for r in rows if (ratio in (None, r.ratio)) and (eval in (None, r.eval)) and (seed in (None, r.seed))]
    if not match:
        have = ", ".join(f"ratio={r.ratio}&eval={r.eval}&seed={r.seed}" for r in rows[:12])
        more = f" and {len(rows) - 12} more" if len(rows) > 12 else ""
        raise NotFound(f"job {job.id} has no result row that matches; it has {have}{more}")
    from server.plots import confusion as draw

    return _answer(draw(ResultPublic.model_validate(match[0], from_attributes=True).model_dump()), fmt)


def maps(request: Request) -> EmbeddingMaps:
    """The API process's embedding maps (made at the first request)."""
    from server.embedding import EmbeddingMaps

    state = request.app.state
    if getattr(state, "embedding_maps", None) is None:
        state.embedding_maps = EmbeddingMaps(state.settings.cache_dir)
    return state.embedding_maps


@router.get(
    "/jobs/{job_id}/plots/embedding.{fmt}",
    response_class=Response,
    responses={
        **_image("a t-SNE map of the backbone's embedding of the job's test images, a colour per class"),
        404: answer("the team has no job with this id, the job has no such seed, or no backbone yet"),
        410: answer("the job's backbone or classifier files, or its images, are no longer there"),
        **INVALID,
        429: answer("another map is being computed; retry after the header's seconds", headers=RETRY_AFTER),
    },
)
def embedding(
    job_id: JobIdPath, fmt: Format, team: TeamDep, session: SessionDep, request: Request, seed: JobSeed = None
) -> Response:
    """The job's backbone for ``seed`` (default: its first seed) applied to the test images of its split,
    brought to 2-D by t-SNE; the first request computes the map (seconds), later ones read it from a cache.
    A supervised job (no pretraining) is mapped with the backbone of its fine-tuned classifier."""
    from inco_core.config import RunSpec
    from server.embedding import data_path, find_source, job_seeds

    job = _job(session, team.id, job_id)
    seed = job_seeds(job)[0] if seed is None else seed
    source = find_source(session, job, seed)
    spec = RunSpec.model_validate(job.spec)
    folder = data_path(session, job, spec)
    session.close()  # the map takes seconds: the connection goes back to the pool meanwhile
    data = maps(request).map(source, spec, folder)
    title = (
        f"t-SNE of the {source.description}'s embedding of {data['images']} test images\n{_about(job)} · seed {seed}"
    )
    from server.plots import embedding_map

    return _answer(embedding_map({**data, "title": title}), fmt)


@router.get(
    "/jobs/{job_id}/plots/trials.{fmt}",
    response_class=Response,
    responses={
        **_image("each trial's validation accuracy, and each searched parameter against it"),
        404: answer("the team has no job with this id, the job is not a tune job, or it has no trials yet"),
        **INVALID,
    },
)
def trials(job_id: JobIdPath, fmt: Format, team: TeamDep, session: SessionDep) -> Response:
    """The trials of a tune job (``GET /v1/jobs/{job_id}/trials``): scores, and scores against parameters."""
    job = _job(session, team.id, job_id)
    if job.kind != JobKind.tune:
        raise NotFound(f"job {job.id} is a {job.kind} job; trials belong to tune jobs (inco tune)")
    rows = access.list_trials(session, job_id=job.id)
    if not rows:
        raise NotFound(f"tune job {job.id} has no trials yet ({job.status}): they appear once the search starts")
    from server.plots import trials as draw

    data = [TrialPublic.model_validate(t, from_attributes=True).model_dump(mode="json") for t in rows]
    return _answer(draw(data, title=f"{_about(job)}: trials"), fmt)
