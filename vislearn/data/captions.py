"""Image-caption readers (Karpathy-split JSON, COCO captions JSON) and
neighbourhood-sampled training streams for image-text matching.

Every builder here returns a `CaptionData`. Its `train` stream is built by
*neighbourhood sampling* (Wang et al., 2018): a batch holds `batch_size`
distinct images, each with `captions_per_image` of its own captions drawn
without replacement, so every caption has its image and its sibling captions
(the within-modal neighbours) inside the batch. A batch is a dict:

    image:    float32 [batch_size, H, W, 3] in [0, 1]
    captions: string  [batch_size, captions_per_image]; row i describes image i

Evaluation splits (`val`, `test`) are `RetrievalSplit`s: every image once, in
order, and all its captions, flattened, with the row of the image each
caption belongs to.

With `features` (a `vislearn features extract` folder; `coco_captions`: one
folder per caption file, `train_features` + `test_features`) the images are
never read: batches and splits carry each image's cached feature vector instead,

    features: float32 [batch_size, feature_dim]

and the sampling of images and captions is the same.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data.folders import decode_image
from vislearn.data.make import default_data_home

TRAIN_SPLITS = ("train", "restval")  # Karpathy's COCO split trains on restval too
COCO_SPLIT = "all"  # a COCO captions file has no splits: `read_caption_file` gives its images this one


@dataclasses.dataclass
class RetrievalSplit:
    images: tf.data.Dataset      # batched float32 images (or cached feature vectors) in file order
    captions: list               # every caption of every image, image by image
    caption_image: np.ndarray    # int64 [len(captions)]: row of the caption's image
    filenames: list              # image paths, in row order

    def __len__(self):
        return len(self.filenames)


@dataclasses.dataclass
class CaptionData:
    train: tf.data.Dataset           # infinite neighbourhood batches (see the module docstring)
    steps_per_epoch: int
    validation: tf.data.Dataset | None  # one pass of neighbourhood batches of `val` (val_loss)
    val: RetrievalSplit | None
    test: RetrievalSplit
    train_captions: list             # every training caption (the text vocabulary is built from them)
    image_shape: tuple
    counts: dict
    batch_size: int
    captions_per_image: int
    features: object = None          # the `vislearn.features.FeatureCache` the batches carry, if any


# ---------------------------------------------------------------- readers


def _load_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def _check_caption(text, where):
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: empty caption (received {text!r}); remove it or write one")
    return text.strip()


def _check_image(path, where):
    if not path.is_file():
        raise ConfigError(f"{where}: image file {path} not found")
    return str(path)


def read_karpathy(annotations, image_dir):
    """Read a Karpathy-split caption file (`dataset_flickr30k.json`, `dataset_coco.json`, ...).

    Args:
        annotations: the JSON file: `{"images": [{"filename", "split",
            "sentences": [{"raw", "tokens"}, ...], "filepath"?}, ...]}`.
        image_dir: folder the file names are relative to (COCO's
            `filepath`, e.g. `val2014`, is joined in between when present).

    Returns:
        {split: [(image path, [caption, ...]), ...]} in file order; a caption
        is `raw`, or the joined `tokens` when `raw` is absent.

    Raises:
        ConfigError naming the file and field for a missing image file, an
        image without sentences or an empty caption.
    """
    return _karpathy_splits(_load_json(annotations, "caption annotations"), annotations, image_dir)


def _karpathy_splits(content, annotations, image_dir):
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list):
        raise ConfigError(f"{annotations}: expected Karpathy-split JSON with an 'images' list")
    image_dir = Path(image_dir)
    splits = {}
    for i, record in enumerate(images):
        where = f"{annotations}: images[{i}]"
        if not isinstance(record, dict) or not record.get("filename"):
            raise ConfigError(f"{where}.filename: missing")
        where = f"{where} ({record['filename']})"
        sentences = record.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ConfigError(f"{where}.sentences: no captions")
        captions = []
        for j, sentence in enumerate(sentences):
            text = sentence.get("raw") if isinstance(sentence, dict) else None
            if text is None and isinstance(sentence, dict) and sentence.get("tokens"):
                text = " ".join(sentence["tokens"])
            captions.append(_check_caption(text, f"{where}.sentences[{j}].raw"))
        path = image_dir / record.get("filepath", "") / record["filename"]
        splits.setdefault(record.get("split", "train"), []).append((_check_image(path, where), captions))
    return splits


def read_coco_captions(annotations, image_dir):
    """Read a COCO captions file (`captions_train2014.json`): `images[{id,
    file_name}]` and `annotations[{image_id, caption}]`.

    Returns:
        [(image path, [caption, ...]), ...] in the file's image order.
    """
    return _coco_records(_load_json(annotations, "COCO captions"), annotations, image_dir)


def _coco_records(content, annotations, image_dir):
    if not isinstance(content, dict) or not isinstance(content.get("images"), list) \
            or not isinstance(content.get("annotations"), list):
        raise ConfigError(f"{annotations}: expected COCO captions JSON with 'images' and 'annotations' lists")
    by_image = {}
    for j, annotation in enumerate(content["annotations"]):
        where = f"{annotations}: annotations[{j}] (id {annotation.get('id')})"
        by_image.setdefault(annotation.get("image_id"), []).append(
            _check_caption(annotation.get("caption"), f"{where}.caption"))
    records = []
    for i, image in enumerate(content["images"]):
        where = f"{annotations}: images[{i}] ({image.get('file_name')})"
        if image.get("id") not in by_image:
            raise ConfigError(f"{where}: no captions in 'annotations'")
        records.append((_check_image(Path(image_dir) / str(image.get("file_name")), where), by_image[image["id"]]))
    return records


def caption_file_format(content):
    """"karpathy" or "coco" for a caption file's parsed JSON, told apart by
    structure (COCO: `images` + `annotations` lists; Karpathy: `images`
    records with `filename` / `sentences` and no `annotations`), else None."""
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        return None
    if "annotations" in content:
        return "coco" if isinstance(content["annotations"], list) else None
    images = content["images"]
    if not images or (isinstance(images[0], dict) and {"filename", "sentences"} & set(images[0])):
        return "karpathy"
    return None


def read_caption_file(annotations, image_dir):
    """Read a Karpathy-split or a COCO captions file, whichever it is.

    Returns:
        (format, {split: [(image path, [caption, ...]), ...]}): a COCO file
        has no splits, so all its images are the one split `COCO_SPLIT`.

    Raises:
        ConfigError naming the file and both expected structures when the
        JSON is neither.
    """
    content = _load_json(annotations, "caption annotations")
    found = caption_file_format(content)
    if found == "karpathy":
        return found, _karpathy_splits(content, annotations, image_dir)
    if found == "coco":
        return found, {COCO_SPLIT: _coco_records(content, annotations, image_dir)}
    keys = sorted(content) if isinstance(content, dict) else type(content).__name__
    raise ConfigError(f"{annotations}: unrecognised caption JSON (top level: {keys}); expected Karpathy-split "
                      "{'images': [{'filename', 'split', 'sentences'}]} or COCO captions "
                      "{'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}")


# ---------------------------------------------------------------- streams


def _padded(records):
    """(paths, captions padded with "" to [n, max], counts)."""
    longest = max(len(captions) for _, captions in records)
    captions = np.array([c + [""] * (longest - len(c)) for _, c in records], dtype=object)
    counts = np.array([len(c) for _, c in records], dtype=np.int32)
    return [p for p, _ in records], captions.astype(str), counts


def _decoded(paths, image_size):
    """Images decoded once at `image_size` and cached as uint8 (4x less memory than float)."""
    size = list(image_size)
    return tf.data.Dataset.from_tensor_slices(paths).map(
        lambda path: tf.cast(tf.round(decode_image(tf.io.read_file(path), size) * 255.0), tf.uint8),
        num_parallel_calls=tf.data.AUTOTUNE)


def sample_captions(captions, count, take, seed):
    """`take` of the first `count` entries of `captions`, without replacement
    (repeating only when an image has fewer than `take`), via stateless ops."""
    keys = tf.random.stateless_uniform(tf.shape(captions), seed=seed)
    keys = tf.where(tf.range(tf.shape(captions)[0]) < count, keys, 2.0)  # padding sorts last
    order = tf.argsort(keys)[:count]
    return tf.gather(captions, tf.gather(order, tf.range(take) % count))


def _options():
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def neighbourhood_batches(records, image_size, batch_size, captions_per_image, seed, repeat=True, features=None):
    """Neighbourhood-sampled batches (see the module docstring) of `records`.

    With `repeat` the stream is shuffled and infinite; without, it is one pass
    in order (for validation losses). `features` (float32 [len(records), dim])
    replaces the images by their cached feature vectors."""
    paths, captions, counts = _padded(records)
    if features is None:
        images = _decoded(paths, image_size).cache()
        key, to_input = "image", lambda image: tf.cast(image, tf.float32) / 255.0
    else:
        images = tf.data.Dataset.from_tensor_slices(features)
        key, to_input = "features", lambda vector: vector
    dataset = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices((captions, counts))))
    if repeat:
        dataset = dataset.shuffle(len(paths), seed=seed).repeat()
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    dataset = tf.data.Dataset.zip((dataset, seeds)).map(
        lambda pair, element_seed: {
            key: to_input(pair[0]),
            "captions": sample_captions(pair[1][0], pair[1][1], captions_per_image, element_seed),
        }, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=True).with_options(_options()).prefetch(tf.data.AUTOTUNE)


def retrieval_split(records, image_size, batch_size=64, features=None):
    paths = [p for p, _ in records]
    captions = [c for _, image_captions in records for c in image_captions]
    caption_image = np.repeat(np.arange(len(records)), [len(c) for _, c in records]).astype(np.int64)
    if features is None:
        images = _decoded(paths, image_size).map(lambda image: tf.cast(image, tf.float32) / 255.0)
    else:
        images = tf.data.Dataset.from_tensor_slices(features)
    return RetrievalSplit(images=images.batch(batch_size).cache().prefetch(tf.data.AUTOTUNE),
                          captions=captions, caption_image=caption_image, filenames=paths)


def caption_data(train, val, test, image_size, batch_size, captions_per_image, seed, features=None):
    """`CaptionData` from record lists [(image path, [caption, ...]), ...].

    `features`: optional `(FeatureCache, (records, split) -> float32 [n, dim])`,
    split being "train", "val" or "test"; the streams then carry cached
    feature vectors (see the module docstring). The cache is the one exports
    rebuild the image backbone from."""
    if int(captions_per_image) < 1:
        raise ConfigError(f"data.captions_per_image: expected a positive integer, received {captions_per_image!r}")
    if not train:
        raise ConfigError("data: no training images (expected a 'train' split)")
    if not test:
        raise ConfigError("data.eval_split: the evaluation split has no images")
    if batch_size < 2 or batch_size > len(train):
        raise ConfigError(f"data.batch_size: {batch_size} images per batch; expected 2 to the "
                          f"{len(train)} training images (negatives come from the other images of a batch)")
    image_size = tuple(int(s) for s in image_size)
    cache, vectors = features or (None, lambda records, split: None)
    validation = None
    if val and len(val) >= batch_size:
        validation = neighbourhood_batches(val, image_size, batch_size, captions_per_image, seed, repeat=False,
                                           features=vectors(val, "val"))
    return CaptionData(
        train=neighbourhood_batches(train, image_size, batch_size, captions_per_image, seed,
                                    features=vectors(train, "train")),
        steps_per_epoch=math.ceil(len(train) / batch_size),
        validation=validation,
        val=retrieval_split(val, image_size, batch_size, vectors(val, "val")) if val else None,
        test=retrieval_split(test, image_size, batch_size, vectors(test, "test")),
        train_captions=[c for _, captions in train for c in captions],
        image_shape=(*image_size, 3),
        counts={"train": len(train), "val": len(val or []), "test": len(test),
                "test_captions": sum(len(c) for _, c in test)},
        batch_size=batch_size, captions_per_image=int(captions_per_image), features=cache)


# ---------------------------------------------------------------- builders (DATASETS)


def _feature_cache(folder, image_size, where):
    """A `vislearn features extract` folder (`FeatureCache`), checked against `data.image_size`."""
    from vislearn.features import FeatureCache

    cache = FeatureCache(folder, where)
    if [int(s) for s in image_size] != cache.image_size:
        raise ConfigError(f"data.image_size: {list(image_size)} does not match the {cache.image_size} the features "
                          f"of {cache.manifest_file} were extracted at; set data.image_size: {cache.image_size}")
    return cache


def cached_features(folder, annotations, image_dir, image_size):
    """`caption_data`'s `features` argument for a `vislearn features extract`
    folder of one caption file, checked against it and `data.image_size`."""
    cache = _feature_cache(folder, image_size, "data.features")
    return cache, lambda records, split: cache.lookup(records, image_dir, annotations)


def karpathy_captions(annotations, image_dir, image_size=(64, 64), batch_size=64, captions_per_image=2,
                      eval_split="test", features=None, seed=0):
    """A Karpathy-split caption set (Flickr30k, COCO, Flickr8k, or one you write).

    Args:
        annotations: the `dataset_*.json` file.
        image_dir: folder of the images (see `read_karpathy`).
        image_size: [height, width] images are resized to.
        batch_size: images per batch (each with `captions_per_image` captions).
        captions_per_image: captions drawn per image per batch (neighbourhood sampling).
        eval_split: split the metrics are computed on (`test` or `val`).
        features: a `vislearn features extract` folder of this caption file:
            batches carry the cached feature vectors instead of images (train
            with `model.backbone: features`); `image_size` must be the
            extraction's.
    """
    splits = read_karpathy(annotations, image_dir)
    if eval_split not in splits:
        raise ConfigError(f"data.eval_split: {annotations} has no {eval_split!r} split; "
                          f"it has {sorted(splits)}")
    train = [record for split in TRAIN_SPLITS for record in splits.get(split, [])]
    cached = None if features is None else cached_features(features, annotations, image_dir, image_size)
    return caption_data(train, splits.get("val"), splits[eval_split], image_size, batch_size,
                        captions_per_image, seed, cached)


def coco_captions(train_annotations, train_images, test_annotations, test_images, image_size=(64, 64),
                  batch_size=64, captions_per_image=2, train_features=None, test_features=None, seed=0):
    """COCO's own caption files (`captions_train2014.json` + `train2014/`, and a
    held-out file + folder for the metrics); no validation split.

    Args:
        train_features, test_features: `vislearn features extract` folders of
            the two caption files (both or neither; one extraction per file,
            from the same backbone, weights, image size and feature width):
            batches carry the cached feature vectors instead of images (train
            with `model.backbone: features`); exports rebuild the backbone
            from `train_features`. `image_size` must be the extraction's.
        Other arguments as `karpathy_captions`.
    """
    if (train_features is None) != (test_features is None):
        missing = "test_features" if test_features is None else "train_features"
        raise ConfigError(f"data.{missing}: missing; coco_captions takes train_features and test_features together "
                          "(one `vislearn features extract` folder per caption file), or neither")
    train = read_coco_captions(train_annotations, train_images)
    test = read_coco_captions(test_annotations, test_images)
    cached = None
    if train_features is not None:
        train_cache = _feature_cache(train_features, image_size, "data.train_features")
        test_cache = _feature_cache(test_features, image_size, "data.test_features")
        train_cache.check_same_extraction(test_cache)

        def vectors(records, split):  # each caption file's images come from its own extraction
            if split == "test":
                return test_cache.lookup(records, test_images, test_annotations)
            return train_cache.lookup(records, train_images, train_annotations)

        cached = train_cache, vectors
    return caption_data(train, None, test, image_size, batch_size, captions_per_image, seed, cached)


def captioned_shapes(root=None, image_size=(64, 64), batch_size=64, captions_per_image=2, eval_split="test",
                     features=None, make_seed=0, seed=0):
    """The captioned-shapes set (`vislearn data make captioned_shapes`).

    Args:
        root: folder made by `vislearn data make captioned_shapes`; when null it
            is made on first use under `$VISLEARN_DATA` (default ~/.cache/vislearn).
        make_seed: seed of the scenes when the set is made.
        Other arguments as `karpathy_captions`.
    """
    from vislearn.data.captioned_shapes import JSON_NAME, make_captioned_shapes

    if root is None:
        root = default_data_home() / f"captioned_shapes-{make_seed}"
        if not (root / "dataset.json").exists():
            make_captioned_shapes(root, seed=make_seed)
    root = Path(root)
    if not (root / JSON_NAME).is_file():
        raise ConfigError(f"data.root: {root} holds no {JSON_NAME} "
                          f"(make it with `vislearn data make captioned_shapes --out {root}`)")
    return karpathy_captions(root / JSON_NAME, root / "images", image_size, batch_size, captions_per_image,
                             eval_split, features, seed)
