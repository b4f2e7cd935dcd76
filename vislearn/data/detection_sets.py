"""Detection data for training: a reader's splits -> batched, augmented pipelines.

Every builder here returns a `DetectionData`. Its `train` dataset is infinite
and yields the padded batches of `vislearn.data.detection.pad_batch` (dicts
of `image` [batch, H, W, 3], `boxes` [batch, M, 4] `rel_yxyx`, `classes`
[batch, M] with -1 for padding, `difficult`, `image_id`); detectors encode
their own targets from them, so the data does not depend on the model.

Images are stretched to `image_size` (YOLOv1's own input handling; normalised
boxes are unchanged, so predictions on the stretched image are predictions on
the original) and cached as uint8 at that size, then augmented per epoch with
the YOLOv1 paper's jitter (`vislearn.data.detection_augment`).
"""

import dataclasses
import math
from pathlib import Path

import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data import detection_augment as augment_ops
from vislearn.data.detection import pad_batch

FILE_FORMATS = ("coco", "voc", "yolo")


@dataclasses.dataclass
class DetectionData:
    """What a detection recipe trains and evaluates on.

    Attributes:
        train: infinite dataset of padded training batches.
        steps_per_epoch: batches in one pass over the training split.
        validation: padded batches of the held-out split (for `val_loss`).
        test: unbatched elements of the held-out split at `image_size`
            (for mAP).
        class_names: names of the class indices.
        image_shape: (height, width, 3) the model takes.
        counts: images per split.
        report: what the readers repaired (clipped/dropped boxes, skipped images).
        batch_size: the global batch size.
    """

    train: tf.data.Dataset
    steps_per_epoch: int
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list
    image_shape: tuple
    counts: dict
    report: dict
    batch_size: int

    @property
    def num_classes(self):
        return len(self.class_names)


def _sharded(dataset):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _resized_uint8(dataset, size, max_boxes):
    def prepare(element):
        element = augment_ops.resize(element, size)
        element = {key: element[key] for key in ("image", "boxes", "classes", "difficult", "image_id")}
        element["image"] = tf.image.convert_image_dtype(element["image"], tf.uint8, saturate=True)
        for key in ("boxes", "classes", "difficult"):
            element[key] = element[key][:max_boxes]
        return element

    return dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def _to_float(element):
    return {**element, "image": tf.image.convert_image_dtype(element["image"], tf.float32)}


def _augment(index, element, seed):
    """YOLOv1's jitter, drawn from the stream's seed and the element's position in it."""
    return augment_ops.yolo_v1_augment(element, size=None, seed=tf.stack([tf.cast(seed, tf.int64), index]))


