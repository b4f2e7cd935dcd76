"""Anchor-free YOLO: per-scale outputs, task-aligned assignment, CIoU/DFL, overfitting, detect, config.

Models take 64x64 inputs; only the overfitting test traces a graph (the
~70-conv network costs tens of seconds to trace), the rest run eagerly.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from vislearn.data.boxes import iou
from vislearn.losses.yolo_anchor_free import complete_iou, distribution_focal_loss, task_aligned_assign
from vislearn.models.yolo_anchor_free import YoloAnchorFree, anchor_points

TINY = dict(num_classes=3, image_shape=(64, 64, 3), width_multiplier=0.0625, depth_multiplier=0.33)


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return YoloAnchorFree(**TINY)


def test_outputs_per_scale_and_anchor_points(tiny):
    outputs = tiny(np.zeros((2, 64, 64, 3), "float32"))
    assert [tuple(o.shape) for o in outputs] == [(2, 8, 8, 4 * 16 + 3), (2, 4, 4, 4 * 16 + 3), (2, 2, 2, 4 * 16 + 3)]
    anchors, strides = anchor_points((64, 64))
    assert anchors.shape == (64 + 16 + 4, 2) and strides.tolist() == [8] * 64 + [16] * 16 + [32] * 4
    np.testing.assert_allclose(anchors[:2], [[4, 4], [4, 12]])  # (y, x) cell centres, row-major
    np.testing.assert_allclose(anchors[64], [8, 8])
    bns = [l for m in [tiny.features, *tiny.heads] for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and {bn.momentum for bn in bns} == {0.9}
    with pytest.raises(ValueError, match="multiples of 32"):
        YoloAnchorFree(image_shape=(100, 64, 3))


# ---------------------------------------------------------------- CIoU and DFL against numpy


def _ciou_reference(a, b):
    """CIoU from the paper's definitions, boxes (ymin, xmin, ymax, xmax)."""
    h1, w1, h2, w2 = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    iou = inter / (h1 * w1 + h2 * w2 - inter)
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    return iou - rho2 / c2 - (v**2 / (1 - iou + v) if v > 0 else 0.0)


def test_complete_iou_matches_the_paper():
    pairs = [([0, 0, 10, 10], [0, 0, 10, 10]), ([0, 0, 10, 10], [5, 5, 15, 15]), ([0, 0, 10, 4], [2, 1, 8, 9]),
             ([0, 0, 2, 2], [10, 10, 12, 20]), ([3.0, 1.0, 9.5, 7.0], [2.0, 2.5, 9.0, 5.0])]
    a, b = (np.array([p[i] for p in pairs], "float32") for i in (0, 1))
    ours = complete_iou(a, b).numpy()
    np.testing.assert_allclose(ours, [_ciou_reference(x, y) for x, y in pairs], atol=1e-5)
    assert ours[0] == pytest.approx(1.0, abs=1e-5) and ours[3] < 0  # far apart: negative


def test_distribution_focal_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 16)).astype("float32")
    target = np.array([0.0, 3.25, 7.5, 14.0, 14.99], "float32")
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    left = np.floor(target).astype(int)
    rows = np.arange(5)
    expected = -((left + 1 - target) * np.log(p[rows, left]) + (target - left) * np.log(p[rows, left + 1]))
    np.testing.assert_allclose(distribution_focal_loss(logits, target).numpy(), expected, rtol=1e-5)
    # Minimised by the two-bin distribution around the target, whose expectation is the target.
    sharp = np.full((1, 16), -30.0, "float32")
    sharp[0, 3], sharp[0, 4] = np.log(0.75), np.log(0.25)
    best = distribution_focal_loss(sharp, np.float32([3.25]))
    assert best.numpy()[0] < distribution_focal_loss(logits[1:2], np.float32([3.25])).numpy()[0]
    assert (np.exp(sharp[0]) * np.arange(16)).sum() == pytest.approx(3.25, abs=1e-5)


# ---------------------------------------------------------------- task-aligned assignment


def _assign_reference(scores, pred, anchors, gt, classes, valid, topk, alpha=0.5, beta=6.0):
    """The assignment written out with loops (ties cannot occur with random predictions)."""
    batch, count, num_classes = scores.shape
    gt_index = np.full((batch, count), -1)
    target = np.zeros_like(scores)
    for b in range(batch):
        metric, overlap, taken = (np.zeros((gt.shape[1], count)) for _ in range(3))
        for g in np.flatnonzero(valid[b]):
            for a in range(count):
                (y, x), box = anchors[a], gt[b, g]
                if box[0] < y < box[2] and box[1] < x < box[3]:
                    overlap[g, a] = max(_ciou_reference(box, pred[b, a]), 0.0)
                    metric[g, a] = scores[b, a, classes[b, g]] ** alpha * overlap[g, a] ** beta
            best = [a for a in np.argsort(-metric[g])[:topk] if metric[g, a] > 0]
            taken[g, best] = 1
        for a in range(count):
            owners = np.flatnonzero(taken[:, a])
            if len(owners):
                gt_index[b, a] = owners[np.argmax(overlap[owners, a])]
        for g in range(gt.shape[1]):
            mine = np.flatnonzero(gt_index[b] == g)
            if len(mine):
                norm = metric[g, mine] / metric[g, mine].max() * overlap[g, mine].max()
                target[b, mine, classes[b, g]] = norm
    return gt_index, target


