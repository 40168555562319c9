"""The pictures (server/plots.py) draw the numbers they are given, render() writes valid, repeatable PNG and
SVG, and the plot routes answer like the JSON routes of the same data: images for the team, 404 for
another team's job, 401 without a token, clear 404s when there is nothing to draw yet, 422 for a bad format.
The embedding route maps a real (untrained) backbone on the real NEU-CLS test images, once: the second
request reads its cache."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from inco_core.errors import ConfigError, DataError
from server import plots
from server.errors import NotFound
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Artifact, Job, JobKind, JobStatus, Metric
from tests.service_fixtures import REDIS_TEST, auth, make_team

CLASSES = ["crazing", "inclusion", "patches"]


def board_row(variant: str, ratio: str, mean: float, std: float, count: int = 3, ev: str = "finetune") -> dict:
    method = {"SimCLR": "simclr"}.get(variant, "inco")
    seeds = list(range(count))
    return dict(
        dataset="neu",
        preset="smoke",
        setup="",
        method=method,
        variant=variant,
        ratio=ratio,
        eval=ev,
        mean=mean,
        std=std,
        count=count,
        seeds=seeds,
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def band_edges(fig: Figure, label: str) -> dict[float, tuple[float, float]]:
    """The band of a Figure 4 line: x -> (lowest, highest) y of its outline."""
    (band,) = [c for c in fig.axes[0].collections if c.get_label() == f"_band {label}"]
    edges: dict[float, list[float]] = {}
    for x, y in band.get_paths()[0].vertices:
        edges.setdefault(round(float(x), 6), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in edges.items()}


# -- the figures -------------------------------------------------------------------------------------
def test_figure4_draws_the_means_and_a_band_of_one_std_at_ratios_fewest_labels_first() -> None:
    rows = [
        board_row("InCo with DWV", "1:2", 0.98, 0.01),
        board_row("InCo with DWV", "1:32", 0.80, 0.03),
        board_row("InCo with DWV", "1:8", 0.90, 0.02),
        board_row("SimCLR", "1:8", 0.85, 0.0, count=1),
        board_row("SimCLR", "1:2", 0.95, 0.0, count=1),
    ]
    fig = plots.figure4(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1:32", "1:8", "1:2"]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"InCo with DWV (n=3)", "SimCLR (n=1)"}
    inco, simclr = lines["InCo with DWV (n=3)"], lines["SimCLR (n=1)"]
    assert list(inco.get_xdata()) == [0, 1, 2] and list(inco.get_ydata()) == pytest.approx([80, 90, 98])
    assert list(simclr.get_xdata()) == [1, 2] and list(simclr.get_ydata()) == pytest.approx([85, 95])
    assert band_edges(fig, "InCo with DWV (n=3)") == {
        0.0: pytest.approx((77, 83)),
        1.0: pytest.approx((88, 92)),
        2.0: pytest.approx((97, 99)),
    }
    assert band_edges(fig, "SimCLR (n=1)") == {1.0: pytest.approx((85, 85)), 2.0: pytest.approx((95, 95))}
    assert ax.get_ylabel() == "test accuracy (%)" and "labelled ratio" in ax.get_xlabel()
    assert "dataset: neu · preset: smoke" in ax.get_title() and "eval: finetune" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["InCo with DWV (n=3)", "SimCLR (n=1)"]


def test_figure4_names_the_evaluation_of_each_line_when_several_are_shown() -> None:
    rows = [board_row("InCo with DWV", "1:16", 0.9, 0.01), board_row("InCo with DWV", "1:16", 0.8, 0.02, ev="linear")]
    fig = plots.figure4(rows)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert set(lines) == {"InCo with DWV · finetune (n=3)", "InCo with DWV · linear (n=3)"}
    assert list(lines["InCo with DWV · linear (n=3)"].get_ydata()) == pytest.approx([80])
    assert lines["InCo with DWV · linear (n=3)"].get_linestyle() == "--"
    # one ratio: the band is drawn a little wide around the point, from mean - std to mean + std
    edges = band_edges(fig, "InCo with DWV · linear (n=3)")
    assert sorted(edges) == pytest.approx([-0.12, 0.12]) and list(edges.values()) == [pytest.approx((78, 82))] * 2
    assert "eval" not in fig.axes[0].get_title()


def test_curves_draw_each_stage_s_values_per_epoch_in_a_panel_per_key() -> None:
    metrics = [
        {"stage": "pretrain", "epoch": 2, "epochs": 2, "values": {"loss": 2.0, "bid": 1.5, "dwv_weight": 1.0}},
        {"stage": "pretrain", "epoch": 1, "epochs": 2, "values": {"loss": 3.0, "bid": 2.5, "dwv_weight": 0.5}},
        {"stage": "finetune 1:16", "epoch": 1, "epochs": 3, "values": {"loss": 0.9}},
        {"stage": "finetune 1:16", "epoch": 2, "epochs": 3, "values": {"loss": 0.5, "custom": 7.0}},
    ]
    fig = plots.training_curves(metrics, title="job x")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["loss", "BID loss (instance discrimination)", "DWV weight w(t)", "custom"]
    loss = {line.get_label(): line for line in panels["loss"].lines}
    assert list(loss["pretrain"].get_xdata()) == [1, 2] and list(loss["pretrain"].get_ydata()) == [3.0, 2.0]
    assert list(loss["finetune 1:16"].get_xdata()) == [1, 2] and list(loss["finetune 1:16"].get_ydata()) == [0.9, 0.5]
    (bid,) = panels["BID loss (instance discrimination)"].lines
    assert bid.get_label() == "pretrain" and list(bid.get_ydata()) == [2.5, 1.5]
    (custom,) = panels["custom"].lines
    assert list(custom.get_xdata()) == [2] and list(custom.get_ydata()) == [7.0]
    lo, hi = panels["custom"].get_xlim()  # one epoch: whole epochs on the axis, not 1.95 ... 2.05
    assert [t for t in panels["custom"].get_xticks() if lo <= t <= hi] == [2]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pretrain", "finetune 1:16"]
    assert fig.get_suptitle() == "job x"


def test_confusion_writes_the_counts_and_the_recall_of_each_class() -> None:
    matrix = [[50, 2, 0], [5, 40, 5], [0, 0, 48]]
    row = {
        "classes": CLASSES,
        "confusion_matrix": matrix,
        "accuracy": 138 / 150,
        "variant": "InCo with DWV",
        "ratio": "1:16",
        "eval": "finetune",
        "seed": 2,
        "per_class_recall": {"crazing": 50 / 52, "inclusion": 0.8, "patches": 1.0},
    }
    fig = plots.confusion(row)
    ax = fig.axes[0]
    assert np.array_equal(ax.images[0].get_array(), np.array(matrix))
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(i, j): str(matrix[i][j]) for i in range(3) for j in range(3)}
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "crazing  (recall 96.2%)",
        "inclusion  (recall 80.0%)",
        "patches  (recall 100.0%)",
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert "InCo with DWV · 1:16 · finetune · seed 2" in ax.get_title()
    assert "test accuracy 92.0% on 150 test images" in ax.get_title()
    with pytest.raises(DataError, match="2x2 but it names 3 classes"):
        plots.confusion({**row, "confusion_matrix": [[1, 0], [0, 1]]})


def test_embedding_map_has_a_point_per_image_in_its_class_colour() -> None:
    labels = [0, 2, 2, 1, 0, 2]
    points = [[float(i), float(-i)] for i in range(6)]
    fig = plots.embedding_map({"points": points, "labels": labels, "classes": CLASSES, "title": "map"})
    ax = fig.axes[0]
    palette = plots.colours(3)
    assert len(ax.collections) == 3
    for c, scatter in enumerate(ax.collections):
        mine = [p for p, label in zip(points, labels, strict=True) if label == c]
        assert scatter.get_offsets().tolist() == mine
        assert scatter.get_label() == f"{CLASSES[c]} ({len(mine)})"
        assert tuple(scatter.get_facecolor()[0][:3]) == pytest.approx(palette[c][:3])
    assert sum(len(s.get_offsets()) for s in ax.collections) == len(labels)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["crazing (2)", "inclusion (1)", "patches (3)"]


def test_trials_draw_each_scored_trial_and_mark_the_failed_ones() -> None:
    rows = [
        {
            "number": 2,
            "params": {"pretrain.optim.lr": 0.1, "pretrain.inco.views": 3},
            "status": "completed",
            "score": 0.75,
        },
        {
            "number": 1,
            "params": {"pretrain.optim.lr": 0.01, "pretrain.inco.views": 2},
            "status": "stopped",
            "score": 0.5,
        },
        {
            "number": 3,
            "params": {"pretrain.optim.lr": 1.0, "pretrain.inco.views": 4},
            "status": "failed",
            "score": None,
        },
    ]
    fig = plots.trials(rows, title="tune")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [
        "validation accuracy per trial",
        "views (pretrain.inco.views)",
        "lr (pretrain.optim.lr)",
    ]
    scored, failed = visible[0].collections
    assert scored.get_offsets().tolist() == [[1, 50], [2, 75]]
    assert failed.get_offsets()[:, 0].tolist() == [3]  # at the bottom of the panel
    assert tuple(scored.get_facecolors()[1]) == to_rgba(plots.STATUS_COLOURS["completed"])
    (views,) = visible[1].collections
    assert views.get_offsets().tolist() == [[2, 50], [3, 75]]
    (lr,) = visible[2].collections
    assert lr.get_offsets().tolist() == [[0.01, 50], [0.1, 75]]
    assert visible[2].get_xscale() == "log"  # a learning rate spanning 10x or more
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["completed", "stopped", "no score (failed or not scored)"]


def test_nothing_to_draw_is_a_clear_not_found() -> None:
    for draw, message in (
        (plots.figure4, "no results to draw"),
        (plots.training_curves, "plots appear once a job's first epoch ends"),
        (plots.trials, "no trials to draw"),
    ):
        with pytest.raises(NotFound, match=message):
            draw([])


def test_render_writes_valid_png_and_svg_the_same_bytes_each_time() -> None:
    rows = [board_row("InCo with DWV", "1:16", 0.9, 0.01), board_row("InCo with DWV", "1:2", 0.95, 0.01)]
    png = plots.render(plots.figure4(rows), "png")
    assert png_size(png) == (900, 600)
    assert plots.render(plots.figure4(rows), "png") == png
    svg = plots.render(plots.figure4(rows), "svg")
    assert svg.startswith(b"<?xml") and b"<svg" in svg and b"</svg>" in svg[-100:]
    assert b"Matplotlib v" not in svg and b"<dc:date>" not in svg
    assert plots.render(plots.figure4(rows), "svg") == svg
    with pytest.raises(ConfigError, match="format must be png or svg"):
        plots.render(plots.figure4(rows), "gif")


# -- the routes ----------------------------------------------------------------------------------------
def _result(acc: float, ratio: str, seed: int, ev: str = "finetune") -> dict[str, Any]:
    matrix = [[9, 1, 0], [0, 10, 0], [1, 0, 9]]
    return {
        "method": "inco",
        "variant": "InCo with DWV",
        "ratio": ratio,
        "eval": ev,
        "seed": seed,
        "accuracy": acc,
        "per_class_recall": {"crazing": 0.9, "inclusion": 1.0, "patches": 0.9},
        "confusion_matrix": matrix,
        "classes": CLASSES,
        "labelled_images": 10,
        "test_images": 30,
        "wall_time_s": 1.0,
        "pretrain_key": None,
    }


def _job(s: Any, team_id: int, kind: JobKind, spec: dict, status: JobStatus = JobStatus.succeeded) -> Job:
    job = Job(team_id=team_id, kind=kind, spec=spec, status=status)
    s.add(job)
    s.flush()
    return job


@pytest.fixture(scope="module")
def service(neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The API on SQLite with team alpha (a token of every scope, and one of predict only) and team beta.
    Alpha has a finished experiment (seeds 0 and 1; metrics, 4 result rows, an untrained backbone for
    seed 0 as its pretrained backbone), a queued job and a tune job with three trials."""
    import torch

    from inco_core.checkpoint import save_checkpoint
    from inco_core.config import load_spec
    from inco_core.models import Backbone
    from server.api.app import create_app

    home = tmp_path_factory.mktemp("plots-home")
    settings = Settings(
        home=home, database_url=f"sqlite:///{home / 'inco.db'}", redis_url=REDIS_TEST, data_root=neu_path.parent
    )
    spec = load_spec(
        {
            "preset": "smoke",
            "ratios": ["1:16", "1:2"],
            "seeds": [0, 1],
            "data": {"path": str(neu_path), "dataset": "default"},
        }
    ).model_dump(mode="json")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        home / "artifacts" / "backbone.pt",
        kind="pretrain",
        method="inco",
        state_dict=Backbone().state_dict(),
        config={},
        data_fingerprint="x",
    )
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine
        tokens = {
            "alpha": make_team(engine, "alpha"),
            "beta": make_team(engine, "beta"),
            "predict": make_team(engine, "alpha", ["predict"]),
        }
        with session_scope(engine) as s:
            team_id = access.ensure_team(s, name="alpha").id
            done = _job(s, team_id, JobKind.experiment, spec)
            for epoch, loss in ((1, 2.0), (2, 1.5)):
                s.add(
                    Metric(
                        job_id=done.id,
                        stage="pretrain",
                        epoch=epoch,
                        epochs=2,
                        values={"loss": loss, "knn": 0.25 * epoch},
                    )
                )
            rows = [_result(0.9, "1:16", 0), _result(0.8, "1:16", 1), _result(0.95, "1:2", 0), _result(0.97, "1:2", 1)]
            result = {
                "results": rows,
                "spec": spec,
                "hardware": "cpu",
                "code_version": "t",
                "data": {"fingerprint": "f"},
            }
            access.add_results(s, job=done, result=result, dataset="default")
            key = "a" * 32
            access.add_artifact(
                s,
                artifact=Artifact(
                    team_id=team_id,
                    job_id=done.id,
                    kind="backbone",
                    key=key,
                    method="inco",
                    seed=0,
                    path=str(checkpoint),
                    size_bytes=1,
                ),
            )
            done.outputs = {"backbones": [{"seed": 0, "key": key, "reused": False}]}
            queued = _job(s, team_id, JobKind.experiment, spec, JobStatus.queued)
            tune = _job(s, team_id, JobKind.tune, spec, JobStatus.running)
            for number, status, score in ((1, "completed", 0.5), (2, "stopped", 0.25), (3, "failed", None)):
                access.save_trial(
                    s,
                    job_id=tune.id,
                    number=number,
                    trial_id=f"t{number}",
                    params={"pretrain.inco.a_f": 0.1 * number},
                    epochs=2,
                    status=status,
                    score=score,
                )
            ids = {"done": done.id, "queued": queued.id, "tune": tune.id}
        yield {"client": client, "tokens": tokens, "settings": settings, "spec": spec, **ids}


