"""The one tf.data element format every detection reader produces.

Each element is a dict, unbatched, ragged across images:

- `image`: float32 `[H, W, 3]` in [0, 1], RGB, at the file's own size (resize
  or letterbox with `vislearn.data.detection_augment`).
- `boxes`: float32 `[N, 4]` normalised `(ymin, xmin, ymax, xmax)` in [0, 1]
  (`rel_yxyx`, see `vislearn.data.boxes`). `N` may be 0.
- `classes`: int32 `[N]`, indices into the reader's `class_names`.
- `difficult`: bool `[N]`, objects that evaluation ignores (VOC `difficult`,
  COCO `iscrowd`): neither a miss when undetected nor a false positive when hit.
- `image_id`: int64 scalar (the COCO id, or the image's index in the split).

Readers parse annotations once in Python, so a bad file fails before training
starts: boxes reaching outside the image are clipped (counted, one warning),
boxes of zero area are dropped (counted), an unknown class is a `ConfigError`
naming the file and the name, and a missing or undecodable image is an error
naming the file, or with `skip_corrupt=True` is skipped and counted.
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from vislearn.config import ConfigError
from vislearn.data.folders import CorruptImageError

log = logging.getLogger("vislearn.data")

ELEMENT_KEYS = ("image", "boxes", "classes", "difficult", "image_id")


@dataclasses.dataclass
class DetectionSet:
    """A detection split: the element dataset and what reading it found.

    Attributes:
        dataset: `tf.data.Dataset` of elements (see the module docstring).
        class_names: list of class names; `classes` index into it.
        count: number of images in `dataset`.
        report: counts of repaired annotations: `clipped_boxes`,
            `dropped_boxes` (zero area), `skipped_images`.
    """

    dataset: tf.data.Dataset
    class_names: list
    count: int
    report: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self):
        return len(self.class_names)


@dataclasses.dataclass
class ImageRecord:
    """One image's annotations after parsing, before tf.data."""

    path: str
    image_id: int
    boxes: np.ndarray  # [N, 4] rel_yxyx
    classes: np.ndarray  # [N] int32
    difficult: np.ndarray  # [N] bool


