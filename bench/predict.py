"""Predict benchmark: a 200 px model served by ``inco serve`` on loopback, as a line station calls it.

It makes, in a temporary INCO_HOME (SQLite store): team ``line`` with a token of scopes read and
predict, and a model at the ``paper`` preset's input size (200 px; ResNet18 with a 6-class head) as a
classifier file registered the way a worker registers one. The weights are a seeded random
initialisation: they do not change the computation, so they do not change the timings. Then, with
the API on a free port:

1. **latency**: ``--single`` requests (300), one after another, each one real NEU-CLS image (200 x 200)
   through ``POST /v1/models/{id}/predict``; p50 / p99 from the client's side (HTTP, decoding,
   onnxruntime, conformal set, JSON). Targets on 2 cores: p50 < 30 ms, p99 < 100 ms.
2. **throughput**: ``--rounds`` requests (10) of a ``--batch`` (64) images through the API, against
   ``session.run`` of a bare onnxruntime session (the same exported file, the same threads) on the
   same images, decoded beforehand; both in images/s, and their ratio (target >= 0.8).
3. **reads beside predict traffic**: for ``--duration-s`` (20 s) one client sends batches of 16
   images back to back while another reads ``GET /v1/models`` and ``GET /v1/models/{id}`` at 20 per
   second; the reads' p50 / p99 and errors (target: p99 < 200 ms, 0 errors), and how many predict
   requests were answered 429 (busy slots; counted apart).

    .venv/bin/python bench/predict.py

Writes ``bench/results/predict-cpu.{md,json}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inco_core.classifier import build_predictor, save_classifier  # noqa: E402
from inco_core.data import decode_bytes  # noqa: E402
from server.store import access  # noqa: E402
from server.store.db import make_engine, migrate, session_scope  # noqa: E402
from server.store.models import Artifact, JobCreate, Model  # noqa: E402
from worker.main import free_port  # noqa: E402
from worker.training import classifier_info, normalisation  # noqa: E402

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
SIZE = 200


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def make_store(home: Path) -> tuple[str, int]:
    """A SQLite store with team ``line`` (token: read + predict) and one registered 200 px model."""
    import torch

    torch.manual_seed(0)
    path = save_classifier(
        home / "artifacts" / "bench-model.pt",
        build_predictor(len(CLASSES)),
        eval_mode="finetune",
        method="inco",
        seed=0,
        ratio="1:16",
        classes=CLASSES,
        image_size=SIZE,
        conformal_scores=torch.rand(1000, generator=torch.Generator().manual_seed(1)),
        meta={"accuracy": 0.0, "note": "random weights: a timing model"},
    )
    engine = make_engine(f"sqlite:///{home / 'inco.db'}")
    migrate(engine)
    info = classifier_info(path)
    with session_scope(engine) as s:
        team = access.ensure_team(s, name="line")
        token = access.create_token(s, team=team, scopes=["read", "predict"])
        body = JobCreate.model_validate({"spec": {"preset": "paper", "ratios": ["1:16"]}})
        job = access.create_job(s, team_id=team.id, request=body, spec=body.spec.model_dump(mode="json"))
        artifact = access.add_artifact(
            s,
            artifact=Artifact(
                team_id=team.id,
                job_id=job.id,
                kind="classifier",
                key="bench",
                method="inco",
                seed=0,
                path=str(path),
                size_bytes=path.stat().st_size,
            ),
        )
        model = access.add_model(
            s,
            model=Model(
                team_id=team.id,
                job_id=job.id,
                artifact_id=artifact.id,
                dataset="default",
                preset="paper",
                method="inco",
                variant="InCo with DWV",
                ratio="1:16",
                eval="finetune",
                seed=0,
                classes=CLASSES,
                image_size=SIZE,
                normalisation=normalisation(info),
                accuracy=0.0,
                per_class_recall={c: 0.0 for c in CLASSES},
                calibration_images=1000,
                code_version="bench",
            ),
        )
        model_id = model.id
    engine.dispose()
    return token, model_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "neu-cls")
    parser.add_argument("--single", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict-cpu")
    args = parser.parse_args()

    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".bmp", ".png"))[::7]
    if len(files) < args.batch:
        sys.exit(f"need at least {args.batch} images under {args.data}")
    blobs = [(f.name, f.read_bytes()) for f in files]
    with tempfile.TemporaryDirectory(prefix="inco-predict-bench-") as tmp:
        home = Path(tmp)
        token, model_id = make_store(home)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("INCO_")}
        env.update(INCO_HOME=str(home), INCO_LOG_FORMAT="text")
        log = (home / "api.log").open("wb")
        api = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        headers = {"Authorization": f"Bearer {token}"}
        try:
            client = httpx.Client(base_url=url, headers=headers, timeout=120)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("the API did not start: " + (home / "api.log").read_text()[-2000:])
                time.sleep(0.2)
            predict_url = f"/v1/models/{model_id}/predict"

            def send(images: list[tuple[str, bytes]]) -> httpx.Response:
                return client.post(predict_url, files=[("files", (n, b, "image/jpeg")) for n, b in images])

            t0 = time.perf_counter()
            first = send(blobs[:1])
            assert first.status_code == 200, first.text
            cold_s = time.perf_counter() - t0  # export + check + session load
            for _ in range(10):
                send(blobs[:1])

            # 1. latency of one image
            single = []
            for i in range(args.single):
                t = time.perf_counter()
                r = send([blobs[i % len(blobs)]])
                single.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text

            # 2. throughput: API vs bare onnxruntime on the same batch
            import onnxruntime as ort

            batch = blobs[: args.batch]
            api_times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                r = send(batch)
                api_times.append(time.perf_counter() - t)
                assert r.status_code == 200 and len(r.json()["images"]) == args.batch, r.text
            onnx_bytes = client.get(f"/v1/models/{model_id}/file", params={"format": "onnx"}).content
        except BaseException:
            api.terminate()
            raise
        onnx_path = home / "downloaded.onnx"  # the file the API serves, in a session of our own
        onnx_path.write_bytes(onnx_bytes)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        pixels = np.stack([decode_bytes(b, n, SIZE) for n, b in batch])[:, None].astype(np.float32)
        session.run(None, {"image": pixels})
        bare_times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            session.run(None, {"image": pixels})
            bare_times.append(time.perf_counter() - t)
        del session

        # 3. reads beside predict traffic
        stop = threading.Event()
        busy = {"ok": 0, "429": 0, "other": 0}

        def predict_traffic() -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
                k = 0
                while not stop.is_set():
                    chunk = [blobs[(k + j) % len(blobs)] for j in range(16)]
                    k += 16
                    r = c.post(predict_url, files=[("files", (n, b, "image/jpeg")) for n, b in chunk])
                    busy["ok" if r.status_code == 200 else "429" if r.status_code == 429 else "other"] += 1

        reads: list[float] = []
        errors = 0
        traffic = threading.Thread(target=predict_traffic, daemon=True)
        traffic.start()
        time.sleep(1)
        with httpx.Client(base_url=url, headers=headers, timeout=30) as reader:
            end = time.monotonic() + args.duration_s
            i = 0
            while time.monotonic() < end:
                path = "/v1/models" if i % 2 == 0 else f"/v1/models/{model_id}"
                t = time.perf_counter()
                try:
                    ok = reader.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                reads.append((time.perf_counter() - t) * 1000)
                errors += not ok
                i += 1
                time.sleep(max(0.0, 0.05 - (time.perf_counter() - t)))
        stop.set()
        traffic.join(120)
        api.terminate()
        api.wait(30)
        log.close()

    api_ips = args.batch / statistics.median(api_times)
    bare_ips = args.batch / statistics.median(bare_times)
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
        "command": "python bench/predict.py " + " ".join(sys.argv[1:]),
        "model": f"ResNet18, {SIZE} px, 6 classes (random weights), ONNX on onnxruntime {ort.__version__}",
        "cold_first_request_s": cold_s,
        "single": {"n": len(single), "p50_ms": pct(single, 50), "p99_ms": pct(single, 99), "max_ms": max(single)},
        "throughput": {
            "batch": args.batch,
            "rounds": args.rounds,
            "api_img_per_s": api_ips,
            "bare_onnxruntime_img_per_s": bare_ips,
            "ratio": api_ips / bare_ips,
        },
        "reads_beside_predict": {
            "n": len(reads),
            "p50_ms": pct(reads, 50),
            "p99_ms": pct(reads, 99),
            "max_ms": max(reads),
            "errors": errors,
            "predict_requests": busy,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    s, t, b = r["single"], r["throughput"], r["reads_beside_predict"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return f"""# Predict through the API

