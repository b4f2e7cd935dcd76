"""Unlabelled image streams for self-supervised pretraining, plus labelled probe splits.

Every builder here returns an `UnlabelledData`. Its `train` dataset yields
batches of images only (float [0, 1]); the labels of the pretraining images
are never read. The labelled `probe_train` / `probe_test` splits are used
only by the evaluation protocol (linear probe, kNN) and the online kNN
monitor. Two methods need targets on the training stream, and ask for them
through keys vislearn fills in (not recipe keys):

- `train_targets="labels"`: `(image, class)` batches, for the supervised baseline;
- `train_targets="exemplars"` with `num_exemplars=N`: N seed images drawn once
  (fixed by `seed`), each its own surrogate class: `(image, exemplar index)`.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data.detection_augment import GREY
from vislearn.data.detection_sets import read_train_and_test, shapes_on_photos_root
from vislearn.data.folders import IMAGE_SUFFIXES, check_images, decode_image, image_folder
from vislearn.data.make import default_data_home, make_digits_folders

# Builder keys that vislearn fills in from the method, never from a recipe.
METHOD_KEYS = ("train_targets", "num_exemplars")
TRAIN_TARGETS = (None, "labels", "exemplars")


@dataclasses.dataclass
class UnlabelledData:
    train: tf.data.Dataset              # infinite, batched images (or (image, target), see above)
    steps_per_epoch: int
    probe_train: tf.data.Dataset | None  # batched (image, label), or None without probe folders
    probe_test: tf.data.Dataset | None
    num_classes: int
    image_shape: tuple
    class_names: list
    counts: dict


def _options():
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _train_stream(images, labels, batch_size, seed, train_targets, num_exemplars):
    """Shuffled, repeated, batched training stream; drops labels unless asked."""
    if train_targets not in TRAIN_TARGETS:
        raise ConfigError(f"train_targets: expected one of {TRAIN_TARGETS}, received {train_targets!r}")
    count = len(images)
    if train_targets == "exemplars":
        num_exemplars = int(num_exemplars or 0)
        if not 0 < num_exemplars <= count:
            raise ConfigError(f"model.num_exemplars: {num_exemplars} must be between 1 and the "
                              f"{count} training images")
        chosen = np.random.default_rng(seed).choice(count, num_exemplars, replace=False)
        images = tf.gather(images, chosen)
        labels = tf.range(num_exemplars, dtype=tf.int64)
        count = num_exemplars
    if count < batch_size:
        raise ConfigError(f"data.batch_size: {batch_size} is larger than the training set ({count} images)")
    dataset = tf.data.Dataset.from_tensor_slices(images if train_targets is None else (images, labels))
    dataset = dataset.shuffle(count, seed=seed).repeat().batch(batch_size, drop_remainder=True)
    return dataset.with_options(_options()).prefetch(tf.data.AUTOTUNE), math.ceil(count / batch_size)


def _load(dataset):
    images, labels = [], []
    for image, label in dataset.batch(256):
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _probe(dataset, batch_size):
    return None if dataset is None else dataset.batch(batch_size).with_options(_options()).prefetch(tf.data.AUTOTUNE)


def labelled_subset(labels, per_class, seed):
    """Indices of `per_class` examples of every class, drawn with `seed`:
    the few-labels probe split (as in the 1%/10%-labels evaluations of SimCLR)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ConfigError(f"data.probe_labels_per_class: {per_class} is more than the "
                              f"{len(members)} training images of class {label}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def digits_ssl(root=None, image_size=(32, 32), batch_size=64, make_seed=0, seed=0,
               probe_labels_per_class=None, train_targets=None, num_exemplars=None):
    """scikit-learn's real handwritten digits for self-supervised pretraining.

    The train split is the unlabelled pretraining set and, with its labels,
    the probe's training split; the test split is the probe's test split.

    Args:
        root: folder made by `vislearn data make digits_folders` (`train/` and
            `test/` class-per-folder trees); when null it is made on first use
            under `$VISLEARN_DATA` (default ~/.cache/vislearn).
        image_size: [height, width] images are resized to.
        batch_size: global batch size.
        make_seed: seed of the train/test split when the set is made, and
            of the few-labels probe subset.
        probe_labels_per_class: when set, the probe (linear and kNN) trains
            on only this many labelled images per class, drawn from the train
            split; null uses every training label. With all ~1,300 labels a
            random encoder already scores ~0.96 linear_top1 on digits, so the
            few-labels probe is the one that separates good features.
    """
    if probe_labels_per_class is not None and int(probe_labels_per_class) < 1:
        raise ConfigError(f"data.probe_labels_per_class: expected a positive integer or null, "
                          f"received {probe_labels_per_class!r}")
    if root is None:
        root = default_data_home() / f"digits_folders-{make_seed}"
        if not (root / "dataset.json").exists():
            make_digits_folders(root, seed=make_seed)
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} does not exist "
                          f"(make it with `vislearn data make digits_folders --out {root}`)")
    image_size = tuple(image_size)
    train, class_names, n_train = image_folder(root / "train", image_size)
    test, _, n_test = image_folder(root / "test", image_size, class_names)
    images, labels = _load(train)
    stream, steps = _train_stream(images, labels, batch_size, seed, train_targets, num_exemplars)
    probe_images, probe_labels = images, labels
    if probe_labels_per_class is not None:
        keep = labelled_subset(labels, int(probe_labels_per_class), make_seed)
        probe_images, probe_labels = images[keep], labels[keep]
    return UnlabelledData(
        train=stream, steps_per_epoch=steps,
        probe_train=_probe(tf.data.Dataset.from_tensor_slices((probe_images, probe_labels)), batch_size),
        probe_test=_probe(test.cache(), batch_size),
        num_classes=len(class_names), image_shape=(*image_size, 3), class_names=class_names,
        counts={"train": n_train, "probe_train": len(probe_labels), "probe_test": n_test})


