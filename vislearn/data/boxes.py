"""Bounding-box formats, conversions and IoU.

vislearn's detection elements carry boxes as `rel_yxyx`: normalised
`(ymin, xmin, ymax, xmax)` in [0, 1] of the image's height and width (the TFDS
and `tf.image` convention, so resizing an image leaves its boxes unchanged).
Files on disk use other formats; these converters go between them.

Formats (names as in keras-cv's `bounding_box.convert_format`):

- `yxyx`: `(ymin, xmin, ymax, xmax)` in pixels.
- `rel_yxyx`: the same, normalised by (height, width).
- `xyxy`: `(xmin, ymin, xmax, ymax)` in pixels (Pascal VOC XML).
- `rel_xyxy`: the same, normalised.
- `xywh`: `(xmin, ymin, width, height)` in pixels (COCO JSON).
- `center_xywh`: `(x_center, y_center, width, height)` in pixels.
- `rel_center_xywh`: the same, normalised (YOLO txt).

All functions accept numpy arrays or tensors of shape `[..., 4]` and return the
same kind (numpy in, numpy out; tensor in, tensor out).
"""

import numpy as np
import tensorflow as tf

FORMATS = ("yxyx", "rel_yxyx", "xyxy", "rel_xyxy", "xywh", "center_xywh", "rel_center_xywh")


def _ops(boxes):
    """numpy for numpy inputs (readers, evaluation), TF for tensors (tf.data)."""
    if isinstance(boxes, (tf.Tensor, tf.Variable)):
        return tf, lambda parts: tf.stack(parts, axis=-1)
    return np, lambda parts: np.stack(parts, axis=-1)


def convert_format(boxes, source, target, height=None, width=None):
    """Convert boxes between formats.

    Args:
        boxes: float array or tensor `[..., 4]` in `source` format.
        source: one of `FORMATS`.
        target: one of `FORMATS`.
        height: image height in pixels; needed when exactly one of the
            formats is relative (`rel_*`). May broadcast against `boxes[..., 0]`.
        width: image width in pixels; as `height`.

    Returns:
        Boxes `[..., 4]` in `target` format, float.
    """
    for name in (source, target):
        if name not in FORMATS:
            raise ValueError(f"unknown box format {name!r}; expected one of {FORMATS}")
    xp, stack = _ops(boxes)
    boxes = xp.cast(boxes, tf.float32) if xp is tf else np.asarray(boxes, dtype=np.float64)
    if source == target:
        return boxes
    one_relative = source.startswith("rel_") != target.startswith("rel_")
    if one_relative and (height is None or width is None):
        raise ValueError(f"converting {source!r} to {target!r} needs the image height and width")

    # Everything goes through (ymin, xmin, ymax, xmax) in the source's units.
    a, b, c, d = (boxes[..., i] for i in range(4))
    base = source.removeprefix("rel_")
    if base == "yxyx":
        ymin, xmin, ymax, xmax = a, b, c, d
    elif base == "xyxy":
        xmin, ymin, xmax, ymax = a, b, c, d
    elif base == "xywh":
        xmin, ymin, xmax, ymax = a, b, a + c, b + d
    else:  # center_xywh
        xmin, ymin, xmax, ymax = a - c / 2, b - d / 2, a + c / 2, b + d / 2

    if one_relative:
        height = xp.cast(height, boxes.dtype) if xp is tf else np.asarray(height, dtype=boxes.dtype)
        width = xp.cast(width, boxes.dtype) if xp is tf else np.asarray(width, dtype=boxes.dtype)
        if source.startswith("rel_"):
            ymin, ymax, xmin, xmax = ymin * height, ymax * height, xmin * width, xmax * width
        else:
            ymin, ymax, xmin, xmax = ymin / height, ymax / height, xmin / width, xmax / width

    base = target.removeprefix("rel_")
    if base == "yxyx":
        parts = [ymin, xmin, ymax, xmax]
    elif base == "xyxy":
        parts = [xmin, ymin, xmax, ymax]
    elif base == "xywh":
        parts = [xmin, ymin, xmax - xmin, ymax - ymin]
    else:
        parts = [(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin]
    return stack(parts)


def area(boxes):
    """Area of `yxyx`/`rel_yxyx` boxes `[..., 4]`; inverted boxes have area 0."""
    xp, _ = _ops(boxes)
    height = xp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    width = xp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return height * width


def iou(boxes1, boxes2):
    """Pairwise intersection over union of `yxyx` boxes (any consistent units).

    IoU uses continuous coordinates (area = (ymax - ymin) * (xmax - xmin)),
    as pycocotools does, not the VOC devkit's `+1` pixel convention.

    Args:
        boxes1: `[N, 4]` (or `[..., N, 4]`).
        boxes2: `[M, 4]` (or `[..., M, 4]`, same leading dimensions).

    Returns:
        `[N, M]` (or `[..., N, M]`) IoU in [0, 1]; 0 where the union is empty.
    """
    xp, _ = _ops(boxes1)
    if xp is tf:
        boxes1, boxes2 = tf.cast(boxes1, tf.float32), tf.cast(boxes2, tf.float32)
    else:
        boxes1, boxes2 = np.asarray(boxes1, np.float64), np.asarray(boxes2, np.float64)
    a = boxes1[..., :, None, :]
    b = boxes2[..., None, :, :]
    inter_h = xp.maximum(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_w = xp.maximum(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0.0)
    intersection = inter_h * inter_w
    union = area(a) + area(b) - intersection
    if xp is tf:
        return tf.math.divide_no_nan(intersection, union)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def clip(boxes, low=0.0, high=1.0):
    """Clip `rel_yxyx` (or `yxyx` with `high` = the size) boxes to the image."""
    xp, _ = _ops(boxes)
    return xp.clip_by_value(boxes, low, high) if xp is tf else np.clip(boxes, low, high)