def _assignment_case():
    """64x64 images: two overlapping boxes sharing anchors, a padding row, an ignored object."""
    anchors, _ = anchor_points((64, 64))
    rng = np.random.default_rng(1)
    count = len(anchors)
    scores = rng.uniform(0.01, 0.99, (2, count, 3)).astype("float32")
    # Predicted boxes around their anchor points, of random extent.
    extent = rng.uniform(2, 24, (2, count, 4))
    pred = np.concatenate([anchors - extent[..., :2], anchors + extent[..., 2:]], axis=-1).astype("float32")
    gt = np.array([[[4, 4, 40, 44], [20, 16, 60, 56], [0, 0, 0, 0]],
                   [[30, 6, 50, 26], [2, 30, 62, 62], [0, 0, 0, 0]]], "float32")
    classes = np.array([[0, 2, -1], [1, 1, -1]], "int32")
    valid = np.array([[True, True, False], [True, False, False]])  # image 1's second object ignored
    return scores, pred, anchors, gt, classes, valid


def test_task_aligned_assignment_invariants_and_reference():
    scores, pred, anchors, gt, classes, valid = _assignment_case()
    topk = 4
    out = {k: v.numpy() for k, v in task_aligned_assign(scores, pred, anchors, gt, classes, valid, topk=topk).items()}
    gt_index, foreground = out["gt_index"], out["foreground"]
    assert foreground.any(axis=1).all()
    for b, a in zip(*np.nonzero(foreground)):
        g = gt_index[b, a]
        assert valid[b, g], "padding or ignored objects are never assigned"
        (y, x), box = anchors[a], gt[b, g]
        assert box[0] < y < box[2] and box[1] < x < box[3], "an anchor outside its box was assigned"
        np.testing.assert_allclose(out["boxes"][b, a], box)
        # One box per anchor: the soft target has one non-zero class, the box's.
        assert np.count_nonzero(out["scores"][b, a]) == 1 and out["scores"][b, a, classes[b, g]] > 0
    assert (gt_index[~foreground] == -1).all() and (out["scores"][~foreground] == 0).all()
    for b in range(2):
        for g in np.flatnonzero(valid[b]):
            assert 1 <= (gt_index[b] == g).sum() <= topk
    # The two boxes of image 0 compete for shared anchors, so the tie rule is exercised.
    inside = [(anchors[:, 0] > box[0]) & (anchors[:, 0] < box[2]) & (anchors[:, 1] > box[1]) & (anchors[:, 1] < box[3])
              for box in gt[0, :2]]
    assert (inside[0] & inside[1]).sum() >= 2

    expected_index, expected_scores = _assign_reference(scores, pred, anchors, gt, classes, valid, topk)
    np.testing.assert_array_equal(gt_index, expected_index)
    np.testing.assert_allclose(out["scores"], expected_scores, rtol=1e-4, atol=1e-6)


def test_assignment_with_no_objects_is_all_background():
    scores, pred, anchors, gt, classes, _ = _assignment_case()
    out = task_aligned_assign(scores, pred, anchors, gt, classes, np.zeros((2, 3), bool))
    assert not out["foreground"].numpy().any() and float(tf.reduce_sum(out["scores"])) == 0.0


# ---------------------------------------------------------------- training, detect, config


