"""``/v1/models``: every classifier the team trained, as a model it can list, download, export and
run on new images (:mod:`server.predictor`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from server.api.deps import PredictTeamDep, SessionDep, TeamDep
from server.api.errors import AUTH, INVALID, RETRY_AFTER, answer
from server.api.params import (
    INT32_MAX,
    DatasetFilter,
    EvalFilter,
    JobIdFilter,
    MethodFilter,
    RatioFilter,
    checked_method,
    normal_ratio,
)
from server.predictor import DEFAULT_LEVEL, ModelFiles, read_images
from server.store import access
from server.store.models import Artifact, Model, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTH)

ModelId = Annotated[
    int, Path(ge=1, le=INT32_MAX, description="the model's id (from GET /v1/models); another team's is not found")
]
NOT_FOUND = {404: answer("the team has no model with this id")}
GONE = {410: answer("the model is registered but its file was deleted from the artifact store")}
MEDIA = {
    "onnx": ("application/octet-stream", "onnx"),
    "torchscript": ("application/octet-stream", "torchscript.pt"),
    "pytorch": ("application/octet-stream", "pt"),
}


class TopClass(BaseModel):
    class_: str = Field(alias="class")
    probability: float

    model_config = {"populate_by_name": True}


class ImagePrediction(BaseModel):
    file: str = Field(description="the file's name (inside an archive: archive/path)")
    predicted: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="every class's probability")
    top_k: list[TopClass]
    prediction_set: list[str] = Field(
        description="the classes the conformal set at `level` keeps, most probable first: it holds the true "
        "class with probability >= level"
    )
    needs_review: bool = Field(description="the set holds more than one class: a person should look")


class Prediction(BaseModel):
    model: int
    level: float
    calibration_images: int
    images: list[ImagePrediction]
    took_ms: float


def files(request: Request) -> ModelFiles:
    state = request.app.state
    if getattr(state, "model_files", None) is None:
        state.model_files = ModelFiles(state.settings.predict_slots)
    return state.model_files


def _model_and_file(session: Any, team_id: int, model_id: int) -> tuple[Model, Artifact | None]:
    model = access.get_model(session, team_id=team_id, model_id=model_id)
    return model, session.get(Artifact, model.artifact_id)


@router.get("", response_model=list[ModelPublic], responses=INVALID)
def list_models(
    team: TeamDep,
    session: SessionDep,
    method: MethodFilter = None,
    ratio: RatioFilter = None,
    eval: EvalFilter = None,
    dataset: DatasetFilter = None,
    job_id: JobIdFilter = None,
    best: Annotated[bool, Query(description="only the most accurate model of each data set and ratio")] = False,
) -> list[ModelPublic]:
    """The team's models, newest first (``best``: the most accurate per data set and ratio)."""
    rows = access.list_models(
        session,
        team_id=team.id,
        method=checked_method(method),
        ratio=normal_ratio(ratio),
        eval_mode=eval,
        dataset=dataset,
        job_id=job_id,
        best=best,
    )
    return [ModelPublic.model_validate(m, from_attributes=True) for m in rows]


@router.get("/{model_id}", response_model=ModelPublic, responses={**NOT_FOUND, **INVALID})
def get_model(model_id: ModelId, team: TeamDep, session: SessionDep) -> ModelPublic:
    """One model of the team."""
    model = access.get_model(session, team_id=team.id, model_id=model_id)
    return ModelPublic.model_validate(model, from_attributes=True)


@router.get("/{model_id}/card", responses={**NOT_FOUND, **GONE, **INVALID})
def get_card(model_id: ModelId, team: TeamDep, session: SessionDep, request: Request) -> dict[str, Any]:
    """The model card: classes, preprocessing, metrics, how it was trained (every download carries it too)."""
    from server.predictor import model_card

    model, artifact = _model_and_file(session, team.id, model_id)
    _, info = files(request).load(model, artifact)
    return model_card(model, info)


@router.get(
    "/{model_id}/file",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the model file, its card inside"},
        **NOT_FOUND,
        **GONE,
        **INVALID,
    },
)
def download(
    model_id: ModelId,
    team: TeamDep,
    session: SessionDep,
    request: Request,
    format: Annotated[
        Literal["onnx", "torchscript", "pytorch"], Query(description="onnx, torchscript or pytorch")
    ] = "onnx",
) -> FileResponse:
    """The model as ONNX (input `image` float32 [batch, 1, S, S], pixel values 0-255; output
    `probabilities`), TorchScript or the PyTorch classifier file; made on first request, then cached.
    The model card is inside (ONNX metadata `inco_model_card`, TorchScript `model_card.json`, the
    PyTorch file's `card`)."""
    model, artifact = _model_and_file(session, team.id, model_id)
    path = files(request).file(model, artifact, format)
    media, suffix = MEDIA[format]
    name = f"inco-model-{model.id}-{model.method}-{model.ratio.replace(':', 'r')}-{model.eval}.{suffix}"
    return FileResponse(path, media_type=media, filename=name)


@router.post(
    "/{model_id}/predict",
    response_model=Prediction,
    responses={
        **NOT_FOUND,
        **GONE,
        **INVALID,
        413: answer("the files are larger than INCO_MAX_PREDICT_BYTES"),
        429: answer("every prediction slot is busy; retry after the header's seconds", headers=RETRY_AFTER),
    },
)
def predict(
    model_id: ModelId,
    team: PredictTeamDep,
    session: SessionDep,
    request: Request,
    files_: Annotated[
        list[UploadFile],
        File(alias="files", description="images (jpg, png, bmp, tif, pgm) or zip / tar / tar.gz archives of them"),
    ],
    level: Annotated[
        float | None,
        Query(
            gt=0,
            lt=1,
            description="the conformal sets' coverage, e.g. 0.9: 90 % hold the true class "
            "(default: the team's review level, set with `inco admin team set --review-level`, else 0.9)",
        ),
    ] = None,
    top_k: Annotated[int, Query(ge=1, le=100, description="how many of the most probable classes to list")] = 3,
) -> dict[str, Any]:
    """Run the model on images: per image the predicted class, every class's probability, the top k,
    the conformal prediction set at ``level`` and ``needs_review`` when the set holds several classes."""
    model, artifact = _model_and_file(session, team.id, model_id)
    settings = request.app.state.settings
    uploads = [(f.filename or f"file{i + 1}", f.content_type, f.file.read()) for i, f in enumerate(files_)]
    images = read_images(uploads, max_images=settings.max_predict_images, max_bytes=settings.max_predict_bytes)
    if level is None:
        level = team.review_level if team.review_level is not None else DEFAULT_LEVEL
    return files(request).predict(model, artifact, images, level=level, top_k=min(top_k, len(model.classes)))