def _get(service: dict, path: str, team: str | None = "alpha") -> Any:
    headers = auth(service["tokens"][team]) if team else {}
    return service["client"].get(path.format(**service), headers=headers)


JOB_PLOTS = [
    "/v1/jobs/{done}/plots/curves",
    "/v1/jobs/{done}/plots/confusion",
    "/v1/jobs/{tune}/plots/trials",
]


@pytest.mark.parametrize("path", ["/v1/results/figure4", *JOB_PLOTS])
def test_each_plot_is_a_png_or_svg_for_the_team_only(service: dict, path: str) -> None:
    png = _get(service, path + ".png")
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png" and png.headers["cache-control"] == "no-store"
    width, height = png_size(png.content)
    assert width == 900 and 400 <= height <= 1200
    svg = _get(service, path + ".svg")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert svg.content.startswith(b"<?xml") and b"<svg" in svg.content
    assert _get(service, path + ".png", team=None).status_code == 401
    assert _get(service, path + ".png", team="predict").status_code == 403
    other = _get(service, path + ".png", team="beta")
    assert other.status_code == 404
    if "{" in path:  # a job of another team is not found, as GET /v1/jobs/{id} answers
        job = path.split("/")[3].format(**service)
        assert other.json() == _get(service, f"/v1/jobs/{job}", team="beta").json()
    else:
        assert "no results yet" in other.json()["detail"]
    bad = _get(service, path + ".gif")
    assert bad.status_code == 422 and bad.json()["detail"] == "fmt: must be one of 'png' or 'svg' (got 'gif')", bad.text