def _one_batch():
    """Two 64x64 images with flat-coloured squares on noise, boxes `rel_yxyx`."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 0.3, (2, 64, 64, 3)).astype("float32")
    boxes = np.zeros((2, 4, 4), "float32")
    classes = np.full((2, 4), -1, "int32")
    objects = [(0, [8, 8, 32, 36], 0), (0, [36, 30, 60, 58], 1), (1, [16, 20, 48, 52], 2)]
    for image, (y0, x0, y1, x1), cls in objects:
        images[image, y0:y1, x0:x1] = np.eye(3)[cls]
        slot = int((classes[image] >= 0).sum())
        boxes[image, slot], classes[image, slot] = np.array([y0, x0, y1, x1]) / 64, cls
    return {"image": images, "boxes": boxes, "classes": classes}


def test_loss_falls_when_overfitting_one_batch_and_detect_finds_the_objects():
    keras.utils.set_random_seed(0)
    model = YoloAnchorFree(**TINY)
    # Graph mode: tracing costs ~25 s of CPU, but eager steps cost ~3 s each.
    # SGD rather than Adam: its graph traces ~10 s faster; steps are cheap.
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    batch = _one_batch()
    data = tf.data.Dataset.from_tensors(batch).repeat()
    first = model.fit(data, steps_per_epoch=1, epochs=1, verbose=0).history
    assert set(first) == {"loss", "box_loss", "cls_loss", "dfl_loss"}
    history = model.fit(data, steps_per_epoch=20, epochs=7, verbose=0).history
    for key in ("loss", "box_loss", "cls_loss", "dfl_loss"):
        assert np.isfinite(history[key]).all() and history[key][-1] < first[key][0], key
    assert history["loss"][-1] < 0.5 * first["loss"][0]

    out = {k: v.numpy() for k, v in model.detect(batch["image"], score_threshold=0.2).items()}
    for image in range(2):
        real = batch["classes"][image] >= 0
        n = out["num_detections"][image]
        overlaps = iou(batch["boxes"][image][real], out["detection_boxes"][image, :n])
        for j, cls in enumerate(batch["classes"][image][real]):
            hits = (overlaps[j] >= 0.5) & (out["detection_classes"][image, :n] == cls)
            assert hits.any(), f"image {image}: object {j} (class {cls}) not found"


class _FixedOutputs(YoloAnchorFree):
    """Returns preset head outputs, to check decoding and NMS exactly."""

    preset = None

    def call(self, images, training=False):
        return [tf.tile(o, [tf.shape(images)[0], 1, 1, 1]) for o in self.preset]


def _peaked_outputs(reg_max=16, num_classes=3):
    """Head outputs whose distance distributions put all mass on chosen bins."""
    outputs = [np.full((1, s, s, 4 * reg_max + num_classes), -20.0, "float32") for s in (8, 4, 2)]
    for o in outputs:
        o[..., 0:4 * reg_max:reg_max] = 20.0  # every distance in bin 0: a point box
    def put(level, row, col, distances, cls, logit):
        cell = outputs[level][0, row, col]
        cell[:4 * reg_max] = -20.0
        for side, bins in enumerate(distances):
            cell[side * reg_max + bins] = 20.0
        cell[4 * reg_max + cls] = logit
    put(0, 2, 2, (2, 1, 1, 2), 0, 3.0)  # stride 8, point (20, 20): box y 4..28, x 12..36
    put(0, 2, 3, (2, 2, 1, 1), 0, 1.0)  # point (20, 28), box y 4..28, x 12..36: a duplicate, lower score
    put(1, 2, 2, (1, 1, 1, 1), 2, 2.0)  # stride 16, point (40, 40): box 24..56 both ways
    put(1, 2, 2, (1, 1, 1, 1), 1, 0.0)  # the same box with another class (score 0.5) survives NMS
    return [tf.constant(o) for o in outputs]


def test_detect_decodes_boxes_and_runs_per_class_nms():
    model = _FixedOutputs(**TINY)
    model.preset = _peaked_outputs()
    out = {k: v.numpy() for k, v in model.detect(np.zeros((2, 64, 64, 3), "float32"), score_threshold=0.3,
                                                 iou_threshold=0.5, max_detections=7).items()}
    assert out["detection_boxes"].shape == (2, 7, 4) and out["detection_scores"].shape == (2, 7)
    assert out["detection_classes"].dtype == np.int32 and out["num_detections"].dtype == np.int32
    assert out["num_detections"].tolist() == [3, 3]
    np.testing.assert_allclose(out["detection_scores"][0, :3], 1 / (1 + np.exp([-3.0, -2.0, 0.0])), rtol=1e-5)
    assert out["detection_classes"][0, :3].tolist() == [0, 2, 1]
    np.testing.assert_allclose(out["detection_boxes"][0, :3],
                               np.array([[4, 12, 28, 36], [24, 24, 56, 56], [24, 24, 56, 56]]) / 64, atol=1e-5)
    assert (out["detection_boxes"][:, 3:] == 0).all() and (out["detection_scores"][:, 3:] == 0).all()


def test_config_round_trip_rebuilds_the_same_model(tiny):
    config = json.loads(json.dumps(tiny.get_config()))
    assert keras.saving.get_registered_object("vislearn>YoloAnchorFree") is YoloAnchorFree
    clone = YoloAnchorFree.from_config(config)
    clone.set_weights(tiny.get_weights())
    x = np.random.default_rng(0).random((2, 64, 64, 3)).astype("float32")
    for ours, theirs in zip(tiny(x), clone(x)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert clone.get_config() == config and clone.reg_max == 16 and clone.topk == 10
