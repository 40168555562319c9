"""What ASHA saves: the same search run twice, once with ASHA stopping weak trials early and once
with every trial run to the end, compared on trial-epochs (pretraining epochs summed over trials),
wall time and the best validation score.

Both runs draw the same points: Optuna's TPE samples at random (seeded) for its first 10 trials, so
with ``--trials`` up to 10 the two searches try identical settings in the same order, and the only
difference is which trials ASHA cut short. "Every trial to the end" is ASHA with its grace period at
the last epoch (it can then stop nothing).

The searches run through the worker's own code (``worker.tuning.search``: Ray Tune, Ray Train
trials, the SQL store for trials) on a local Ray head, SQLite and Redis db 9:

    .venv/bin/python bench/tune.py                     # cpu preset, 8 trials of 8 epochs, 256 images
    .venv/bin/python bench/tune.py --trials 6 --epochs 6

Writes ``bench/results/tune-cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "neu-cls"))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--ratio", default="1:16")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-images", type=int, default=256)
    parser.add_argument("--grace", type=int, default=2, help="ASHA's grace period in epochs")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tune-cpu.md"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    args = parser.parse_args()
    if args.report_only:
        out = Path(args.out)
        out.write_text(report(json.loads(out.with_suffix(".json").read_text())))
        print(out.read_text())
        return

    home = Path(tempfile.mkdtemp(prefix="inco-bench-tune-"))
    from worker.main import ray_env, start_local_ray, stop_local_ray

    proc, address = start_local_ray(home)
    os.environ.update(ray_env(home))
    os.environ["RAY_ADDRESS"] = address
    import ray

    from inco_core.config import RunSpec
    from inco_core.search import TuneSettings
    from server.store import access
    from server.store.db import make_engine, migrate, session_scope
    from server.store.models import JobCreate, JobKind
    from worker.tuning import search

    db_url = f"sqlite:///{home / 'inco.db'}"
    os.environ.update({"INCO_DATABASE_URL": db_url, "INCO_REDIS_URL": args.redis})
    from server.settings import Settings
    from worker.jobs import ray_runtime_env

    ray.init(address=address, logging_level="WARNING", log_to_driver=False, runtime_env=ray_runtime_env(Settings()))
    engine = make_engine(db_url)
    migrate(engine)
    spec = RunSpec.model_validate(
        {
            "data": {"path": args.data},
            "ratios": [args.ratio],
            "preset": args.preset,
            "overrides": {"pretrain.epochs": args.epochs, "pretrain.max_images": args.max_images},
            "resources": {"device": "cpu"},
        }
    )
    runs = {}
    try:
        for name, grace in (("ASHA", args.grace), ("every trial to the end", args.epochs)):
            settings = TuneSettings(trials=args.trials, max_concurrent=args.concurrent, grace_epochs=grace)
            api_spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": None})})
            with session_scope(engine) as s:
                team = access.ensure_team(s, name="bench")
                request = JobCreate(kind=JobKind.tune, spec=api_spec, tune=settings)
                job = access.create_job(s, team_id=team.id, request=request, spec=spec.model_dump(mode="json"))
                job_id = job.id
            config = {
                "job_id": job_id,
                "team_id": team.id,
                "kind": "tune",
                "spec": spec.model_dump(mode="json"),
                "dataset": "neu-cls",
                "pretrained": {},
                "run_dir": str(home / "runs" / job_id),
                "cache_dir": str(home / "cache"),
                "backbone_dir": str(home / "backbones"),
            }
            t0 = time.perf_counter()
            best = search(config, spec, settings, storage_path=home / "ray", cpus_per_worker=1)
            wall = time.perf_counter() - t0
            with session_scope(engine) as s:
                trials = [
                    {"number": t.number, "status": t.status, "score": t.score, "epoch": t.epoch, "params": t.params}
                    for t in access.list_trials(s, job_id=job_id)
                ]
            runs[name] = {
                "grace_epochs": grace,
                "wall_s": wall,
                "trial_epochs": sum(t["epoch"] for t in trials),
                "best": best,
                "trials": sorted(trials, key=lambda t: t["number"]),
            }
            print(f"{name}: {runs[name]['trial_epochs']} trial-epochs, {wall:.0f} s, best {best['score']:.4f}")
    finally:
        ray.shutdown()
        stop_local_ray(proc)
        engine.dispose()

    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), no GPU",
        "command": "bench/tune.py " + " ".join(sys.argv[1:]),
        "settings": vars(args),
        "runs": runs,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    out.write_text(report(record))
    print(out.read_text())


def report(record: dict) -> str:
    a = record["settings"]
    asha, full = record["runs"]["ASHA"], record["runs"]["every trial to the end"]
    lines = [
        "# Tune: ASHA against running every trial to the end",
        "",
        f"Measured {record['when']} on {record['machine']} with `{record['command']}`.",
        f"Search: {a['trials']} trials of InCo at the `{a['preset']}` preset (64 px), ratio {a['ratio']}, "
        f"{a['epochs']} pretraining epochs on {a['max_images']} training images, {a['concurrent']} trials at once, "
        "one Ray Train worker (1 CPU) per trial; score = linear-evaluation accuracy on the validation half of the "
        "labelled training images, every epoch. ASHA: grace period "
        f"{a['grace']} epochs, reduction factor 2. Both searches try the same points (Optuna's seeded random start).",
        "",
        "| search | trial-epochs | wall time | best trial | best validation accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, run in record["runs"].items():
        lines.append(
            f"| {name} | {run['trial_epochs']} | {run['wall_s']:.0f} s | {run['best']['trial']} | "
            f"{100 * run['best']['score']:.2f} % |"
        )
    saved = 1 - asha["trial_epochs"] / full["trial_epochs"]
    same = asha["best"]["trial"] == full["best"]["trial"]
    lines += [
        "",
        f"ASHA used {asha['trial_epochs']} of {full['trial_epochs']} trial-epochs ({100 * saved:.0f} % fewer); "
        + (
            "it kept the same best trial, with the same score."
            if same and abs(asha["best"]["score"] - full["best"]["score"]) < 1e-9
            else f"its best trial is {asha['best']['trial']} (full search: {full['best']['trial']})."
        ),
        *missed(asha, full),
        f"The validation set holds {record.get('val_images', 36)} images, so one image is "
        f"{100 / record.get('val_images', 36):.2f} points of accuracy.",
        "Wall time includes about a minute per trial of Ray start-up on 2 cores (Train controller, worker, imports).",
        *([record["note"]] if record.get("note") else []),
        "",
        "Per trial (epochs run, validation accuracy at the last scored epoch):",
        "",
        "| trial | ASHA | every trial to the end | t1 | t2 | a_f | K | lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ta, tf in zip(asha["trials"], full["trials"], strict=False):
        p = tf["params"]
        lines.append(
            f"| {tf['number']} | {ta['status']} at {ta['epoch']}: {100 * (ta['score'] or 0):.2f} % | "
            f"{tf['status']} at {tf['epoch']}: {100 * (tf['score'] or 0):.2f} % | "
            f"{p.get('pretrain.inco.t1', '-')} | {p.get('pretrain.inco.t2', '-')} | "
            f"{p.get('pretrain.inco.a_f', 0):.3g} | {p.get('pretrain.inco.views', '-')} | "
            f"{p.get('pretrain.optim.lr', 0):.3g} |"
        )
    return "\n".join(lines) + "\n"


def missed(asha: dict, full: dict) -> list[str]:
    """Trials ASHA stopped that, run to the end, matched or beat the full search's best."""
    best = full["best"]["score"]
    stopped = {t["number"]: t for t in asha["trials"] if t["status"] == "stopped"}
    lines = []
    for t in full["trials"]:
        if t["number"] in stopped and t["score"] is not None and t["score"] >= best - 1e-9:
            at = stopped[t["number"]]
            lines.append(
                f"Trial {t['number']}, which ASHA stopped at epoch {at['epoch']} ({100 * (at['score'] or 0):.2f} %), "
                f"{'ties' if t['score'] < best + 1e-9 else 'beats'} the best when run to the end "
                f"({100 * t['score']:.2f} %): ASHA trades such late starters for the epochs it saves."
            )
    return lines


if __name__ == "__main__":
    main()
