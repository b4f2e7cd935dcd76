"""Task-aligned assignment, CIoU and distribution focal loss of the anchor-free YOLO head.

Layouts (A anchor points over all scales, M padded ground-truth boxes):

- anchor points `[A, 2]` `(y, x)` in pixels of the network input, the
  centres of the feature-map cells;
- boxes `yxyx` in pixels of the network input;
- box distributions: logits `[batch, A, 4, reg_max]` over the distances
  (top, left, bottom, right) from the anchor point to the box sides, in units
  of the anchor's stride; the distance is the distribution's expectation.

Reference:
    Feng, Zhong, Gao, Scott, Huang, "TOOD: Task-aligned One-stage Object
    Detection", ICCV 2021 (https://arxiv.org/abs/2108.07755), equation 9 and
    section 3.2.1 (assignment, normalised alignment targets);
    Li et al., "Generalized Focal Loss", NeurIPS 2020
    (https://arxiv.org/abs/2006.04388) (distribution focal loss);
    Zheng et al., "Distance-IoU Loss", AAAI 2020
    (https://arxiv.org/abs/1911.08287) (CIoU); ultralytics YOLOv8's
    `TaskAlignedAssigner` and `v8DetectionLoss` for the constants (top-k 10,
    alpha 0.5, beta 6, gains box 7.5, cls 0.5, dfl 1.5).
"""

import math

import tensorflow as tf


def complete_iou(boxes1, boxes2, eps=1e-7):
    """Element-wise CIoU of `yxyx` boxes `[..., 4]` (broadcasting).

    CIoU = IoU - rho^2 / c^2 - alpha * v, rho the distance between the box
    centres, c the diagonal of the smallest enclosing box, v = 4 / pi^2 *
    (atan(w2 / h2) - atan(w1 / h1))^2 and alpha = v / (1 - IoU + v), held
    constant as in the paper's gradient. (keras-cv's `compute_ciou` squares
    the 4 / pi^2 factor too, which shrinks the aspect term; hence our own.)
    """
    y1a, x1a, y2a, x2a = tf.unstack(tf.cast(boxes1, tf.float32), 4, axis=-1)
    y1b, x1b, y2b, x2b = tf.unstack(tf.cast(boxes2, tf.float32), 4, axis=-1)
    wa, ha = x2a - x1a, y2a - y1a + eps
    wb, hb = x2b - x1b, y2b - y1b + eps
    inter = (tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
             * tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0))
    union = wa * ha + wb * hb - inter + eps
    iou = inter / union
    enclosing_w = tf.maximum(x2a, x2b) - tf.minimum(x1a, x1b)
    enclosing_h = tf.maximum(y2a, y2b) - tf.minimum(y1a, y1b)
    diagonal = enclosing_w**2 + enclosing_h**2 + eps
    centre_distance = ((x1b + x2b - x1a - x2a) ** 2 + (y1b + y2b - y1a - y2a) ** 2) / 4
    v = (4 / math.pi**2) * tf.square(tf.atan(wb / hb) - tf.atan(wa / ha))
    alpha = tf.stop_gradient(v / (v - iou + (1 + eps)))
    return iou - (centre_distance / diagonal + v * alpha)


def distribution_focal_loss(logits, target):
    """DFL: cross-entropy to the two bins around a continuous target, weighted by nearness.

    Args:
        logits: float `[..., reg_max]`.
        target: float `[...]` in [0, reg_max - 1) (clip it first).

    Returns:
        float `[...]`: `-(r - y) log p_l - (y - l) log p_r` with `l = floor(y)`,
        `r = l + 1`, `p` the softmax of `logits`.
    """
    left = tf.floor(target)
    weight_left = left + 1 - target
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    bins = tf.shape(logits)[-1]
    left_index = tf.cast(left, tf.int32)
    log_left = tf.reduce_sum(log_p * tf.one_hot(left_index, bins), axis=-1)
    log_right = tf.reduce_sum(log_p * tf.one_hot(left_index + 1, bins), axis=-1)
    return -(weight_left * log_left + (1 - weight_left) * log_right)


