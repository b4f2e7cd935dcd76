"""VOC AP (all-point and 11-point), COCO AP via pycocotools, and their agreement."""

import numpy as np
import pytest

from vislearn.evaluation.detection import (average_precision_per_class, coco_evaluation, detection_metrics,
                                           precision_recall_per_class, voc_ap)


def _box(y, x, size=0.1):
    return [y, x, y + size, x + size]


def _hand_example():
    """One image, three class-0 objects; detections: hit (0.9), miss (0.8), hit (0.7)."""
    truth = [{"image_id": 1, "boxes": [_box(0.1, 0.1), _box(0.5, 0.5), _box(0.1, 0.7)], "classes": [0, 0, 0]}]
    detections = [{"image_id": 1, "boxes": [_box(0.1, 0.1), _box(0.8, 0.1), _box(0.5, 0.5)],
                   "classes": [0, 0, 0], "scores": [0.9, 0.8, 0.7]}]
    return truth, detections


def test_voc_ap_by_hand():
    truth, detections = _hand_example()
    # recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3 -> envelope 1 up to 1/3, 2/3 up to 2/3.
    assert average_precision_per_class(truth, detections, 1)[0] == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))
    # 11-point: precision 1 at recall 0..0.3 (4 points), 2/3 at 0.4..0.6 (3 points), 0 above.
    assert average_precision_per_class(truth, detections, 1, use_07_metric=True)[0] == pytest.approx(6 / 11)
    assert voc_ap([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)


def test_duplicates_difficult_and_absent_classes():
    truth = [{"image_id": 1, "boxes": [_box(0.1, 0.1), _box(0.5, 0.5)], "classes": [0, 0],
              "difficult": [False, True]}]
    # A duplicate of the found object is a false positive; a hit on the
    # difficult one counts as nothing.
    detections = [{"image_id": 1, "boxes": [_box(0.1, 0.1), _box(0.5, 0.5), _box(0.1, 0.1)],
                   "classes": [0, 0, 0], "scores": [0.9, 0.8, 0.7]}]
    aps = average_precision_per_class(truth, detections, 3)
    assert aps[0] == pytest.approx(1.0)
    assert np.isnan(aps[1]) and np.isnan(aps[2])
    metrics = detection_metrics(truth, detections, ["a", "b", "c"])
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["ap50_per_class"] == {"a": pytest.approx(1.0), "b": None, "c": None}
    assert set(metrics) == {"map50", "map", "ap50_per_class"}


def test_perfect_and_empty_detections():
    truth, _ = _hand_example()
    perfect = [{"image_id": 1, "boxes": truth[0]["boxes"], "classes": [0, 0, 0], "scores": [0.9, 0.8, 0.7]}]
    metrics = detection_metrics(truth, perfect, ["shape"])
    assert metrics["map50"] == pytest.approx(1.0) and metrics["map"] == pytest.approx(1.0)
    nothing = detection_metrics(truth, [{"image_id": 1, "boxes": np.zeros((0, 4)), "classes": [], "scores": []}],
                                ["shape"])
    assert nothing["map50"] == 0.0 and nothing["map"] == 0.0


def _synthetic_benchmark(seed=0, images=150, classes=3):
    """Ground truth on a grid (same-class objects never overlap, so VOC's and
    COCO's matching rules pick the same pairs) and noisy detections whose
    scores correlate with their quality, plus spurious ones."""
    rng = np.random.default_rng(seed)
    truth, detections = [], []
    for image_id in range(1, images + 1):
        cells = rng.choice(16, size=rng.integers(1, 7), replace=False)
        boxes = np.array([[0.25 * (c // 4) + 0.03, 0.25 * (c % 4) + 0.03,
                           0.25 * (c // 4) + 0.22, 0.25 * (c % 4) + 0.22] for c in cells])
        labels = rng.integers(0, classes, size=len(cells))
        truth.append({"image_id": image_id, "boxes": boxes, "classes": labels, "height": 320, "width": 480})
        det_boxes, det_labels, det_scores = [], [], []
        for box, label in zip(boxes, labels):
            if rng.random() < 0.15:
                continue  # missed
            noise = rng.normal(0, 0.025, size=4)
            det_boxes.append(box + noise)
            det_labels.append(label if rng.random() > 0.1 else (label + 1) % classes)
            det_scores.append(np.clip(0.9 - 4 * np.abs(noise).mean() + rng.normal(0, 0.1), 0.01, 1))
        for _ in range(rng.integers(0, 4)):  # spurious
            y, x = rng.uniform(0, 0.8, size=2)
            det_boxes.append([y, x, y + rng.uniform(0.05, 0.2), x + rng.uniform(0.05, 0.2)])
            det_labels.append(rng.integers(0, classes))
            det_scores.append(rng.uniform(0.01, 0.7))
        detections.append({"image_id": image_id, "boxes": np.array(det_boxes).reshape(-1, 4),
                           "classes": np.array(det_labels), "scores": np.array(det_scores)})
    return truth, detections


def _coco_101_point(recall, precision):
    """pycocotools' interpolation (COCOeval.accumulate), written out for the test."""
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    thresholds = np.linspace(0.0, 1.0, 101)
    indices = np.searchsorted(recall, thresholds, side="left")
    return np.mean([envelope[i] if i < len(envelope) else 0.0 for i in indices])


def test_ap50_agrees_with_pycocotools():
    truth, detections = _synthetic_benchmark()
    ours = average_precision_per_class(truth, detections, 3)
    evaluator = coco_evaluation(truth, detections, 3)
    # precision[T, R, K, A, M]: IoU 0.5 (iouThrs index 0), recalls, classes, area "all", 100 detections.
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    theirs = precision.mean(axis=0)
    assert 0.3 < ours.mean() < 0.95  # a non-trivial operating point
    # The reported numbers: mean AP50 within 0.005.
    assert abs(ours.mean() - evaluator.stats[1]) < 0.005
    # Per class they differ only by interpolation (all points vs 101 recall
    # samples, a quantisation of up to ~1/100 of precision)...
    np.testing.assert_allclose(ours, theirs, atol=0.01)
    # ...because the matching is the same: our curves interpolated COCO's way
    # give pycocotools' numbers exactly.
    curves = precision_recall_per_class(truth, detections, 3)
    np.testing.assert_allclose([_coco_101_point(*c) for c in curves], theirs, atol=1e-9)
    metrics = detection_metrics(truth, detections, ["a", "b", "c"])
    assert metrics["map50"] == pytest.approx(ours.mean())
    assert metrics["map"] == pytest.approx(evaluator.stats[0]) and metrics["map"] < metrics["map50"]
