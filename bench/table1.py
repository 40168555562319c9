"""Table 1 of the paper, rerun: methods x ratios x evaluations x seeds at one preset.

    python bench/table1.py --preset cpu --variants inco,inco-nodwv,simclr,inco-paper-literal \
        --ratios 1:32,1:2 --evals finetune,linear --seeds 0 --data ../shared/datasets/neu-cls

Writes ``bench/results/table1-<preset>.md`` (our accuracy beside the paper's) and a JSON file with
every result row; rows are appended to the JSON as they finish, so a stopped run keeps its cells.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from inco_core.config import load_spec
from inco_core.errors import InCoError
from inco_core.experiment import Experiment
from inco_core.progress import EpochLog, NullReporter


class PrintReporter(NullReporter):
    """One line per epoch on stdout, so a long benchmark shows where it is."""

    def epoch_end(self, log: EpochLog) -> None:
        if log.stage == "pretrain" or log.epoch == log.epochs:
            nums = ", ".join(f"{k} {v:.4g}" for k, v in log.metrics.items())
            print(f"  {log.stage} {log.epoch}/{log.epochs}: {nums}", flush=True)


PAPER = {  # Table 1, test accuracy %
    ("SimCLR", "finetune"): [82.50, 83.75, 85.69, 87.92, 93.61],
    ("MoCo v2", "finetune"): [63.75, 73.47, 78.61, 84.17, 91.81],
    ("SimSiam", "finetune"): [69.72, 73.89, 82.92, 91.11, 95.56],
    ("InCo without DWV", "finetune"): [62.92, 68.86, 78.06, 89.58, 93.75],
    ("InCo with DWV", "finetune"): [89.86, 92.63, 93.89, 95.42, 98.06],
    ("SimCLR", "linear"): [65.56, 67.64, 72.78, 84.86, 88.75],
    ("MoCo v2", "linear"): [89.03, 90.64, 91.81, 93.75, 97.78],
    ("SimSiam", "linear"): [75.83, 77.91, 83.47, 90.56, 94.72],
    ("InCo without DWV", "linear"): [60.69, 65.56, 77.08, 87.08, 89.31],
    ("InCo with DWV", "linear"): [87.78, 91.25, 93.75, 94.41, 97.92],
}
PAPER_RATIOS = ["1:32", "1:16", "1:8", "1:4", "1:2"]

# variant name -> (method, optimiser, overrides, label in the table)
VARIANTS = {
    "inco": ("inco", "default", {}, "InCo with DWV"),
    "inco-nodwv": ("inco", "default", {"pretrain.inco.a_f": 0}, "InCo without DWV"),
    "inco-paper-literal": ("inco", "paper-literal", {}, "InCo with DWV, paper-literal Adam lr 0.3"),
    "inco-sum": ("inco", "default", {"pretrain.inco.dwv_reduction": "sum"}, "InCo with DWV (summed square)"),
    "simclr": ("simclr", "default", {}, "SimCLR"),
    "mocov2": ("mocov2", "default", {}, "MoCo v2"),
    "simsiam": ("simsiam", "default", {}, "SimSiam"),
    "supervised": ("supervised", "default", {}, "Supervised"),
}


def paper_value(label: str, mode: str, ratio: str) -> str:
    row = PAPER.get((label, mode))
    return f"{row[PAPER_RATIOS.index(ratio)]:.2f}" if row and ratio in PAPER_RATIOS else "-"


def write_report(
    out_dir: Path,
    preset: str,
    command: str,
    started: datetime,
    wall: float | None,
    seeds: list[int],
    ratios: list[str],
    evals: list[str],
    cells: list[dict],
    notes: list[str],
) -> None:
    wall_text = f"wall time {wall / 60:.1f} min" if wall is not None else "wall time: see the pretraining notes"
    lines = [
        f"# Table 1 at the `{preset}` preset",
        "",
        f"- Command: `{command}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; {wall_text}",
        f"- Machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        f"- Seeds: {', '.join(map(str, seeds))} (split seed 0; accuracy = mean over seeds, +- std when >1)",
        "",
        "Test accuracy % on the 720 NEU-CLS test images: **ours** (paper's Table 1 in brackets).",
        "",
        "| method | eval | " + " | ".join(ratios) + " |",
        "|---|---|" + "---|" * len(ratios),
    ]
    for label in dict.fromkeys(c["label"] for c in cells):
        for mode in evals:
            accs = []
            for ratio in ratios:
                vals = [
                    100 * c["accuracy"]
                    for c in cells
                    if c["label"] == label and c["eval"] == mode and c["ratio"] == ratio
                ]
                if not vals:
                    accs.append(None)
                    continue
                mean = statistics.mean(vals)
                std = f" +- {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
                accs.append(f"**{mean:.2f}**{std} ({paper_value(label, mode, ratio)})")
            if any(accs):
                lines.append(f"| {label} | {mode} | " + " | ".join(a or "-" for a in accs) + " |")
    lines += ["", "## Pretraining", "", *notes, ""]
    (out_dir / f"table1-{preset}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--variants", default="inco,inco-nodwv,simclr")
    ap.add_argument("--ratios", default="1:32,1:2")
    ap.add_argument("--evals", default="finetune,linear")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data", default="../shared/datasets/neu-cls")
    ap.add_argument("--work", default="/tmp/inco-bench", help="run folders and caches")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--set", action="append", default=[], help="extra override key=value for every variant")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON of a run")
    args = ap.parse_args()

    ratios, evals = args.ratios.split(","), args.evals.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"table1-{args.preset}.json"
    if args.report_only:
        saved = json.loads(json_path.read_text())
        started = (
            datetime.fromisoformat(saved["started"])
            if "started" in saved
            else datetime.fromtimestamp(json_path.stat().st_mtime, UTC)
        )
        write_report(
            out_dir,
            args.preset,
            saved["command"],
            started,
            saved.get("wall_s"),
            seeds,
            ratios,
            evals,
            saved["cells"],
            saved["notes"],
        )
        return 0
    command = " ".join(["python", *sys.argv])
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    cells: list[dict] = []
    notes: list[str] = []
    for name in args.variants.split(","):
        method, optimiser, overrides, label = VARIANTS[name]
        evals_here = ["finetune"] if method == "supervised" else evals
        spec = load_spec(
            {
                "method": method,
                "data": {"path": args.data},
                "ratios": ratios,
                "evals": evals_here,
                "preset": args.preset,
                "optimizer": optimiser,
                "overrides": {**overrides, **extra},
                "seeds": seeds,
            }
        )
        v0 = time.perf_counter()
        try:
            result = Experiment(
                spec,
                run_dir=Path(args.work) / "runs" / f"{args.preset}-{name}",
                cache_dir=Path(args.work) / "cache",
                reporter=PrintReporter(),
            ).run()
        except InCoError as exc:
            notes.append(f"- **{label}**: {exc}")
            print(f"{name}: {exc}", flush=True)
            continue
        for p in result["pretraining"]:
            last = p["history"][-1]["metrics"] if p["history"] else {}
            notes.append(
                f"- **{label}** seed {p['seed']}: pretraining {p['wall_time_s'] / 60:.1f} min on {p['images']} images, "
                + ", ".join(f"{k} {v:.4g}" for k, v in last.items())
                + " at the last epoch"
            )
        for row in result["results"]:
            cells.append({**row, "label": label, "variant_key": name})
        print(f"{name}: done in {(time.perf_counter() - v0) / 60:.1f} min", flush=True)
        saved = {"command": command, "started": started.isoformat(), "wall_s": time.perf_counter() - t0}
        json_path.write_text(json.dumps({**saved, "cells": cells, "notes": notes}, indent=1))

    write_report(out_dir, args.preset, command, started, time.perf_counter() - t0, seeds, ratios, evals, cells, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