def anchors_inside_boxes(anchors, boxes, eps=1e-9):
    """bool `[batch, M, A]`: anchor point `(y, x)` strictly inside the `yxyx` box."""
    points = anchors[None, None]  # [1, 1, A, 2]
    low, high = boxes[:, :, None, :2], boxes[:, :, None, 2:]
    return tf.reduce_all((points - low > eps) & (high - points > eps), axis=-1)


def task_aligned_assign(scores, pred_boxes, anchors, gt_boxes, gt_classes, gt_valid, topk=10, alpha=0.5,
                        beta=6.0, eps=1e-9):
    """TOOD's task-aligned assignment of ground truth to anchor points, on padded batches.

    For every ground-truth box g and anchor point a whose centre lies inside g,
    the alignment metric is `t = s^alpha * u^beta`, s the predicted score of
    g's class at a and u the CIoU (clipped at 0) of a's predicted box with g.
    Each g takes the `topk` anchors of highest positive t. An anchor taken by
    several boxes keeps the one its predicted box overlaps most (chosen among
    the boxes that took it, so every assignment respects the top-k). Its class
    target is the soft `t / max_a t * max_a u` of its box (maxima over the
    box's assigned anchors), 0 for the other classes and other anchors.

    Args:
        scores: float `[batch, A, C]` predicted class probabilities.
        pred_boxes: float `[batch, A, 4]` predicted `yxyx` boxes.
        anchors: float `[A, 2]` `(y, x)` anchor points.
        gt_boxes: float `[batch, M, 4]` `yxyx`.
        gt_classes: int `[batch, M]`.
        gt_valid: bool `[batch, M]`, False for padding (and ignored objects).
        topk, alpha, beta: as above (YOLOv8: 10, 0.5, 6.0).

    Returns:
        dict (no gradients) of `boxes` `[batch, A, 4]` (the assigned box;
        meaningless where not foreground), `scores` `[batch, A, C]` soft class
        targets, `foreground` bool `[batch, A]` and `gt_index` int32
        `[batch, A]` (-1 for background).
    """
    scores = tf.cast(scores, tf.float32)
    pred_boxes, gt_boxes = tf.cast(pred_boxes, tf.float32), tf.cast(gt_boxes, tf.float32)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[1]
    num_classes = scores.shape[-1]
    gt_classes = tf.maximum(tf.cast(gt_classes, tf.int32), 0)
    candidate = anchors_inside_boxes(tf.cast(anchors, tf.float32), gt_boxes) & gt_valid[:, :, None]

    # s: the score of each box's class at every anchor, [batch, M, A].
    class_score = tf.gather(tf.transpose(scores, [0, 2, 1]), gt_classes, batch_dims=1)
    overlaps = tf.maximum(complete_iou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]), 0.0)
    overlaps = tf.where(candidate, overlaps, 0.0)
    metric = tf.where(candidate, tf.pow(class_score, alpha) * tf.pow(overlaps, beta), 0.0)

    # Top-k anchors per box as a dense mask; scatter_nd keeps memory at
    # batch * M * k instead of a one-hot of batch * M * k * A.
    k = min(int(topk), int(num_anchors))
    _, top_index = tf.math.top_k(metric, k=k)  # [batch, M, k]
    shape = tf.shape(top_index)
    batch_index = tf.broadcast_to(tf.range(shape[0])[:, None, None], shape)
    gt_index = tf.broadcast_to(tf.range(shape[1])[None, :, None], shape)
    in_top = tf.scatter_nd(tf.stack([batch_index, gt_index, top_index], axis=-1), tf.ones(shape, tf.int32),
                           tf.concat([shape[:2], [num_anchors]], axis=0)) > 0
    positive = in_top & candidate & (metric > 0)

    # One box per anchor: the most overlapping among those that took it.
    best = tf.argmax(tf.where(positive, overlaps, -1.0), axis=1, output_type=tf.int32)  # [batch, A]
    foreground = tf.reduce_any(positive, axis=1)
    positive &= tf.equal(tf.range(num_gt)[None, :, None], best[:, None, :])

    metric = tf.where(positive, metric, 0.0)
    max_metric = tf.reduce_max(metric, axis=2, keepdims=True)
    max_overlap = tf.reduce_max(tf.where(positive, overlaps, 0.0), axis=2, keepdims=True)
    alignment = tf.reduce_max(metric * max_overlap / (max_metric + eps), axis=1)  # [batch, A]
    target_classes = tf.gather(gt_classes, best, batch_dims=1)
    target_scores = tf.one_hot(target_classes, num_classes) * alignment[..., None]
    return {
        "boxes": tf.stop_gradient(tf.gather(gt_boxes, best, batch_dims=1)),
        "scores": tf.stop_gradient(target_scores),
        "foreground": tf.stop_gradient(foreground),
        "gt_index": tf.where(foreground, best, -1),
    }