def detection_pipelines(train_set, test_set, image_size=(448, 448), batch_size=64, augment=True,
                        max_boxes=100, cache=True, seed=0):
    """`DetectionData` from two `vislearn.data.detection.DetectionSet`s."""
    size = [int(s) for s in image_size]
    if len(size) != 2 or min(size) < 32:
        raise ConfigError(f"data.image_size: expected [height, width] of at least 32 pixels, received {image_size!r}")
    if train_set.count < batch_size:
        raise ConfigError(f"data.batch_size: {batch_size} is larger than the training set ({train_set.count} images)")
    if list(test_set.class_names) != list(train_set.class_names):
        raise ConfigError(f"data: the test split's classes {test_set.class_names} differ from the "
                          f"training split's {train_set.class_names}")
    train = _resized_uint8(train_set.dataset, size, max_boxes)
    test = _resized_uint8(test_set.dataset, size, max_boxes)
    if cache:
        train, test = train.cache(), test.cache()
    train = train.shuffle(min(train_set.count, 4096), seed=seed).repeat().map(
        _to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        train = train.enumerate().map(lambda index, element: _augment(index, element, seed),
                                      num_parallel_calls=tf.data.AUTOTUNE)
    train = pad_batch(train, batch_size, max_boxes, drop_remainder=True)
    test = test.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    return DetectionData(
        train=_sharded(train).prefetch(tf.data.AUTOTUNE),
        steps_per_epoch=math.ceil(train_set.count / batch_size),
        validation=_sharded(pad_batch(test, batch_size, max_boxes)).prefetch(tf.data.AUTOTUNE),
        test=test,
        class_names=list(train_set.class_names),
        image_shape=(*size, 3),
        counts={"train": train_set.count, "test": test_set.count},
        report={"train": train_set.report, "test": test_set.report},
        batch_size=batch_size,
    )


def read_detection_split(root, format, split, class_names=None, skip_corrupt=False):
    """One split of a detection set on disk, in COCO, VOC or YOLO txt layout.

    Layouts (`split` names the split):
        coco: `root/annotations/instances_<split>.json`, images in `root/<split>/`.
        voc: `root/ImageSets/Main/<split>.txt`, `root/Annotations/`, `root/JPEGImages/`.
        yolo: `root/data.yaml` (or `root` is the YAML itself) with a `<split>` key.
    """
    root = Path(root)
    if format not in FILE_FORMATS:
        raise ConfigError(f"data.format: unknown value {format!r}; expected one of {list(FILE_FORMATS)}")
    if not root.exists():
        raise ConfigError(f"data.root: {root} does not exist")
    if format == "coco":
        from vislearn.data.coco import read_coco

        return read_coco(root / "annotations" / f"instances_{split}.json", root / split, class_names, skip_corrupt)
    if format == "voc":
        from vislearn.data.voc import read_voc

        return read_voc(root, split, class_names, skip_corrupt)
    from vislearn.data.yolo_txt import read_yolo_txt

    if class_names is not None:
        raise ConfigError("data.class_names: YOLO txt sets name their classes in data.yaml; drop class_names")
    return read_yolo_txt(root if root.is_file() else root / "data.yaml", split, skip_corrupt)


def detection_folder(root, format="coco", train_split="train", test_split="test", image_size=(448, 448),
                     batch_size=64, augment=True, max_boxes=100, class_names=None, skip_corrupt=False,
                     cache=True, seed=0):
    """A detection set on disk (COCO JSON, Pascal VOC XML or YOLO txt).

    Args:
        root: the set's folder (see `read_detection_split` for the layouts).
        format: `coco`, `voc` or `yolo`.
        train_split: the split to train on (e.g. `train2017`, `trainval`).
        test_split: the held-out split metrics are measured on (e.g. `val2017`, `test`).
        image_size: [height, width] images are stretched to.
        batch_size: global batch size.
        augment: the YOLOv1 paper's scale/translate, flip and HSV jitter.
        max_boxes: boxes kept per image (batches are padded to this many).
        class_names: optional list or one-name-a-line file fixing the class order.
        skip_corrupt: skip (and count) missing or undecodable images.
        cache: keep the resized images in memory after the first epoch.
    """
    train_set, test_set = read_train_and_test(root, format, train_split, test_split, class_names, skip_corrupt)
    return detection_pipelines(train_set, test_set, image_size, batch_size, augment, max_boxes, cache, seed)


def read_train_and_test(root, format, train_split, test_split, class_names=None, skip_corrupt=False):
    """Two splits of a detection set, the test split read with the training split's classes."""
    train_set = read_detection_split(root, format, train_split, class_names, skip_corrupt)
    test_set = read_detection_split(root, format, test_split, train_set.class_names if format != "yolo" else None,
                                    skip_corrupt)
    return train_set, test_set


def shapes_on_photos(root=None, format="coco", image_size=(448, 448), batch_size=64, augment=True,
                     max_boxes=100, n_train=800, n_test=200, source_size=224, make_seed=0, cache=True, seed=0):
    """Shapes on photos (`vislearn.data.shapes`), read through the ordinary readers.

    Args:
        root: folder holding the made set; when null, it is made on first use
            under `$VISLEARN_DATA` (default ~/.cache/vislearn).
        format: on-disk format to make and read (`coco`, `voc`, `yolo`).
        n_train, n_test, source_size, make_seed: the made set's size, image
            side in pixels and seed (only used when `root` is null).
        Other arguments as `detection_folder`.
    """
    root = shapes_on_photos_root(root, format, n_train, n_test, source_size, make_seed)
    return detection_folder(root, format, "train", "test", image_size, batch_size, augment, max_boxes,
                            skip_corrupt=False, cache=cache, seed=seed)


def shapes_on_photos_root(root, format, n_train, n_test, source_size, make_seed):
    """The shapes-on-photos folder to read: `root`, or when null the set made
    (on first use) under `$VISLEARN_DATA` for these arguments."""
    from vislearn.data.make import default_data_home
    from vislearn.data.shapes import make_shapes_on_photos

    if root is None:
        root = default_data_home() / f"shapes_on_photos-{format}-{make_seed}-{n_train}-{n_test}-{source_size}"
        if not (root / "dataset.json").exists():
            make_shapes_on_photos(root, seed=make_seed, file_format=format, n_train=n_train, n_test=n_test,
                                  image_size=source_size)
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} does not exist (make it with "
                          f"`vislearn data make shapes_on_photos --format {format} --out {root}`)")
    return root