`{r["command"]}`, {r["when"]}, on {r["machine"]}. Model: {r["model"]}; the weights do not change
the computation. The first request (export to ONNX, its check against the PyTorch model, the session
load) took {r["cold_first_request_s"]:.1f} s; everything below is after it.

| what | measured | target |
|---|---|---|
| one 200 px image through `POST /v1/models/{{id}}/predict`, p50 | {s["p50_ms"]:.1f} ms | < 30 ms: {verdict(s["p50_ms"] < 30)} |
| the same, p99 ({s["n"]} requests) | {s["p99_ms"]:.1f} ms | < 100 ms: {verdict(s["p99_ms"] < 100)} |
| a batch of {t["batch"]} through the API | {t["api_img_per_s"]:.1f} img/s | |
| the same batch, bare onnxruntime `session.run` | {t["bare_onnxruntime_img_per_s"]:.1f} img/s | |
| API / bare | {t["ratio"]:.2f} | >= 0.8: {verdict(t["ratio"] >= 0.8)} |
| model reads beside predict traffic, p50 / p99 ({b["n"]} reads) | {b["p50_ms"]:.1f} / {b["p99_ms"]:.1f} ms | p99 < 200 ms: {verdict(b["p99_ms"] < 200)} |
| read errors | {b["errors"]} | 0 |
| predict requests meanwhile: answered / 429 / other | {b["predict_requests"]["ok"]} / {b["predict_requests"]["429"]} / {b["predict_requests"]["other"]} | |

The API's time per batch includes HTTP, multipart parsing, decoding each JPEG as training does and
the conformal sets; the bare session gets the decoded pixels. Throughput is the median of the rounds.
"""


if __name__ == "__main__":
    main()