class AnnotationChecker:
    """Clips and drops bad boxes and checks image files, counting what it did,
    so a reader ends with one warning instead of one per box."""

    def __init__(self, skip_corrupt=False, verify_images=True):
        self.skip_corrupt = skip_corrupt
        self.verify_images = verify_images
        self.clipped = 0
        self.dropped = 0
        self.skipped = []
        self.first_clipped = None
        self.first_dropped = None

    def image_size(self, path, listed_in):
        """(height, width) of a decodable image, or None when skipped.

        Raises:
            ConfigError: the file is missing, or `CorruptImageError` when it
                cannot be decoded (unless `skip_corrupt`).
        """
        path = Path(path)
        if not path.is_file():
            if self.skip_corrupt:
                self.skipped.append(str(path))
                return None
            raise ConfigError(f"{path}: image file not found (listed in {listed_in}); "
                              "add it, remove its annotation, or set data.skip_corrupt: true")
        try:
            with Image.open(path) as img:
                if self.verify_images:
                    img.load()  # a truncated JPEG only fails on a full decode
                width, height = img.size
        except Exception as error:  # PIL raises several types for bad files
            if self.skip_corrupt:
                self.skipped.append(str(path))
                return None
            raise CorruptImageError(
                f"{path}: cannot decode image ({type(error).__name__}: {error}); "
                "fix or remove it, or set data.skip_corrupt: true") from None
        return height, width

    def boxes(self, boxes, where, height=1.0, width=1.0):
        """Clip `yxyx` boxes in units of (height, width) to the image, drop zero-area ones.

        Returns:
            (rel_yxyx boxes float32 [K, 4], kept mask bool [N]).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        limits = np.array([height, width, height, width], dtype=np.float64)
        relative = boxes / limits
        clipped = np.clip(relative, 0.0, 1.0)
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        # A box that was partly outside counts as clipped; one wholly outside
        # (or inverted, or empty) ends with zero area and counts as dropped.
        changed = np.any(np.abs(clipped - relative) > 1e-6, axis=1) & keep
        if changed.any():
            self.clipped += int(changed.sum())
            self.first_clipped = self.first_clipped or where
        if (~keep).any():
            self.dropped += int((~keep).sum())
            self.first_dropped = self.first_dropped or where
        return clipped[keep].astype(np.float32), keep

    def report(self):
        if self.clipped:
            log.warning("clipped %d box(es) reaching outside their image, first in %s",
                        self.clipped, self.first_clipped)
        if self.dropped:
            log.warning("dropped %d box(es) of zero area, first in %s", self.dropped, self.first_dropped)
        if self.skipped:
            log.warning("skipped %d missing or corrupt image(s), first: %s", len(self.skipped), self.skipped[0])
        return {"clipped_boxes": self.clipped, "dropped_boxes": self.dropped,
                "skipped_images": len(self.skipped)}


def records_dataset(records):
    """Elements (see the module docstring) decoded from `ImageRecord`s."""
    lengths = [len(r.classes) for r in records]
    flat_boxes = np.concatenate([r.boxes.reshape(-1, 4) for r in records] or [np.zeros((0, 4))])
    flat_classes = np.concatenate([r.classes for r in records] or [np.zeros(0)])
    flat_difficult = np.concatenate([r.difficult for r in records] or [np.zeros(0)])
    table = {
        "path": tf.constant([r.path for r in records], tf.string),
        "image_id": tf.constant([r.image_id for r in records], tf.int64),
        "boxes": tf.RaggedTensor.from_row_lengths(flat_boxes.astype(np.float32).reshape(-1, 4),
                                                  tf.constant(lengths, tf.int64)),
        "classes": tf.RaggedTensor.from_row_lengths(flat_classes.astype(np.int32), tf.constant(lengths, tf.int64)),
        "difficult": tf.RaggedTensor.from_row_lengths(flat_difficult.astype(bool), tf.constant(lengths, tf.int64)),
    }

    def load(row):
        return {
            "image": decode_detection_image(tf.io.read_file(row["path"])),
            "boxes": tf.reshape(row["boxes"], [-1, 4]),
            "classes": row["classes"],
            "difficult": row["difficult"],
            "image_id": row["image_id"],
        }

    return tf.data.Dataset.from_tensor_slices(table).map(load, num_parallel_calls=tf.data.AUTOTUNE)


def decode_detection_image(data):
    """Encoded bytes -> float32 [H, W, 3] in [0, 1] at the file's size."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image.set_shape([None, None, 3])
    return image


def pad_batch(dataset, batch_size, max_boxes=None, drop_remainder=False):
    """Batch elements whose images share a size (resize or letterbox first).

    Per-box fields are padded up to `max_boxes` (or the batch's largest
    count): boxes with zeros, classes with -1, flags with False; the usual
    dense layout for a detection loss. Other fields batch as they are.
    """
    per_box = {"boxes": ([max_boxes, 4], 0.0), "classes": ([max_boxes], -1), "difficult": ([max_boxes], False)}
    shapes, values = {}, {}
    for key, spec in dataset.element_spec.items():
        if key in per_box:
            shapes[key] = per_box[key][0]
            values[key] = tf.constant(per_box[key][1], spec.dtype)
        else:
            shapes[key] = spec.shape
            values[key] = tf.zeros([], spec.dtype)
    return dataset.padded_batch(batch_size, padded_shapes=shapes, padding_values=values,
                                drop_remainder=drop_remainder)


def read_class_names(class_names, where):
    """`class_names` as a list: given as a list, or a text file with one name a line."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise ConfigError(f"{where}: class-names file {path} not found (expected one name a line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise ConfigError(f"{path}: no class names inside (expected one name a line)")
        return names
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: class names repeat: {names}")
    return names
