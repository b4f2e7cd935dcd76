"""The DANN paper's three-row table at small scale: digits -> digits-M.

Trains the bundled `dann_digits` recipe in its three modes (source_only, dann,
train_on_target) over several seeds through the same code path as
`vislearn fit`, and prints target accuracy per mode, the gain of DANN over
source-only and the fraction of the source-only -> oracle gap DANN closes.

    python benchmarks/dann_digits.py [--seeds 0 1 2] [--epochs N] [--out benchmarks/out/dann]
"""

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

MODES = ("source_only", "dann", "train_on_target")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--out", default="benchmarks/out/dann")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import keras

    from vislearn import recipes

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    results = {mode: [] for mode in MODES}
    started = time.perf_counter()
    for seed in args.seeds:
        for mode in MODES:
            overrides = [f"model.mode={mode}", f"train.seed={seed}", *args.overrides]
            if args.epochs:
                overrides.append(f"train.epochs={args.epochs}")
            recipe, source = recipes.load_recipe("dann_digits", overrides)
            keras.backend.clear_session()
            t0 = time.perf_counter()
            metrics = recipes.fit(recipe, source, out / f"{mode}-seed{seed}", verbose=0)
            results[mode].append(metrics["accuracy"])
            print(f"seed {seed} {mode:16s} target accuracy {metrics['accuracy']:.4f} "
                  f"(source {metrics['source_accuracy']:.4f}, domain {metrics['domain_accuracy']:.4f}) "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    elapsed = time.perf_counter() - started

    mean = {mode: statistics.mean(values) for mode, values in results.items()}
    std = {mode: statistics.pstdev(values) for mode, values in results.items()}
    gain = mean["dann"] - mean["source_only"]
    gap = mean["train_on_target"] - mean["source_only"]
    closed = gain / gap if gap > 0 else float("nan")
    print()
    print(f"| method (digits -> digits-M, {len(args.seeds)} seeds) | target accuracy |")
    print("|---|---|")
    for mode in MODES:
        print(f"| {mode} | {mean[mode]:.4f} ± {std[mode]:.4f} |")
    print()
    print(f"DANN - source-only: {100 * gain:+.1f} points (target: >= +10)")
    print(f"gap closed: {100 * closed:.0f}% (target: >= 50%; paper: 56%)")
    print(f"wall time: {elapsed / 60:.1f} min for {len(args.seeds) * len(MODES)} runs (target: <= 15 min)")
    (out / "summary.json").write_text(json.dumps(
        {"runs": results, "mean": mean, "gain": gain, "gap_closed": closed, "minutes": elapsed / 60}, indent=2))


if __name__ == "__main__":
    main()
