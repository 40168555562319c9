"""``inco models``, ``inco export`` and ``inco predict``: the classifiers a team trained, as files and
as answers about new images. ``inco predict --model RUN_FOLDER`` runs without a service, on a run
folder that ``inco run`` wrote."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.client import ClientError
from cli.common import err_console, fail
from cli.service import _api, _print_json

BATCH = 64  # images per predict request
PROGRESS_FROM = 8  # a progress bar for more images than this
ModelId = Annotated[int, typer.Argument(min=1, help="the model's id (`inco models` lists them)", show_default=False)]
FORMATS = ("table", "json", "csv")


def _ratio(text: str | None) -> str | None:
    from inco_core.config import parse_ratio
    from inco_core.errors import ConfigError

    if text is None:
        return None
    try:
        return f"1:{parse_ratio(text)}"
    except ConfigError as exc:
        fail(f"--ratio: {exc}")


def models(
    best: Annotated[bool, typer.Option("--best", help="only the most accurate model per data set and ratio")] = False,
    ratio: Annotated[str | None, typer.Option(help="only this label ratio, e.g. 1:16")] = None,
    eval_: Annotated[str | None, typer.Option("--eval", help="finetune or linear")] = None,
    method: Annotated[str | None, typer.Option(help="only this method")] = None,
    dataset: Annotated[str | None, typer.Option(help="only this data set")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
) -> None:
    """List your team's trained classifiers (newest first; --best: the best per ratio)."""
    if eval_ is not None and eval_ not in ("finetune", "linear"):
        fail(f"--eval must be finetune or linear (got {eval_!r})")
    with _api() as api:
        rows = api.models(best=best or None, ratio=_ratio(ratio), eval=eval_, method=method, dataset=dataset)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        err_console.print("no models yet: every finished experiment registers its classifiers (`inco submit ...`)")
        return
    table = Table(title="models" + (" (best per ratio)" if best else ""), title_justify="left")
    for col in ("id", "data set", "method", "ratio", "eval", "seed", "accuracy", "classes", "job", "created"):
        table.add_column(col, justify="right" if col in ("id", "seed", "accuracy") else "left")
    for m in rows:
        table.add_row(
            str(m["id"]),
            m["dataset"],
            m["variant"],
            m["ratio"],
            m["eval"],
            str(m["seed"]),
            f"{100 * m['accuracy']:.2f} %",
            str(len(m["classes"])),
            m["job_id"][:8],
            m["created_at"][:16].replace("T", " "),
        )
    Console().print(table)
    err_console.print("predict with `inco predict MODEL IMAGES...`; export with `inco export MODEL --format onnx`")


def export(
    model: ModelId,
    format_: Annotated[str, typer.Option("--format", help="onnx, torchscript or pytorch")] = "onnx",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="file to write", show_default="the server's file name")
    ] = None,
) -> None:
    """Download a model as ONNX, TorchScript or the PyTorch file; its model card is written beside it
    (OUTPUT.card.json) and travels inside the file too."""
    if format_ not in ("onnx", "torchscript", "pytorch"):
        fail(f"--format must be onnx, torchscript or pytorch (got {format_!r})")
    with _api() as api:
        response = api.model_file(model, format_)
        card = api.model_card(model)
    name = response.headers.get("content-disposition", "").partition("filename=")[2].strip('"')
    target = output or Path(name or f"inco-model-{model}.{format_}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(response.content)
        Path(f"{target}.card.json").write_text(json.dumps(card, indent=2) + "\n")
    except OSError as exc:
        fail(f"cannot write {target} ({exc.strerror or exc}): pass -o with a folder you can write to")
    err_console.print(
        f"wrote {target} ({len(response.content) / 2**20:.1f} MiB, {format_}) and {target}.card.json: "
        f"{len(card['classes'])} classes, input float32 [batch, 1, {card['image_size']}, {card['image_size']}] "
        "pixel values 0-255"
    )


def _images(paths: list[Path]) -> list[Path]:
    from inco_core.files import IMAGE_EXTENSIONS, is_image

    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if is_image(p))
        elif path.is_file():
            found.append(path)
        else:
            fail(f"{path} does not exist: pass image files or folders of them")
    if not found:
        fail(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(map(str, paths))}")
    return found


