"""Cross-modal retrieval evaluation (image <-> text), as in VSE++ and Wang et al.

Given a similarity matrix between N images and their captions (every caption
belongs to one image):

- image -> text (`i2t_*`): rank the captions for each image; the image's rank
  is the best rank of any of its own captions.
- text -> image (`t2i_*`): rank the images for each caption; the caption's
  rank is the rank of its image.
- `*_r1 / r5 / r10`: fraction of queries whose rank is within 1 / 5 / 10
  (fractions in [0, 1], not percentages); `rsum` the sum of the six (at most 6);
  `*_medr` / `*_meanr`: median / mean rank, 1-based.
- `t2t_r1`: fraction of captions whose nearest other caption describes the
  same image (what the within-modal constraint is meant to improve).

Ties are broken by index (a stable sort), so equal scores never flatter a model.
With 5,000 or more images (COCO's 5K test) the COCO 1K protocol is added:
the same metrics averaged over folds of 1,000 consecutive images, keys
prefixed `1k_`.
"""

import keras
import numpy as np

RECALL_AT = (1, 5, 10)


def retrieval_ranks(similarity, caption_image, chunk=256):
    """0-based ranks: (image -> text [n_images], text -> image [n_captions]).

    A rank counts the candidates scoring higher, plus those scoring equal with
    a lower index (what a stable sort gives), without sorting; rows are
    processed in chunks so memory stays at chunk x n_captions."""
    similarity = np.asarray(similarity, dtype=np.float32)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_images, n_captions = similarity.shape
    columns = np.arange(n_captions)
    i2t = np.empty(n_images, np.int64)
    for start in range(0, n_images, chunk):
        rows = similarity[start:start + chunk]
        own = caption_image[None, :] == np.arange(start, start + len(rows))[:, None]
        best = np.where(own, rows, -np.inf).max(axis=1, keepdims=True)
        first_best = np.argmax(own & (rows == best), axis=1)  # the best own caption, lowest index on ties
        i2t[start:start + chunk] = np.sum(rows > best, axis=1) + np.sum(
            (rows == best) & (columns[None, :] < first_best[:, None]), axis=1)
    target = similarity[caption_image, columns]
    above = (similarity > target[None, :]).sum(axis=0)
    tied_before = ((similarity == target[None, :]) & (np.arange(n_images)[:, None] < caption_image[None, :])).sum(axis=0)
    return i2t, above + tied_before


def rank_metrics(similarity, caption_image):
    """The DESIGN.md retrieval keys (plus `i2t_meanr`, `t2i_meanr`) of one similarity matrix."""
    i2t, t2i = retrieval_ranks(similarity, caption_image)
    metrics = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_AT:
            metrics[f"{name}_r{k}"] = float(np.mean(ranks < k))
    metrics["rsum"] = float(sum(metrics[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in RECALL_AT))
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        metrics[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{name}_meanr"] = float(np.mean(ranks) + 1)
    return metrics


def text_to_text_r1(caption_embeddings, caption_image):
    """Fraction of captions whose nearest other caption (cosine) describes the same image."""
    captions = np.asarray(caption_embeddings, dtype=np.float32)
    caption_image = np.asarray(caption_image)
    hits = []
    for start in range(0, len(captions), 1024):  # chunks keep memory at 1024 x n
        block = captions[start:start + 1024] @ captions.T
        block[np.arange(len(block)), start + np.arange(len(block))] = -np.inf
        hits.append(caption_image[np.argmax(block, axis=1)] == caption_image[start:start + len(block)])
    return float(np.mean(np.concatenate(hits)))


def embedding_metrics(image_embeddings, caption_embeddings, caption_image, fold_size=1000):
    """All retrieval metrics of L2-normalised embeddings (cosine similarity)."""
    images = np.asarray(image_embeddings, dtype=np.float32)
    captions = np.asarray(caption_embeddings, dtype=np.float32)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    metrics = rank_metrics(images @ captions.T, caption_image)
    metrics["t2t_r1"] = text_to_text_r1(captions, caption_image)
    if len(images) >= 5 * fold_size and len(images) % fold_size == 0:
        folds = []
        for start in range(0, len(images), fold_size):
            keep = (caption_image >= start) & (caption_image < start + fold_size)
            folds.append(rank_metrics(images[start:start + fold_size] @ captions[keep].T,
                                      caption_image[keep] - start))
        metrics.update({f"1k_{key}": float(np.mean([f[key] for f in folds])) for key in folds[0]})
    return metrics


def embed_split(model, split, text_batch=256):
    """(image embeddings, caption embeddings) of a `RetrievalSplit` with a
    model that has `embed_image` and `embed_text` (e.g. `TwoBranch`); a split
    of cached feature vectors (`data.features`) goes to a model whose
    `embed_image` takes them (`model.backbone: features`)."""
    images = np.concatenate([np.asarray(model.embed_image(batch, training=False)) for batch in split.images])
    captions = np.concatenate([
        np.asarray(model.embed_text(np.array(split.captions[i:i + text_batch], dtype=object), training=False))
        for i in range(0, len(split.captions), text_batch)])
    return images, captions


def retrieval_metrics(model, split):
    """Metrics of a model on a `RetrievalSplit` (the metrics.json keys)."""
    images, captions = embed_split(model, split)
    return embedding_metrics(images, captions, split.caption_image)


class RetrievalMonitor(keras.callbacks.Callback):
    """Writes `val_rsum` and `val_t2t_r1` of a held-out split into each epoch's
    logs (so they reach history.csv, TensorBoard and the checkpoint monitor)."""

    def __init__(self, split):
        super().__init__()
        self.split = split

    def on_epoch_end(self, epoch, logs=None):
        metrics = retrieval_metrics(self.model, self.split)
        if logs is not None:
            logs["val_rsum"] = metrics["rsum"]
            logs["val_t2t_r1"] = metrics["t2t_r1"]


def retrieval_grid(model, split, out_png, queries=8, k=5, seed=0):
    """A PNG grid: per row a caption query and its top-`k` retrieved images
    (green frame: the caption's own image, red: another)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    images, captions = embed_split(model, split)
    pixels = np.concatenate([np.asarray(batch) for batch in split.images])
    if pixels.ndim == 2:  # a split of cached feature vectors: show the image files
        from vislearn.data.folders import decode_image

        pixels = np.stack([decode_image(open(path, "rb").read(), [64, 64]) for path in split.filenames])
    chosen = np.random.default_rng(seed).choice(len(split.captions), min(queries, len(split.captions)), replace=False)
    fig, axes = plt.subplots(len(chosen), k, figsize=(1.6 * k + 3, 1.7 * len(chosen)), squeeze=False)
    for row, query in enumerate(chosen):
        top = np.argsort(-(images @ captions[query]), kind="stable")[:k]
        for col, image in enumerate(top):
            ax = axes[row, col]
            ax.imshow(np.clip(pixels[image], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "green" if image == split.caption_image[query] else "red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
        axes[row, 0].set_ylabel(split.captions[query], rotation=0, ha="right", va="center", fontsize=7, wrap=True)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)
