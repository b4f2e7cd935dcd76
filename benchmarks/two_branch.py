"""Two-branch networks: retrieval quality, the within-modal ablation, the similarity network, lookup latency.

Quality: the bundled `two_branch_shapes` recipe is trained (the same code path
as `vislearn fit`) with the within-modal constraint (sentence_weight 0.05) and
without it (0), and scored on the 1,000-image test split of captioned shapes
(5,000 captions): R@1/5/10 both ways, rsum (sum of six fractions, at most 6),
median ranks and text->text same-image R@1. The similarity network
(`two_branch_similarity_shapes`: element-wise product -> FC -> BN -> ReLU ->
logit, logistic loss, retrieval by scoring every pair) is reported beside
them; `--similarity-epochs N` shortens its run and adds an embedding-network
run of the same length, so the two are compared at one budget. Finished runs
in `--out` are reused, so the table can be reprinted. A PNG grid of top retrieved images per
caption query is written beside each run (`retrieval.png`).

Grounding (`--grounding-runs`): phrase -> box accuracy at IoU >= 0.5 of
finished runs on the grounding variant of the same test split.

Lookup: exact top-k over a 100,000 x 512 L2-normalised index, vislearn's
chunked matmul + top_k (`vislearn.index.exact_top_k`, in a tf.function, as in
the exported lookup models) against faiss-cpu's IndexFlatIP on the same
queries; the two are timed alternately so machine load hits both alike.

    python benchmarks/two_branch.py [--epochs N] [--similarity-epochs N] [--out benchmarks/out/two_branch]
                                    [--skip-quality] [--skip-lookup] [--batch 16] [--k 10]
                                    [--grounding-runs RUN ...]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

TARGET_R10 = 0.90
TARGET_LATENCY_RATIO = 1.5
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr", "t2t_r1")


def _trained_metrics(out, run_name, recipe_name, overrides, label):
    """metrics.json of a run of a bundled recipe (trained unless already finished), plus its retrieval grid."""
    from vislearn import recipes
    from vislearn.evaluation.retrieval import retrieval_grid

    run_dir = out / run_name
    if not (run_dir / "metrics.json").exists():
        recipe, source = recipes.load_recipe(recipe_name, overrides)
        start = time.time()
        recipes.fit(recipe, source, run_dir, verbose=2)
        print(f"{label}: trained in {time.time() - start:.0f} s")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe = recipes.read_yaml(run_dir / "recipe.yaml")
    if recipe["model"]["name"] == "two_branch" and not (run_dir / "retrieval.png").exists():
        _, model, data = recipes.load_trained(run_dir)
        retrieval_grid(model, data.test, run_dir / "retrieval.png")
    return {**metrics, "epochs": recipe["train"]["epochs"]}


def quality(out, epochs, similarity_epochs):
    """The embedding network with and without the within-modal constraint, and
    the similarity network (`two_branch_similarity_shapes`) beside it; when the
    similarity network gets a shorter budget, the embedding network is also
    trained at that budget so one row compares like with like."""
    epoch_override = [f"train.epochs={epochs}"] if epochs else []
    rows = {}
    for label, weight in (("with constraint (0.05)", 0.05), ("without constraint (0)", 0.0)):
        rows[label] = _trained_metrics(out, f"sentence_weight_{weight}", "two_branch_shapes",
                                       [f"model.sentence_weight={weight}"] + epoch_override, label)
    similarity_override = [f"train.epochs={similarity_epochs}"] if similarity_epochs else epoch_override
    if similarity_epochs and similarity_epochs != rows["with constraint (0.05)"]["epochs"]:
        label = f"with constraint (0.05), {similarity_epochs} epochs"
        rows[label] = _trained_metrics(out, f"sentence_weight_0.05_epochs_{similarity_epochs}", "two_branch_shapes",
                                       similarity_override, label)
    rows["similarity network"] = _trained_metrics(
        out, "similarity" + (f"_epochs_{similarity_epochs}" if similarity_epochs else ""),
        "two_branch_similarity_shapes", similarity_override, "similarity network")
    print("\n| test split (1,000 images, 5,000 captions) | epochs | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 2) + "|")
    for label, metrics in rows.items():
        print(f"| {label} | {metrics['epochs']} | " + " | ".join(f"{metrics[k]:.3f}" for k in KEYS) + " |")
    main = rows["with constraint (0.05)"]
    met = main["i2t_r10"] >= TARGET_R10 and main["t2i_r10"] >= TARGET_R10
    print(f"\nR@10 i2t {main['i2t_r10']:.3f}, t2i {main['t2i_r10']:.3f} (target >= {TARGET_R10} both: "
          f"{'met' if met else 'NOT met'})")
    without = rows["without constraint (0)"]
    print(f"constraint effect: t2t_r1 {without['t2t_r1']:.3f} -> {main['t2t_r1']:.3f}, "
          f"rsum {without['rsum']:.3f} -> {main['rsum']:.3f}")


def grounding(out, run_names):
    """Phrase grounding on the test split of the grounding variant of captioned
    shapes (the same seed, so the same images as the retrieval test split):
    every finished run in `run_names` picks, per phrase, one of the image's
    ground-truth boxes by scoring the box crops against the phrase."""
    from vislearn import recipes
    from vislearn.data.captioned_shapes import make_captioned_shapes
    from vislearn.data.flickr30k_entities import read_flickr30k_entities
    from vislearn.evaluation.grounding import grounding_metrics

    root = out / "captioned_shapes_grounding"
    if not (root / "dataset.json").exists():
        make_captioned_shapes(root, seed=0, grounding=True)
    images = read_flickr30k_entities(root, sorted(p.stem for p in (root / "Sentences").glob("test_*.txt")))
    print("\n| grounding, test split (ground-truth boxes as candidates) | grounding_accuracy | chance | phrases |")
    print("|---|---|---|---|")
    for name in run_names:
        run_dir = out / name
        if not (run_dir / "metrics.json").exists():
            continue
        _, model, _ = recipes.load_trained(run_dir)
        metrics = grounding_metrics(model, images, root / "images")
        (run_dir / "grounding.json").write_text(json.dumps(metrics, indent=2))
        print(f"| {name} | {metrics['grounding_accuracy']:.3f} | {metrics['grounding_chance']:.3f} | "
              f"{metrics['grounding_phrases']} |")


def lookup(batch, k, size=100_000, dim=512, repeats=30):
    import faiss
    import numpy as np
    import tensorflow as tf

    from vislearn.index import exact_top_k

    rng = np.random.default_rng(0)
    index = rng.normal(size=(size, dim)).astype(np.float32)
    index /= np.linalg.norm(index, axis=1, keepdims=True)
    queries = rng.normal(size=(repeats, batch, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=2, keepdims=True)

    variable = tf.Variable(index, trainable=False)
    search = tf.function(lambda q, k: exact_top_k(q, variable, k), jit_compile=False)
    flat = faiss.IndexFlatIP(dim)
    flat.add(index)
    k_tensor = tf.constant(k)
    search(queries[0], k_tensor)  # trace
    flat.search(queries[0], k)

    vislearn_ms, faiss_ms = [], []
    for q in queries:  # alternate, so load on the shared machine hits both alike
        start = time.perf_counter()
        scores, ids = search(q, k_tensor)
        ids = ids.numpy()
        vislearn_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        faiss_scores, faiss_ids = flat.search(q, k)
        faiss_ms.append((time.perf_counter() - start) * 1000)
        assert (ids == faiss_ids).mean() > 0.999, "exact search disagrees with faiss"
    ours, theirs = statistics.median(vislearn_ms), statistics.median(faiss_ms)
    print(f"\nlookup {size:,} x {dim}, query batch {batch}, k={k}, {repeats} batches, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads)")
    print(f"  vislearn chunked matmul + top_k: median {ours:.1f} ms/batch")
    print(f"  faiss IndexFlatIP:               median {theirs:.1f} ms/batch")
    print(f"  ratio {ours / theirs:.2f}x (target <= {TARGET_LATENCY_RATIO}x: "
          f"{'met' if ours / theirs <= TARGET_LATENCY_RATIO else 'NOT met'}); "
          f"index memory {size * dim * 4 / 2**20:.0f} MiB = N*d*4 bytes (float32 variable)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/two_branch"))
    parser.add_argument("--similarity-epochs", type=int, default=None,
                        help="train.epochs of the similarity network (default: as --epochs); a different "
                             "count also trains the embedding network at it, for a like-for-like row")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-lookup", action="store_true")
    parser.add_argument("--grounding-runs", nargs="*", default=None,
                        help="run dirs (names under --out) to score on phrase grounding (default: none)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if not args.skip_quality:
        quality(args.out, args.epochs, args.similarity_epochs)
    if args.grounding_runs:
        grounding(args.out, args.grounding_runs)
    if not args.skip_lookup:
        lookup(args.batch, args.k)


if __name__ == "__main__":
    main()
