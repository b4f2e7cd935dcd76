"""Embedding lookups served from one SavedModel: a gallery's vectors baked in.

`vislearn index build RUN_DIR --images DIR | --captions FILE` embeds a
gallery with a trained image-text model and exports, in TF Serving layout,
a model that answers nearest-neighbour queries by exact search: the query
batch is multiplied with the index chunk by chunk (`chunk_size` rows at a
time, so memory stays at batch x chunk scores) and a running top-k is kept
with `tf.math.top_k`. Stock TF ops only; the index is a variable of the
SavedModel (N x d float32: N*d*4 bytes, plus the names).

Signatures (besides the embedder's `embed_image`, `embed_text`):
    lookup_text (with an image gallery): `texts` string [batch], `k` int32
        scalar -> `ids` int64 [batch, k'] (gallery rows), `names` string
        [batch, k'] (image paths relative to the gallery folder), `scores`
        float32 [batch, k'] (cosine similarity, best first).
    lookup_image (with a caption gallery): `images` encoded image bytes
        [batch], `k` -> the same outputs, names being the captions.
    serving_default: the gallery's lookup.

`k` larger than the gallery is clamped: k' = min(k, gallery size). `k` < 1 is
an `InvalidArgumentError` ("k must be at least 1"). An empty string is a
caption without words: it embeds to a fixed vector and returns that vector's
neighbours, like any other query.
"""

import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data.folders import IMAGE_SUFFIXES, check_images, decode_image
from vislearn.export import decode_batch, version_dir, write_metadata

DEFAULT_CHUNK = 32768


def exact_top_k(queries, index, k, chunk_size=DEFAULT_CHUNK):
    """Exact inner-product top-k of `queries` [B, d] over `index` [N, d].

    Returns (scores float32 [B, min(k, N)], ids int64 [B, min(k, N)]), best first.
    """
    queries = tf.convert_to_tensor(queries, tf.float32)
    index = tf.convert_to_tensor(index, tf.float32)
    size = tf.shape(index)[0]
    tf.debugging.assert_greater_equal(k, 1, message="k must be at least 1")
    k = tf.minimum(tf.cast(k, tf.int32), size)
    batch = tf.shape(queries)[0]

    def step(start, best_scores, best_ids):
        block = index[start:start + chunk_size]
        top = tf.math.top_k(tf.matmul(queries, block, transpose_b=True), k=tf.minimum(k, tf.shape(block)[0]))
        scores = tf.concat([best_scores, top.values], axis=1)
        ids = tf.concat([best_ids, tf.cast(top.indices + start, tf.int64)], axis=1)
        merged = tf.math.top_k(scores, k=tf.minimum(k, tf.shape(scores)[1]))
        return start + chunk_size, merged.values, tf.gather(ids, merged.indices, batch_dims=1)

    # An explicit while_loop (not autograph): export endpoints are traced without autograph.
    _, best_scores, best_ids = tf.while_loop(
        lambda start, *_: start < size, step,
        (tf.constant(0), tf.zeros([batch, 0], tf.float32), tf.zeros([batch, 0], tf.int64)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None]), tf.TensorShape([None, None])))
    return best_scores, best_ids


