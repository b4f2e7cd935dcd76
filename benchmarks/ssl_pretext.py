"""Self-supervised pretext methods on digits, scored by the shared frozen-encoder protocol.

Each method pretrains the same encoder (the bundled recipes' backbone) on the
unlabelled train split of scikit-learn's digits through the same code path
as `vislearn fit`; then a linear probe (`linear_top1`) and a weighted kNN
(`knn_top1`, k=20, T=0.07) are fitted on the frozen features of labelled
train images and scored on the test split. Reference rows: the encoder at
random initialisation (no training at all) and the encoder trained with labels
(`supervised_digits`). A method whose recipe reads images as their 3x3 patch
grid (`model.probe_embedding: patch_grid`, context prediction) is compared
with the random encoder read the same way (row `random_init_patch_grid`).

Every encoder is probed at several label budgets (1, 3, 10 labelled images
per class and every label); at a budget of a few labels the probe is fitted
on 3 class-balanced draws and their scores averaged. Every figure is then the
mean over the given seeds. The target (+5 points over random init) is checked
at `--probe-labels-per-class` (default 3); the sweep table shows the others.

    python benchmarks/ssl_pretext.py [--seeds 0 1 2] [--epochs N] [--probe-labels-per-class 3]
                                     [--methods ...] [--out benchmarks/out/ssl]
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

METHODS = ("autoencoder", "denoising_autoencoder", "rotnet", "exemplar", "context_prediction")
TARGET_GAIN = 0.05  # each method should beat random-init linear_top1 by >= 5 points
BUDGETS = (1, 3, 10, None)  # labelled images per class; None: every training label
LABEL_DRAWS = 3


def encoder_metrics(row, seed, args, run_dir):
    """{budget: {"linear_top1", "knn_top1"}} of one row's encoder: at random
    initialisation, or after fitting the `<row>_digits` recipe into run_dir."""
    import keras

    from vislearn import recipes
    from vislearn.backbones import build_backbone
    from vislearn.evaluation.representation import label_budget_metrics, probe_encoder_of
    from vislearn.models.context_prediction import patch_grid_encoder

    overrides = [f"train.seed={seed}", *args.overrides]
    if row in ("random_init", "random_init_patch_grid"):
        recipe, _ = recipes.load_recipe("supervised_digits", overrides)
        keras.utils.set_random_seed(seed)
        data = recipes.build_data(recipe)
        encoder = build_backbone(recipe["model"]["backbone"], data.image_shape)
        if row == "random_init_patch_grid":
            grid = recipes.load_recipe("context_prediction_digits", overrides)[0]["model"]
            encoder = patch_grid_encoder(encoder, grid["patch_size"], grid["gap"], grid["patch_scale"])
    else:
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        recipe, source = recipes.load_recipe(f"{row}_digits", overrides)
        recipes.fit(recipe, source, run_dir, verbose=0)
        _, model, data = recipes.load_trained(run_dir)
        encoder = probe_encoder_of(model)
    return label_budget_metrics(encoder, data.probe_train, data.probe_test, args.budgets, LABEL_DRAWS)


def baseline_rows(rows, args):
    """{row: the random-init row it is compared with, the one read the same way}."""
    from vislearn import recipes

    def baseline(row):
        if row.startswith("random_init") or row == "supervised":
            return "random_init"
        model = recipes.load_recipe(f"{row}_digits", args.overrides)[0]["model"]
        return "random_init_patch_grid" if model.get("probe_embedding") == "patch_grid" else "random_init"

    return {row: baseline(row) for row in rows}


def summary(values):
    mean = statistics.mean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return mean, spread


def run_rows(rows, args):
    """Every row (random_init, a `<row>_digits` recipe, ...) for every seed.

    Returns ({row: {budget: {"linear_top1": [...], "knn_top1": [...]}, "seconds": [...]}},
    total seconds)."""
    import keras

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    results = {row: {"seconds": [], **{budget: {"linear_top1": [], "knn_top1": []} for budget in args.budgets}}
               for row in rows}
    started = time.perf_counter()
    for seed in args.seeds:
        for row in rows:
            keras.backend.clear_session()
            t0 = time.perf_counter()
            metrics = encoder_metrics(row, seed, args, out / f"{row}-seed{seed}")
            results[row]["seconds"].append(time.perf_counter() - t0)
            for budget, scores in metrics.items():
                for key in ("linear_top1", "knn_top1"):
                    results[row][budget][key].append(scores[key])
            target = metrics[args.target_budget]
            print(f"seed {seed} {row:22s} ({budget_name(args.target_budget)}) linear_top1 "
                  f"{target['linear_top1']:.4f} knn_top1 {target['knn_top1']:.4f} "
                  f"{results[row]['seconds'][-1]:.0f}s", flush=True)
    return results, time.perf_counter() - started


def budget_name(budget):
    return f"{budget}/class" if budget else "all labels"


def print_table(results, rows, target_gain, caption, budget, baselines=None):
    """The markdown table of `run_rows`' results at one label budget: means ±
    spreads over seeds, the gain in linear_top1 over the row's random-init
    baseline (`baselines`, default "random_init") and whether it reaches
    `target_gain`."""
    baselines = baselines or {}
    print()
    print(f"| encoder ({caption}, probe {budget_name(budget)}) | linear_top1 | knn_top1 | linear vs random-init "
          f"| >= +{target_gain * 100:.0f} points | mean time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        linear, linear_sd = summary(results[row][budget]["linear_top1"])
        knn, knn_sd = summary(results[row][budget]["knn_top1"])
        gain = linear - summary(results[baselines.get(row, "random_init")][budget]["linear_top1"])[0]
        met = "-" if row.startswith("random_init") or row == "supervised" else ("yes" if gain >= target_gain else "no")
        print(f"| {row} | {linear:.4f} ± {linear_sd:.4f} | {knn:.4f} ± {knn_sd:.4f} | {gain * 100:+.1f} | {met} "
              f"| {summary(results[row]['seconds'])[0]:.0f} s |")


def print_sweep(results, rows, budgets, baselines=None):
    """linear_top1 / knn_top1 (means over seeds) of every row at every label
    budget, with the linear gain over its random-init baseline."""
    baselines = baselines or {}
    print()
    print("| encoder | " + " | ".join(f"{budget_name(b)}: linear / kNN (vs random)" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for row in rows:
        cells = []
        for budget in budgets:
            linear = summary(results[row][budget]["linear_top1"])[0]
            knn = summary(results[row][budget]["knn_top1"])[0]
            gain = linear - summary(results[baselines.get(row, "random_init")][budget]["linear_top1"])[0]
            cells.append(f"{linear:.3f} / {knn:.3f} ({gain * 100:+.1f})")
        print(f"| {row} | " + " | ".join(cells) + " |")


def add_protocol_arguments(parser, out):
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipes'")
    parser.add_argument("--probe-labels-per-class", type=int, default=3,
                        help="the label budget the target is checked at; 0 = every training label")
    parser.add_argument("--out", default=out)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every recipe, e.g. data.batch_size=64")


def resolve_budgets(args):
    args.target_budget = args.probe_labels_per_class or None
    args.budgets = tuple(sorted(set(BUDGETS) | {args.target_budget}, key=lambda b: b or 10**9))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_arguments(parser, "benchmarks/out/ssl")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    resolve_budgets(args)

    baselines = baseline_rows([*args.methods, "supervised"], args)
    # Every baseline row first, random_init leading.
    rows = sorted(set(baselines.values()), key=lambda row: row != "random_init") + [*args.methods, "supervised"]
    results, elapsed = run_rows(rows, args)
    caption = f"digits, {len(args.seeds)} seeds, epochs {args.epochs or 'recipe'}"
    print_table(results, rows, TARGET_GAIN, caption, args.target_budget, baselines)
    print_sweep(results, rows, args.budgets, baselines)
    print(f"\ntotal {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
