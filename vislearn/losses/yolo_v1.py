"""The YOLOv1 loss and the encoder of its S x S training targets.

Layouts (per grid cell, row `i` from the top, column `j` from the left):

- prediction `y_pred` [batch, S, S, B * 5 + C] (or flat [batch, S * S * (B * 5 + C)]):
  B predictors of `(x, y, sqrt_w, sqrt_h, confidence)`, then C class
  probabilities. `x, y` are the box centre's offset inside the cell in [0, 1];
  `sqrt_w, sqrt_h` are square roots of the width and height as fractions of
  the image (darknet's `sqrt=1`: the network regresses the root, so the loss
  compares roots and small boxes weigh more, as the paper asks).
- target `y_true` [batch, S, S, 5 + C], from `encode_yolo_v1_batch`:
  `(x, y, w, h, has_object)` then the one-hot class; `w, h` are plain
  fractions of the image.

Reference:
    Redmon et al., "You Only Look Once: Unified, Real-Time Object Detection",
    CVPR 2016, equation (3); darknet's `detection_layer.c` for the details the
    paper leaves open (a predictor is responsible when its box has the highest
    IoU with the object, or, when no box overlaps it, the smallest RMSE).
"""

import keras
import tensorflow as tf


def encode_yolo_v1_batch(boxes, classes, grid_size, num_classes, difficult=None):
    """Padded batched boxes -> the YOLOv1 target grids, with static shapes.

    The cell holding a box's centre is responsible for it. YOLOv1 predicts
    one object per cell, so when several centres share a cell the first
    listed keeps it (as darknet's loader does); difficult objects are left
    out, as darknet's VOC labels leave them out. Takes the padded batches of
    `vislearn.data.detection.pad_batch` (class -1 marks padding); YoloV1's
    train step calls it, so the data pipeline does not depend on the grid.

    Args:
        boxes: float [batch, M, 4] `rel_yxyx`.
        classes: int [batch, M], -1 for padding.
        grid_size: S.
        num_classes: C.
        difficult: optional bool [batch, M].

    Returns:
        float32 [batch, S, S, 5 + C].
    """
    boxes = tf.cast(boxes, tf.float32)
    classes = tf.cast(classes, tf.int32)
    valid = classes >= 0
    if difficult is not None:
        valid &= ~tf.cast(difficult, tf.bool)
    size = float(grid_size)
    center_y = (boxes[..., 0] + boxes[..., 2]) / 2
    center_x = (boxes[..., 1] + boxes[..., 3]) / 2
    row = tf.clip_by_value(tf.cast(tf.floor(center_y * size), tf.int32), 0, grid_size - 1)
    col = tf.clip_by_value(tf.cast(tf.floor(center_x * size), tf.int32), 0, grid_size - 1)
    cell = row * grid_size + col  # [batch, M]
    count = tf.shape(cell)[1]
    earlier = tf.linalg.band_part(tf.ones([count, count], tf.bool), -1, 0) & ~tf.eye(count, dtype=tf.bool)
    taken = tf.equal(cell[:, :, None], cell[:, None, :]) & earlier[None] & valid[:, None, :]
    first = valid & ~tf.reduce_any(taken, axis=2)
    values = tf.concat([
        tf.stack([center_x * size - tf.cast(col, tf.float32), center_y * size - tf.cast(row, tf.float32),
                  boxes[..., 3] - boxes[..., 1], boxes[..., 2] - boxes[..., 0],
                  tf.ones_like(center_x)], axis=-1),
        tf.one_hot(tf.maximum(classes, 0), num_classes, dtype=tf.float32),
    ], axis=-1)  # [batch, M, 5 + C]
    placement = tf.one_hot(cell, grid_size * grid_size) * tf.cast(first, tf.float32)[..., None]
    grid = tf.einsum("bmk,bmv->bkv", placement, values)
    return tf.reshape(grid, [-1, grid_size, grid_size, 5 + num_classes])