def gallery_images(folder):
    """Image files under `folder` (recursive, sorted); a corrupt one is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    check_images(paths)
    return paths, [str(p.relative_to(folder)) for p in paths]


def gallery_captions(file):
    """Captions of a gallery: a text file (one caption per line; blank lines
    are errors) or a Karpathy-split JSON (every sentence of every image)."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"--captions {file}: file not found")
    if file.suffix.lower() == ".json":
        try:
            images = json.loads(file.read_text())["images"]
            captions = [s.get("raw") or " ".join(s.get("tokens", [])) for i in images for s in i["sentences"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ConfigError(f"--captions {file}: not Karpathy-split JSON ({error})") from None
    else:
        captions = file.read_text().splitlines()
    for line, caption in enumerate(captions, 1):
        if not caption.strip():
            raise ConfigError(f"--captions {file}: caption {line} is empty")
    if not captions:
        raise ConfigError(f"--captions {file}: no captions")
    return [c.strip() for c in captions]


def _embed_images(model, paths, image_shape, batch_size=64):
    size = list(image_shape[:2])
    vectors = []
    for start in range(0, len(paths), batch_size):
        images = tf.stack([decode_image(tf.io.read_file(str(p)), size) for p in paths[start:start + batch_size]])
        vectors.append(np.asarray(model.embed_image(images, training=False)))
    return np.concatenate(vectors)


def _embed_texts(model, texts, batch_size=256):
    return np.concatenate([np.asarray(model.embed_text(tf.constant(texts[i:i + batch_size]), training=False))
                           for i in range(0, len(texts), batch_size)])


def export_lookup(model, path, image_shape, vectors, names, gallery, chunk_size=DEFAULT_CHUNK):
    """Write the lookup SavedModel for a gallery of `vectors` [N, d] named `names`.

    Args:
        gallery: `"images"` (answers `lookup_text`) or `"captions"`
            (answers `lookup_image`).
    """
    if gallery not in ("images", "captions"):
        raise ValueError(f"gallery: expected 'images' or 'captions', received {gallery!r}")
    index = tf.Variable(np.asarray(vectors, np.float32), trainable=False, name="index")
    index_names = tf.Variable(np.asarray(names, dtype=object).astype(bytes), trainable=False, name="index_names")
    chunk_size = int(chunk_size)

    def answer(queries, k):
        scores, ids = exact_top_k(queries, index, k, chunk_size)
        return {"ids": ids, "names": tf.gather(index_names, ids), "scores": scores}

    def embed_image(images):
        return {"embeddings": model.embed_image(decode_batch(images, image_shape), training=False)}

    def embed_text(texts):
        return {"embeddings": model.embed_text(texts, training=False)}

    images_spec = tf.TensorSpec([None], tf.string, name="images")
    texts_spec = tf.TensorSpec([None], tf.string, name="texts")
    k_spec = tf.TensorSpec([], tf.int32, name="k")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_variable_collection("index", [index, index_names])
    archive.add_endpoint("embed_image", embed_image, input_signature=[images_spec])
    archive.add_endpoint("embed_text", embed_text, input_signature=[texts_spec])
    if gallery == "images":
        lookup = lambda texts, k: answer(model.embed_text(texts, training=False), k)  # noqa: E731
        archive.add_endpoint("lookup_text", lookup, input_signature=[texts_spec, k_spec])
    else:
        lookup = lambda images, k: answer(embed_image(images)["embeddings"], k)  # noqa: E731
        archive.add_endpoint("lookup_image", lookup, input_signature=[images_spec, k_spec])
    archive.add_endpoint("serving_default", lookup,
                         input_signature=[texts_spec if gallery == "images" else images_spec, k_spec])
    archive.write_out(str(path), verbose=False)
    signature = "lookup_text" if gallery == "images" else "lookup_image"
    write_metadata(path, kind="embedding_lookup", gallery=gallery, size=int(len(names)),
                   embedding_dim=int(np.shape(vectors)[1]), image_shape=list(image_shape), chunk_size=chunk_size,
                   k="clamped to the gallery size; k < 1 is an error",
                   signatures={signature: "queries, k -> ids, names, scores (cosine, best first)",
                               "serving_default": signature, "embed_image": "images -> embeddings",
                               "embed_text": "texts -> embeddings"})
    return Path(path)


def build_index(run_dir, base, name, images=None, captions=None, version=None, chunk_size=DEFAULT_CHUNK):
    """`vislearn index build`: embed a gallery with RUN_DIR's model and export the lookup model."""
    from vislearn.recipes import load_trained

    if (images is None) == (captions is None):
        raise ConfigError("index build: give exactly one of --images DIR or --captions FILE")
    gallery = _read_gallery(images, captions)  # a bad gallery fails before the model is loaded
    recipe, model, data = load_trained(run_dir)
    if not hasattr(model, "embed_text"):
        raise ConfigError(f"{run_dir}: method {recipe['model']['name']!r} has no text branch; "
                          "index build needs an image-text model (e.g. two_branch)")
    if recipe["model"]["name"] == "two_branch_similarity":
        # Its score is a network over the pair; a cosine index of the branch
        # embeddings would rank by something the model was never trained on.
        raise ConfigError(f"{run_dir}: method 'two_branch_similarity' scores pairs with a network, which an "
                          "embedding index cannot hold; score with its export's `score` signature, or index "
                          "a two_branch (embedding network) run")
    return index_model(model, data.image_shape, base, name, images, captions, version, chunk_size, gallery)


def _read_gallery(images, captions):
    return gallery_images(images) if images is not None else gallery_captions(captions)


def index_model(model, image_shape, base, name, images=None, captions=None, version=None,
                chunk_size=DEFAULT_CHUNK, gallery=None):
    """Embed a gallery (a folder of images or a caption file) with a loaded
    model and write its lookup model to BASE/NAME/VERSION."""
    if (images is None) == (captions is None):
        raise ConfigError("index build: give exactly one of --images DIR or --captions FILE")
    gallery = gallery or _read_gallery(images, captions)
    if images is not None:
        paths, names = gallery
        vectors = _embed_images(model, paths, image_shape)
    else:
        names = gallery
        vectors = _embed_texts(model, names)
    path = version_dir(base, name, version)
    return export_lookup(model, path, image_shape, vectors, names,
                         "images" if images is not None else "captions", chunk_size)
