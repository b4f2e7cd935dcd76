"""Self-supervised pretext methods on digits, scored by the shared frozen-encoder protocol.

Each method pretrains the same encoder (the bundled recipes' backbone) on the
unlabelled train split of scikit-learn's digits through the same code path
as `vislearn fit`; then a linear probe (`linear_top1`) and a weighted kNN
(`knn_top1`, k=20, T=0.07) are fitted on the frozen features of the labelled
train split and scored on the test split. Reference rows: the encoder at
random initialisation (no training at all) and the encoder trained with labels
(`supervised_digits`). Every row is the mean of the given seeds.

    python benchmarks/ssl_pretext.py [--seeds 0 1 2] [--epochs N] [--probe-labels-per-class 10]
                                     [--out benchmarks/out/ssl]
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

METHODS = ("autoencoder", "denoising_autoencoder", "rotnet", "exemplar", "context_prediction")
TARGET_GAIN = 0.05  # each method should beat random-init linear_top1 by >= 5 points


def random_init_metrics(seed, overrides):
    """The protocol on the recipes' encoder as initialised, never trained."""
    import keras

    from vislearn import recipes
    from vislearn.backbones import build_backbone
    from vislearn.evaluation.representation import representation_metrics

    recipe, _ = recipes.load_recipe("supervised_digits", [f"train.seed={seed}", *overrides])
    keras.utils.set_random_seed(seed)
    data = recipes.build_data(recipe)
    encoder = build_backbone(recipe["model"]["backbone"], data.image_shape)
    return representation_metrics(encoder, data.probe_train, data.probe_test)


def summary(values):
    mean = statistics.mean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return mean, spread


def run_rows(rows, args):
    """Every row (random_init, a `<row>_digits` recipe, ...) for every seed.

    Returns ({row: {"linear_top1": [...], "knn_top1": [...], "seconds": [...]}},
    total seconds)."""
    import keras

    from vislearn import recipes

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    results = {row: {"linear_top1": [], "knn_top1": [], "seconds": []} for row in rows}
    started = time.perf_counter()
    for seed in args.seeds:
        for row in rows:
            keras.backend.clear_session()
            t0 = time.perf_counter()
            if row == "random_init":
                metrics = random_init_metrics(seed, args.overrides)
            else:
                overrides = [f"train.seed={seed}", *args.overrides]
                if args.epochs:
                    overrides.append(f"train.epochs={args.epochs}")
                recipe, source = recipes.load_recipe(f"{row}_digits", overrides)
                metrics = recipes.fit(recipe, source, out / f"{row}-seed{seed}", verbose=0)
            seconds = time.perf_counter() - t0
            for key in ("linear_top1", "knn_top1"):
                results[row][key].append(metrics[key])
            results[row]["seconds"].append(seconds)
            print(f"seed {seed} {row:22s} linear_top1 {metrics['linear_top1']:.4f} "
                  f"knn_top1 {metrics['knn_top1']:.4f} {seconds:.0f}s", flush=True)
    return results, time.perf_counter() - started


def print_table(results, rows, target_gain, caption):
    """The markdown table of `run_rows`' results: means ± spreads, the gain in
    linear_top1 over the random-init row and whether it reaches `target_gain`."""
    random_linear, _ = summary(results["random_init"]["linear_top1"])
    print()
    print(f"| encoder ({caption}) | linear_top1 | knn_top1 | linear vs random-init "
          f"| >= +{target_gain * 100:.0f} points | mean time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        linear, linear_sd = summary(results[row]["linear_top1"])
        knn, knn_sd = summary(results[row]["knn_top1"])
        gain = linear - random_linear
        met = "-" if row in ("random_init", "supervised") else ("yes" if gain >= target_gain else "no")
        print(f"| {row} | {linear:.4f} ± {linear_sd:.4f} | {knn:.4f} ± {knn_sd:.4f} | {gain * 100:+.1f} | {met} "
              f"| {summary(results[row]['seconds'])[0]:.0f} s |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipes'")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--probe-labels-per-class", type=int, default=10,
                        help="labelled images per class for the probe; 0 = the whole train split")
    parser.add_argument("--out", default="benchmarks/out/ssl")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every recipe, e.g. data.batch_size=64")
    args = parser.parse_args()
    if args.probe_labels_per_class:
        args.overrides.append(f"data.probe_labels_per_class={args.probe_labels_per_class}")

    rows = ["random_init", *args.methods, "supervised"]
    results, elapsed = run_rows(rows, args)

    labels = f"{args.probe_labels_per_class}/class" if args.probe_labels_per_class else "all"
    print_table(results, rows, TARGET_GAIN,
                f"digits, {len(args.seeds)} seeds, epochs {args.epochs or 'recipe'}, probe labels {labels}")
    print(f"\ntotal {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