def encode_yolo_v1_targets(boxes, classes, grid_size=7, num_classes=20, difficult=None):
    """One element's boxes -> its S x S x (5 + C) YOLOv1 target grid.

    Args:
        boxes: float [N, 4] `rel_yxyx` (`vislearn.data.detection` elements).
        classes: int [N] class indices.
        grid_size: S.
        num_classes: C.
        difficult: optional bool [N]; those objects are left out.

    Returns:
        float32 [S, S, 5 + C]; see `encode_yolo_v1_batch` for the rule.
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [1, -1, 4])
    classes = tf.reshape(tf.cast(classes, tf.int32), [1, -1])
    if difficult is not None:
        difficult = tf.reshape(difficult, [1, -1])
    return encode_yolo_v1_batch(boxes, classes, grid_size, num_classes, difficult)[0]


def yolo_v1_training_pair(element, grid_size=7, num_classes=20):
    """A resized detection element -> `(image, target grid)` for `model.fit`."""
    target = encode_yolo_v1_targets(element["boxes"], element["classes"], grid_size, num_classes,
                                    element.get("difficult"))
    return element["image"], target


def _corners(center_x, center_y, width, height):
    return (center_y - height / 2, center_x - width / 2, center_y + height / 2, center_x + width / 2)


def _iou(a, b):
    """IoU of boxes given as (ymin, xmin, ymax, xmax) tuples of broadcastable tensors."""
    inter_h = tf.maximum(tf.minimum(a[2], b[2]) - tf.maximum(a[0], b[0]), 0.0)
    inter_w = tf.maximum(tf.minimum(a[3], b[3]) - tf.maximum(a[1], b[1]), 0.0)
    intersection = inter_h * inter_w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return tf.math.divide_no_nan(intersection, union)


@keras.saving.register_keras_serializable(package="vislearn")
class YoloV1Loss(keras.losses.Loss):
    """YOLOv1's sum-squared error over the S x S grid.

    Per image, with `1obj_ij` marking the responsible predictor `j` of a cell
    `i` that holds an object, and `1noobj_ij` every other predictor:

        lambda_coord * sum 1obj_ij [(x - x^)^2 + (y - y^)^2]
      + lambda_coord * sum 1obj_ij [(sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]
      + sum 1obj_ij (C - C^)^2 + lambda_noobj * sum 1noobj_ij C^2
      + lambda_class * sum_i 1obj_i sum_c (p(c) - p^(c))^2

    The responsible predictor is the one whose box has the highest IoU with
    the object (the smallest RMSE of (x, y, w, h) when none overlaps). Its
    confidence target `C^` is that IoU (the paper; darknet's `rescore=1`),
    held constant, or 1 with `confidence_target="one"`. The class term only
    counts cells holding an object. The result is summed per image and, with
    Keras' default reduction, averaged over the batch.

    Args:
        grid_size: S.
        num_boxes: B, predictors per cell.
        num_classes: C.
        lambda_coord: weight of the box terms (paper: 5).
        lambda_noobj: weight of the confidence of predictors without an object (paper: 0.5).
        confidence_target: `"iou"` or `"one"`.
        lambda_class: weight of the class term (paper: 1, no weight).

    Call arguments:
        y_true: [batch, S, S, 5 + C] from `encode_yolo_v1_targets`.
        y_pred: [batch, S, S, B * 5 + C] or flat [batch, S * S * (B * 5 + C)].

    Returns:
        The loss, per image before reduction.

    Reference:
        Redmon et al., "You Only Look Once: Unified, Real-Time Object
        Detection", CVPR 2016 (https://arxiv.org/abs/1506.02640).
    """

    def __init__(self, grid_size=7, num_boxes=2, num_classes=20, lambda_coord=5.0, lambda_noobj=0.5,
                 confidence_target="iou", lambda_class=1.0, name="yolo_v1_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if confidence_target not in ("iou", "one"):
            raise ValueError(f"confidence_target: expected 'iou' or 'one', received {confidence_target!r}")
        self.grid_size = grid_size
        self.num_boxes = num_boxes
        self.num_classes = num_classes
        self.lambda_coord = lambda_coord
        self.lambda_noobj = lambda_noobj
        self.confidence_target = confidence_target
        self.lambda_class = lambda_class

    def call(self, y_true, y_pred):
        s, b, c = self.grid_size, self.num_boxes, self.num_classes
        y_pred = tf.reshape(tf.cast(y_pred, tf.float32), [-1, s, s, b * 5 + c])
        y_true = tf.reshape(tf.cast(y_true, tf.float32), [-1, s, s, 5 + c])

        predicted = tf.reshape(y_pred[..., :b * 5], [-1, s, s, b, 5])
        pred_x, pred_y, pred_sqrt_w, pred_sqrt_h, confidence = tf.unstack(predicted, 5, axis=-1)
        pred_classes = y_pred[..., b * 5:]
        true_x, true_y, true_w, true_h, has_object = (y_true[..., k:k + 1] for k in range(5))
        true_classes = y_true[..., 5:]

        # Responsibility: compare boxes in one frame (cell offsets / S for the
        # centre, image fractions for the size), as darknet does.
        pred_box = _corners(pred_x / s, pred_y / s, tf.square(pred_sqrt_w), tf.square(pred_sqrt_h))
        true_box = _corners(true_x / s, true_y / s, true_w, true_h)
        overlap = _iou(pred_box, true_box)  # [batch, S, S, B]
        rmse = tf.sqrt((pred_x / s - true_x / s) ** 2 + (pred_y / s - true_y / s) ** 2
                       + (tf.square(pred_sqrt_w) - true_w) ** 2 + (tf.square(pred_sqrt_h) - true_h) ** 2)
        any_overlap = tf.reduce_max(overlap, axis=-1, keepdims=True) > 0
        best = tf.where(any_overlap[..., 0], tf.argmax(overlap, axis=-1), tf.argmin(rmse, axis=-1))
        responsible = tf.one_hot(best, b) * has_object  # 1obj_ij
        responsible = tf.stop_gradient(responsible)
        not_responsible = 1.0 - responsible  # 1noobj_ij

        coordinates = ((pred_x - true_x) ** 2 + (pred_y - true_y) ** 2
                       + (pred_sqrt_w - tf.sqrt(true_w)) ** 2 + (pred_sqrt_h - tf.sqrt(true_h)) ** 2)
        target_confidence = tf.stop_gradient(overlap) if self.confidence_target == "iou" else tf.ones_like(overlap)
        object_confidence = (confidence - target_confidence) ** 2
        class_error = tf.reduce_sum((pred_classes - true_classes) ** 2, axis=-1) * has_object[..., 0]

        per_cell = (self.lambda_coord * tf.reduce_sum(responsible * coordinates, axis=-1)
                    + tf.reduce_sum(responsible * object_confidence, axis=-1)
                    + self.lambda_noobj * tf.reduce_sum(not_responsible * tf.square(confidence), axis=-1)
                    + self.lambda_class * class_error)
        return tf.reduce_sum(per_cell, axis=[1, 2])

    def get_config(self):
        config = super().get_config()
        config.update({"grid_size": self.grid_size, "num_boxes": self.num_boxes,
                       "num_classes": self.num_classes, "lambda_coord": self.lambda_coord,
                       "lambda_noobj": self.lambda_noobj, "confidence_target": self.confidence_target,
                       "lambda_class": self.lambda_class})
        return config