def image_folders(root, image_size=(32, 32), batch_size=64, probe_train=None, probe_test=None,
                  skip_corrupt=False, seed=0, train_targets=None, num_exemplars=None):
    """A user's unlabelled images (every image under `root`, any nesting).

    Args:
        root: folder of images; sub-folders are read recursively and their
            names are ignored.
        image_size: [height, width] images are resized to.
        batch_size: global batch size.
        probe_train, probe_test: optional class-per-folder trees
            (`<root>/<class>/<image>`) for the linear probe and kNN; without
            them `linear_top1` and `knn_top1` are not computed.
        skip_corrupt: drop (and count) undecodable images instead of failing.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a folder of images")
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ConfigError(f"data.root: {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if train_targets == "labels":
        raise ConfigError("data.name: image_folders has no labels; the supervised method needs a labelled set")
    kept, _ = check_images(paths, skip_corrupt)
    paths = [paths[i] for i in kept]
    image_size = tuple(image_size)
    size = list(image_size)
    images = np.stack([decode_image(tf.io.read_file(p), size).numpy() for p in paths])
    stream, steps = _train_stream(images, np.zeros(len(images), np.int64), batch_size, seed,
                                  train_targets, num_exemplars)
    class_names, sets, counts = [], {}, {"train": len(paths)}
    if (probe_train is None) != (probe_test is None):
        raise ConfigError("data.probe_train / data.probe_test: give both class-per-folder trees or neither")
    if probe_train is not None:
        sets["probe_train"], class_names, counts["probe_train"] = image_folder(probe_train, image_size)
        sets["probe_test"], _, counts["probe_test"] = image_folder(probe_test, image_size, class_names)
    return UnlabelledData(
        train=stream, steps_per_epoch=steps,
        probe_train=_probe(sets.get("probe_train"), batch_size), probe_test=_probe(sets.get("probe_test"), batch_size),
        num_classes=len(class_names), image_shape=(*image_size, 3), class_names=class_names, counts=counts)


def _object_crops(detection_set, image_size, context):
    """Every non-difficult object of a detection split as a square crop
    centred on its box, `context` times the box's longer side, resized to
    `image_size` (grey where the square leaves the image): (uint8 crops, classes)."""
    size = [int(s) for s in image_size]

    def crop(element):
        keep = ~element["difficult"]
        boxes, classes = tf.boolean_mask(element["boxes"], keep), tf.boolean_mask(element["classes"], keep)
        shape = tf.cast(tf.shape(element["image"])[:2], tf.float32)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        side = context * tf.reduce_max((boxes[:, 2:] - boxes[:, :2]) * shape, axis=1, keepdims=True)
        half = side / 2 / shape  # the same pixels on both axes
        squares = tf.concat([centre - half, centre + half], axis=1)
        crops = tf.image.crop_and_resize(element["image"][None], squares, tf.zeros_like(classes), size,
                                         extrapolation_value=GREY)
        return tf.image.convert_image_dtype(crops, tf.uint8, saturate=True), tf.cast(classes, tf.int64)

    crops, labels = [], []
    for element in detection_set.dataset:  # eagerly: inside a tf.data map grappler warns about CropAndResize
        element_crops, element_labels = crop(element)
        crops.append(element_crops.numpy())
        labels.append(element_labels.numpy())
    crops = np.concatenate(crops) if crops else np.zeros((0, *size, 3), np.uint8)
    return crops, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def object_crops(root=None, format="coco", train_split="train", test_split="test", image_size=(64, 64),
                 context=3.0, batch_size=64, class_names=None, skip_corrupt=False, n_train=800, n_test=200,
                 source_size=224, make_seed=0, seed=0, train_targets=None, num_exemplars=None):
    """The objects of a detection set, cropped and labelled by class: a
    classification set for pretraining a detector's backbone.

    YOLOv1 pretrains its convolutional layers on ImageNet classification
    before it trains to detect; this is that step on the detection set's own
    training boxes (`vislearn fit yolo_shapes_backbone`, then
    `model.backbone.from_run` in the detector's recipe). The test split's
    crops are the held-out probe split.

    Args:
        root, format, train_split, test_split, class_names, skip_corrupt: the
            detection set, as `detection_folder` reads it; when `root` is null,
            shapes on photos made on first use with `n_train`, `n_test`,
            `source_size` and `make_seed` (as the `shapes_on_photos` data).
        image_size: [height, width] of the crops.
        context: side of the square crop as a multiple of the box's longer
            side (3: the object fills a third; with 64-pixel crops of 224-pixel
            images, objects are as large as in the detector's 160x160 input).
        batch_size: global batch size.
    """
    if not float(context) >= 1.0:
        raise ConfigError(f"data.context: expected a number of at least 1 (the crop holds the box), "
                          f"received {context!r}")
    if root is None:
        root = shapes_on_photos_root(None, format, n_train, n_test, source_size, make_seed)
    train_set, test_set = read_train_and_test(root, format, train_split, test_split, class_names, skip_corrupt)
    images, labels = _object_crops(train_set, image_size, float(context))
    test_images, test_labels = _object_crops(test_set, image_size, float(context))
    if not len(images):
        raise ConfigError(f"data.root: {root} has no objects in its {train_split!r} split to crop")
    stream, steps = _train_stream(images, labels, batch_size, seed, train_targets, num_exemplars)

    def as_float(crops, *targets):  # kept as uint8 in memory: a quarter of the bytes
        crops = tf.image.convert_image_dtype(crops, tf.float32)
        return (crops, *targets) if targets else crops

    def probe(crops, classes):
        return _probe(tf.data.Dataset.from_tensor_slices((crops, classes)).map(as_float), batch_size)

    return UnlabelledData(
        train=stream.map(as_float), steps_per_epoch=steps,
        probe_train=probe(images, labels), probe_test=probe(test_images, test_labels),
        num_classes=len(train_set.class_names), image_shape=(*tuple(image_size), 3),
        class_names=list(train_set.class_names),
        counts={"train": len(images), "probe_train": len(images), "probe_test": len(test_images)})