def _progress(total: int) -> Progress:
    return Progress(
        TextColumn("predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=total <= PROGRESS_FROM,
        transient=True,
    )


def predict(
    model: Annotated[
        str, typer.Argument(help="a model id (`inco models`), or with --model a run folder", show_default=False)
    ],
    paths: Annotated[list[Path], typer.Argument(help="image files and folders (searched recursively)")],
    local: Annotated[
        bool, typer.Option("--model", help="MODEL is a run folder of `inco run` (or a classifier file): no service")
    ] = False,
    format_: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    level: Annotated[
        float | None,
        typer.Option(
            min=0.5, max=0.999, help="coverage of the prediction sets", show_default="the team's review level, or 0.9"
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="most probable classes listed (json)")] = 3,
) -> None:
    """Which defect is on each image: the predicted class, its probability, and whether a person
    should look (the conformal prediction set at --level holds more than one class)."""
    if format_ not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got {format_!r})")
    files = _images(paths)
    if local:
        answers = _predict_local(Path(model), files, level=level, top_k=top_k)
    else:
        if not model.isdigit():
            fail(f"{model!r} is not a model id: list them with `inco models`, or pass --model RUN_FOLDER")
        answers = []
        with _api() as api, _progress(len(files)) as bar:
            task = bar.add_task("predict", total=len(files))
            for i in range(0, len(files), BATCH):
                chunk = files[i : i + BATCH]
                batch = [(str(p), _read(p)) for p in chunk]
                try:
                    answers += api.predict(int(model), batch, level=level, top_k=top_k)["images"]
                except ClientError as exc:
                    fail(str(exc))
                bar.advance(task, len(chunk))
    _show(answers, format_)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path} ({exc.strerror or exc})")


def _classifier_file(target: Path) -> Path:
    """The classifier to use in a run folder: its most accurate one (result.json), or the file given."""
    if target.is_file():
        return target
    result = target / "result.json"
    if not result.is_file():
        fail(f"{target} is not a run folder of `inco run` (no result.json) nor a classifier file")
    rows = [r for r in json.loads(result.read_text())["results"] if r.get("checkpoint")]
    if not rows:
        fail(f"the run in {target} saved no classifier (it was made before models were saved): run it again")
    best = max(rows, key=lambda r: r["accuracy"])
    path = Path(best["checkpoint"])
    if not path.is_file():
        path = target / "checkpoints" / path.name  # a run folder that was moved
    return path


def _predict_local(target: Path, files: list[Path], *, level: float | None, top_k: int) -> list[dict[str, Any]]:
    path = _classifier_file(target)  # a wrong folder is answered before torch loads
    import numpy as np
    import torch

    from inco_core.classifier import conformal_threshold, image_answers, load_classifier, probabilities
    from inco_core.data import decode_bytes
    from inco_core.errors import InCoError
    from server.predictor import DEFAULT_LEVEL  # the service's default: no team here to set another

    try:
        model, info = load_classifier(path)
        classes, size = info["classes"], info["image_size"]
        scores = info.get("conformal", {}).get("scores", torch.zeros(0))
        threshold = conformal_threshold(scores, DEFAULT_LEVEL if level is None else level)
        out = []
        with _progress(len(files)) as bar:
            task = bar.add_task("predict", total=len(files))
            for i in range(0, len(files), BATCH):
                chunk = files[i : i + BATCH]
                pixels = torch.from_numpy(np.stack([decode_bytes(_read(p), str(p), size) for p in chunk]))
                probs = probabilities(model, pixels)
                out += image_answers([str(path) for path in chunk], probs, classes, threshold, top_k)
                bar.advance(task, len(chunk))
        return out
    except InCoError as exc:
        fail(str(exc))


def _show(answers: list[dict[str, Any]], format_: str) -> None:
    if format_ == "json":
        _print_json(answers)
        return
    if format_ == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "predicted", "probability", "needs_review", "prediction_set"])
        for a in answers:
            p = a["probabilities"][a["predicted"]]
            writer.writerow([a["file"], a["predicted"], f"{p:.4f}", a["needs_review"], " ".join(a["prediction_set"])])
        return
    table = Table(title_justify="left")
    for col in ("file", "predicted", "probability", "review"):
        table.add_column(col, justify="right" if col == "probability" else "left")
    for a in answers:
        review = "look: " + ", ".join(a["prediction_set"]) if a["needs_review"] else ""
        p = a["probabilities"][a["predicted"]]
        table.add_row(a["file"], a["predicted"], f"{100 * p:.1f} %", review)
    Console().print(table)
    unsure = sum(a["needs_review"] for a in answers)
    err_console.print(f"{len(answers)} image(s); {unsure} to review (the prediction set holds several classes)")


def register(app: typer.Typer) -> None:
    for command in (models, export, predict):
        app.command()(command)