def test_figure4_takes_the_filters_of_the_leaderboard(service: dict) -> None:
    assert _get(service, "/v1/results/figure4.png?ratio=1:16&eval=finetune&preset=smoke").status_code == 200
    none = _get(service, "/v1/results/figure4.png?eval=linear&dataset=default")
    assert none.status_code == 404
    assert none.json()["detail"] == (
        "no results with eval linear, dataset default yet: submit a job (inco submit), or loosen the filters"
    )
    assert _get(service, "/v1/results/figure4.png?method=byol").status_code == 422
    assert _get(service, "/v1/results/figure4.png?ratio=16").json()["detail"].startswith("ratio: ")


def test_confusion_picks_a_row_or_names_the_rows_there_are(service: dict) -> None:
    picked = _get(service, "/v1/jobs/{done}/plots/confusion.png?ratio=1:2&eval=finetune&seed=1")
    assert picked.status_code == 200 and picked.content != _get(service, "/v1/jobs/{done}/plots/confusion.png").content
    missing = _get(service, "/v1/jobs/{done}/plots/confusion.png?ratio=1:8")
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        f"job {service['done']} has no result row that matches; it has ratio=1:16&eval=finetune&seed=0, "
        "ratio=1:16&eval=finetune&seed=1, ratio=1:2&eval=finetune&seed=0, ratio=1:2&eval=finetune&seed=1"
    )