def anchor_free_loss(class_logits, box_logits, pred_boxes, anchors, strides, gt_boxes, gt_classes, gt_valid,
                     topk=10, alpha=0.5, beta=6.0, box_gain=7.5, cls_gain=0.5, dfl_gain=1.5):
    """YOLOv8's detection loss terms for one (local) batch.

    Classification: binary cross-entropy of every class logit at every anchor
    with the task-aligned soft targets. Box: `1 - CIoU` and DFL over the
    foreground anchors, each weighted by its soft target. All three are
    divided by the sum of the soft targets (at least 1) and multiplied by
    their gains. (Ultralytics also multiplies by the batch size, a constant
    that Adam ignores.)

    Args:
        class_logits: `[batch, A, C]`.
        box_logits: `[batch, A, 4, reg_max]`.
        pred_boxes: `[batch, A, 4]` `yxyx` pixels decoded from `box_logits`.
        anchors: `[A, 2]` pixels; strides: `[A]` pixels per feature cell.
        gt_boxes, gt_classes, gt_valid: see `task_aligned_assign` (pixels).

    Returns:
        dict of scalar `box_loss`, `cls_loss`, `dfl_loss`.
    """
    class_logits = tf.cast(class_logits, tf.float32)
    pred_boxes = tf.cast(pred_boxes, tf.float32)
    reg_max = box_logits.shape[-1]
    target = task_aligned_assign(tf.sigmoid(tf.stop_gradient(class_logits)), tf.stop_gradient(pred_boxes),
                                 anchors, gt_boxes, gt_classes, gt_valid, topk, alpha, beta)
    normaliser = tf.maximum(tf.reduce_sum(target["scores"]), 1.0)
    cls_loss = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=target["scores"],
                                                                     logits=class_logits)) / normaliser

    weight = tf.where(target["foreground"], tf.reduce_sum(target["scores"], axis=-1), 0.0)  # [batch, A]
    box_loss = tf.reduce_sum((1.0 - complete_iou(pred_boxes, target["boxes"])) * weight) / normaliser

    y1, x1, y2, x2 = tf.unstack(target["boxes"], 4, axis=-1)
    ay, ax = anchors[None, :, 0], anchors[None, :, 1]
    distances = tf.stack([ay - y1, ax - x1, y2 - ay, x2 - ax], axis=-1) / strides[None, :, None]
    distances = tf.clip_by_value(distances, 0.0, reg_max - 1 - 0.01)  # the right bin must exist
    dfl = tf.reduce_mean(distribution_focal_loss(box_logits, distances), axis=-1)
    dfl_loss = tf.reduce_sum(dfl * weight) / normaliser
    return {"box_loss": box_gain * box_loss, "cls_loss": cls_gain * cls_loss, "dfl_loss": dfl_gain * dfl_loss}
