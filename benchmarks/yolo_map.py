"""The detectors' quality target: map50 on shapes on photos within the time limit.

Runs each bundled detection recipe (`yolo_shapes`: YOLOv1 with its pretraining
step; `yolo_af_shapes`: the anchor-free detector) for each seed exactly as a
user does, `vislearn fit RECIPE --run-dir DIR --set train.seed=N`, one process
per run, and prints the held-out map50 and map from the run's `metrics.json`
beside the wall time of the whole command (pretraining, training, evaluation
and export; not the first-use making of the image set, which the script does
before the clock starts).

    python benchmarks/yolo_map.py [--recipes yolo_shapes yolo_af_shapes] [--seeds 0 1 2]
        [--out benchmarks/out/yolo_map] [--set KEY=VALUE ...]

Each fit saturates the 2 cores: run nothing else beside it, or the minutes
mean little (the map50 of a seed does not change).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_MAP50 = 0.90
TARGET_MINUTES = 20.0


def make_image_set(recipe_name, overrides):
    """Make the recipe's shapes-on-photos set now (on first use), so the timed
    runs do not include it."""
    from vislearn import recipes

    recipe, _ = recipes.load_recipe(recipe_name, overrides)
    recipes.build_data(recipe)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["yolo_shapes", "yolo_af_shapes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/out/yolo_map")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    vislearn = Path(sys.executable).with_name("vislearn")
    rows = []
    for recipe in args.recipes:
        make_image_set(recipe, args.overrides)
        for seed in args.seeds:
            run_dir = out / f"{recipe}-seed{seed}"
            command = [str(vislearn), "fit", recipe, "--run-dir", str(run_dir), "--set", f"train.seed={seed}"]
            for override in args.overrides:
                command += ["--set", override]
            print("$", " ".join(command), flush=True)
            started = time.perf_counter()
            subprocess.run(command, check=True)  # its per-epoch logs go to this terminal
            minutes = (time.perf_counter() - started) / 60
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append({"recipe": recipe, "seed": seed, "map50": metrics["map50"], "map": metrics["map"],
                         "minutes": minutes})
            print(f"{recipe} seed {seed}: map50 {metrics['map50']:.3f}, map {metrics['map']:.3f}, "
                  f"{minutes:.1f} min", flush=True)

    print()
    print(f"| recipe | seed | map50 | map | minutes | map50 >= {TARGET_MAP50} in <= {TARGET_MINUTES:.0f} min |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        met = row["map50"] >= TARGET_MAP50 and row["minutes"] <= TARGET_MINUTES
        print(f"| {row['recipe']} | {row['seed']} | {row['map50']:.3f} | {row['map']:.3f} | "
              f"{row['minutes']:.1f} | {'yes' if met else 'no'} |")
    for recipe in args.recipes:
        scores = [row["map50"] for row in rows if row["recipe"] == recipe]
        print(f"{recipe}: mean map50 {statistics.mean(scores):.3f} over seeds {args.seeds}")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
