"""Conformal prediction sets on the NEU-CLS test images: do they cover the true class at the level,
and how many images go to a person?

Runs one experiment in-process (InCo, fine-tuned, 1:32 and 1:2, ``--preset`` cpu with
``--pretrain-epochs`` (10) so that it fits a CPU session; the pretraining is shared by both ratios),
then for each classifier and level (0.8, 0.9, 0.95) measures on the 720 test images, which no model
or calibration saw: coverage (the share of images whose set holds the true class), the mean set
size, the share sent to review (the set holds more than one class), and the accuracy on the images
not sent. Coverage must reach the level within sampling error: the coverage of split conformal
sets varies with both draws, the n calibration images (a Beta spread, variance about
a(1 - a)/(n + 2)) and the 720 test images (a(1 - a)/720); the report's standard error combines both.

    .venv/bin/python bench/conformal.py

Writes ``bench/results/conformal-cpu.{md,json}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inco_core.classifier import conformal_threshold, load_classifier, prediction_sets, probabilities  # noqa: E402
from inco_core.config import load_spec  # noqa: E402
from inco_core.data import load_images  # noqa: E402
from inco_core.experiment import Experiment  # noqa: E402
from inco_core.splits import stratified_split  # noqa: E402

LEVELS = (0.8, 0.9, 0.95)


def std_error(level: float, calibration: int, test: int) -> float:
    """Standard error of the measured coverage: calibration draw plus test draw."""
    return math.sqrt(level * (1 - level) * (1 / (calibration + 2) + 1 / test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "neu-cls")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "conformal-cpu")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(f"{args.out}.json").read_text())
        for x in report["rows"]:
            x["std_error"] = std_error(x["level"], x["calibration_images"], 720)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown(report))
        print(markdown(report))
        return
    spec = load_spec(
        {
            "data": {"path": str(args.data)},
            "preset": args.preset,
            "method": "inco",
            "ratios": ["1:32", "1:2"],
            "evals": ["finetune"],
            "resources": {"device": "auto"},
            "overrides": {"pretrain.epochs": args.pretrain_epochs},
        }
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inco-conformal-") as tmp:
        result = Experiment(spec, run_dir=Path(tmp) / "run", cache_dir=Path(tmp) / "cache").run()
        size = spec.resolve().image_size
        ds = load_images(args.data, size, cache_dir=Path(tmp) / "cache" / "images")
        split = stratified_split(
            ds.labels, ds.file_hashes, ds.classes, train_fraction=spec.data.train_fraction, seed=spec.data.split_seed
        )
        images, labels = ds.images[split.test], ds.labels[split.test]
        rows = []
        for row in result["results"]:
            model, info = load_classifier(Path(row["checkpoint"]))
            probs = probabilities(model, images)
            scores = info["conformal"]["scores"]
            for level in LEVELS:
                sets = prediction_sets(probs, conformal_threshold(scores, level))
                covered = [int(y) in s for s, y in zip(sets, labels.tolist(), strict=True)]
                review = [len(s) > 1 for s in sets]
                kept = [i for i, r in enumerate(review) if not r]
                right = (probs.argmax(1) == labels).tolist()
                rows.append(
                    {
                        "ratio": row["ratio"],
                        "accuracy": row["accuracy"],
                        "calibration_images": int(info["conformal"]["images"]),
                        "level": level,
                        "coverage": sum(covered) / len(covered),
                        "std_error": std_error(level, int(info["conformal"]["images"]), len(covered)),
                        "mean_set_size": sum(map(len, sets)) / len(sets),
                        "to_review": sum(review) / len(review),
                        "accuracy_not_reviewed": (sum(right[i] for i in kept) / len(kept)) if kept else None,
                    }
                )
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, {result['hardware']}",
        "command": "python bench/conformal.py " + " ".join(sys.argv[1:]),
        "setting": f"InCo with DWV, fine-tuned, preset {args.preset} with {args.pretrain_epochs} pretraining epochs, seed 0",
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    lines = [
        "# Conformal prediction sets on the NEU-CLS test images",
        "",
        f"`{r['command']}`, {r['when']}, on {r['machine']}, {r['wall_s'] / 60:.1f} min. {r['setting']}.",
        "Each classifier is calibrated on the labelled training images it was not fitted on; the 720 test",
        "images are measured here (no model or calibration saw them). Coverage: the share of test images",
        "whose set holds the true class (± one standard error of the calibration and test draws together);",
        "review: the share whose set holds more than one class.",
        "",
        "| ratio | test acc. | calibration images | level | coverage (± 1 s.e.) | mean set size | to review | acc. of the rest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        rest = "n/a" if x["accuracy_not_reviewed"] is None else f"{100 * x['accuracy_not_reviewed']:.1f} %"
        ok = "" if x["coverage"] >= x["level"] - x["std_error"] else " **below**"
        lines.append(
            f"| {x['ratio']} | {100 * x['accuracy']:.1f} % | {x['calibration_images']} | {x['level']:.2f} | "
            f"{100 * x['coverage']:.1f} % (± {100 * x['std_error']:.1f}){ok} | {x['mean_set_size']:.2f} | "
            f"{100 * x['to_review']:.1f} % | {rest} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