def test_a_job_with_nothing_to_draw_yet_is_a_404_that_says_when(service: dict) -> None:
    queued = service["queued"]
    for kind, message in (
        ("curves", f"job {queued} has no metrics yet (queued): plots appear once its first epoch ends"),
        ("confusion", f"job {queued} has no results yet (queued): confusion matrices appear once its evaluation"),
        ("embedding", f"job {queued} (queued) has no backbone for seed 0 yet"),
        ("trials", f"job {queued} is a experiment job; trials belong to tune jobs"),
    ):
        r = _get(service, f"/v1/jobs/{{queued}}/plots/{kind}.png")
        assert r.status_code == 404 and r.json()["detail"].startswith(message), r.text


def test_the_embedding_map_covers_the_job_s_test_split_and_is_computed_once(
    service: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inco_core.config import RunSpec
    from inco_core.experiment import load_split
    from server.embedding import EmbeddingMaps

    app = service["client"].app
    app.state.embedding_maps = maps = EmbeddingMaps(service["settings"].cache_dir)
    maps._slots.acquire()  # another request is computing a map
    busy = _get(service, "/v1/jobs/{done}/plots/embedding.png")
    assert busy.status_code == 429 and busy.headers["retry-after"] == "5", busy.text
    maps._slots.release()

    first = _get(service, "/v1/jobs/{done}/plots/embedding.png?seed=0")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png" and png_size(first.content)[0] == 900
    (cached,) = (service["settings"].cache_dir / "embeddings").glob("*.json")
    data = json.loads(cached.read_text())
    spec = RunSpec.model_validate(service["spec"])
    ds, split = load_split(spec, spec.resolve(), service["settings"].cache_dir)  # the images the job tested on
    assert len(data["points"]) == len(split.test) == 720 and data["images"] == 720
    assert data["labels"] == ds.labels[split.test].tolist() and data["classes"] == ds.classes
    assert np.isfinite(np.array(data["points"])).all() and np.ptp(np.array(data["points"]), axis=0).min() > 1

    def no_second_computation(*args: Any) -> None:
        raise AssertionError("the map was computed again")

    monkeypatch.setattr(EmbeddingMaps, "_compute", no_second_computation)
    again = _get(service, "/v1/jobs/{done}/plots/embedding.svg")  # seed 0, the job's first: from the cache
    assert again.status_code == 200 and again.headers["content-type"] == "image/svg+xml", again.text
    assert _get(service, "/v1/jobs/{done}/plots/embedding.png").content == first.content
    no_backbone = _get(service, "/v1/jobs/{done}/plots/embedding.png?seed=1")
    assert no_backbone.status_code == 404 and "no backbone for seed 1 yet" in no_backbone.json()["detail"]
    no_seed = _get(service, "/v1/jobs/{done}/plots/embedding.png?seed=7")
    assert no_seed.status_code == 404 and "has no seed 7: its seeds are 0, 1" in no_seed.json()["detail"]
    assert _get(service, "/v1/jobs/{done}/plots/embedding.png", team="beta").status_code == 404


def test_the_backbone_of_a_supervised_job_is_its_fine_tuned_classifier_s(service: dict, tmp_path: Path) -> None:
    """No pretrained backbone: the map uses the backbone inside a classifier file of the job, the
    fine-tuned one with the most labels, and says so."""
    import torch
    from torch import nn

    from inco_core.classifier import Predictor, save_classifier
    from inco_core.models import Backbone
    from server.embedding import _load_backbone, find_source

    model = Predictor(Backbone(), nn.Linear(512, 3))
    files = {}
    for ratio, ev in (("1:16", "finetune"), ("1:2", "finetune"), ("1:2", "linear")):
        files[ratio, ev] = save_classifier(
            tmp_path / f"{ratio[2:]}-{ev}.pt",
            model,
            eval_mode=ev,
            method="supervised",
            seed=0,
            ratio=ratio,
            classes=CLASSES,
            image_size=32,
        )
    engine = service["client"].app.state.engine
    with session_scope(engine) as s:
        team_id = access.ensure_team(s, name="alpha").id
        job = _job(s, team_id, JobKind.finetune, {**service["spec"], "method": "supervised", "seeds": [0]})
        for (ratio, ev), path in files.items():
            access.add_artifact(
                s,
                artifact=Artifact(
                    team_id=team_id,
                    job_id=job.id,
                    kind="classifier",
                    key=f"{job.id}:{ratio}:{ev}:0",
                    method="supervised",
                    seed=0,
                    path=str(path),
                    size_bytes=1,
                    meta={"ratio": ratio, "eval": ev},
                ),
            )
        s.flush()
        source = find_source(s, job, 0)
        assert source.kind == "classifier" and source.path == files["1:2", "finetune"]
        assert source.description == "backbone of the classifier trained at 1:2, finetune"
        backbone = _load_backbone(source)
        assert not backbone.training
        assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.state_dict().items())
        files["1:2", "finetune"].unlink()
        assert find_source(s, job, 0).path == files["1:16", "finetune"]
