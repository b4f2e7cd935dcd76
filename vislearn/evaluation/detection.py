"""Detection metrics: VOC AP at IoU 0.5 and COCO AP@[.5:.95] (keys as in DESIGN.md).

Ground truth and detections are lists of per-image dicts, boxes in
`rel_yxyx` (the detection element format, `vislearn.data.detection`):

- ground truth: `image_id`, `boxes` [N, 4], `classes` [N], optional
  `difficult` [N] (ignored objects) and `height`, `width` (pixels; only
  COCO's small/medium/large breakdown depends on them, not the reported AP).
- detections: `image_id`, `boxes` [M, 4], `classes` [M], `scores` [M].

`map50` follows the VOC devkit (`VOCevaldet`, and py-faster-rcnn's
`voc_eval.py`): per class, detections of all images sorted by score; each is
a true positive when its best-overlapping ground truth of that class and
image has IoU >= 0.5 (pycocotools' rule; the devkit's `>` differs only at
exactly 0.5), is not difficult and was not taken by a higher-scored
detection; otherwise a false positive (detections whose best match is
difficult count as neither). AP is the area under the precision envelope at
every recall change (VOC2010+), or with `use_07_metric` the mean of the
envelope at recall 0, 0.1, ..., 1 (VOC2007). IoU uses continuous
coordinates, like pycocotools, not the devkit's `+1` pixel areas, so both
metrics see the same overlaps.

`map` is pycocotools' AP averaged over IoU 0.50:0.05:0.95, 101 recall points,
up to 100 detections per image; difficult objects are passed as `iscrowd`.
"""

import contextlib
import io

import numpy as np

from vislearn.data.boxes import convert_format, iou


def voc_ap(recall, precision, use_07_metric=False):
    """Average precision from a precision/recall curve (detections sorted by score).

    Args:
        recall: cumulative recall after each detection.
        precision: cumulative precision after each detection.
        use_07_metric: VOC2007's 11-point interpolation instead of all points.

    Returns:
        AP as a float.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        points = []
        for threshold in np.linspace(0.0, 1.0, 11):
            reached = precision[recall >= threshold]
            points.append(reached.max() if reached.size else 0.0)
        return float(np.mean(points))
    # Sentinels so the envelope starts at recall 0 and ends at recall 1 with precision 0.
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope: best precision at recall >= r
    changes = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[changes + 1] - r[changes]) * p[changes + 1]))


def _by_image(entries):
    return {int(e["image_id"]): e for e in entries}


def precision_recall_per_class(ground_truth, detections, num_classes, iou_threshold=0.5):
    """VOC-matched precision/recall curves of each class.

    Returns:
        list of `(recall, precision)` array pairs, one point per detection of
        the class in descending score order; `None` for a class without
        (non-difficult) ground truth.
    """
    truths = _by_image(ground_truth)
    curves = []
    for class_index in range(num_classes):
        # Per image: this class's ground-truth boxes, difficult flags, taken flags.
        gt_boxes, gt_difficult, taken = {}, {}, {}
        positives = 0
        for image_id, truth in truths.items():
            classes = np.asarray(truth["classes"]).reshape(-1)
            mine = classes == class_index
            difficult = np.asarray(truth.get("difficult", np.zeros(len(classes), bool)), bool).reshape(-1)[mine]
            gt_boxes[image_id] = np.asarray(truth["boxes"], np.float64).reshape(-1, 4)[mine]
            gt_difficult[image_id] = difficult
            taken[image_id] = np.zeros(len(difficult), bool)
            positives += int((~difficult).sum())
        if positives == 0:
            curves.append(None)
            continue

        image_ids, scores, boxes = [], [], []
        for detection in detections:
            mine = np.asarray(detection["classes"]).reshape(-1) == class_index
            image_ids += [int(detection["image_id"])] * int(mine.sum())
            scores.append(np.asarray(detection["scores"], np.float64).reshape(-1)[mine])
            boxes.append(np.asarray(detection["boxes"], np.float64).reshape(-1, 4)[mine])
        scores = np.concatenate(scores) if scores else np.zeros(0)
        boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        order = np.argsort(-scores, kind="mergesort")  # stable, as pycocotools sorts

        true_positive = np.zeros(len(order))
        false_positive = np.zeros(len(order))
        for rank, d in enumerate(order):
            image_id = image_ids[d]
            candidates = gt_boxes.get(image_id)
            if candidates is None or len(candidates) == 0:
                false_positive[rank] = 1
                continue
            overlaps = iou(boxes[d:d + 1], candidates)[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou_threshold:
                if gt_difficult[image_id][best]:
                    continue  # a hit on an ignored object: neither right nor wrong
                if not taken[image_id][best]:
                    true_positive[rank] = 1
                    taken[image_id][best] = True
                else:
                    false_positive[rank] = 1  # a duplicate of an already-found object
            else:
                false_positive[rank] = 1
        # Hits on difficult objects leave both counts unchanged; drop those points.
        counted = (true_positive + false_positive) > 0
        tp = np.cumsum(true_positive)[counted]
        fp = np.cumsum(false_positive)[counted]
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        curves.append((recall, precision))
    return curves


def average_precision_per_class(ground_truth, detections, num_classes, iou_threshold=0.5,
                                use_07_metric=False):
    """VOC-style AP of each class.

    Returns:
        float64 array [num_classes]; NaN for a class without (non-difficult)
        ground truth, where AP is undefined.
    """
    curves = precision_recall_per_class(ground_truth, detections, num_classes, iou_threshold)
    return np.array([np.nan if curve is None else voc_ap(*curve, use_07_metric) for curve in curves])


def _coco_objects(ground_truth, detections, num_classes):
    """In-memory pycocotools COCO ground truth and detection lists (pixel xywh)."""
    from pycocotools.coco import COCO

    images, annotations, results = [], [], []
    sizes = {}
    for truth in ground_truth:
        image_id = int(truth["image_id"])
        height, width = float(truth.get("height", 1.0)), float(truth.get("width", 1.0))
        sizes[image_id] = (height, width)
        images.append({"id": image_id, "height": height, "width": width})
        boxes = convert_format(np.asarray(truth["boxes"], np.float64).reshape(-1, 4), "rel_yxyx", "xywh",
                               height, width)
        classes = np.asarray(truth["classes"]).reshape(-1)
        difficult = np.asarray(truth.get("difficult", np.zeros(len(classes), bool)), bool).reshape(-1)
        for box, label, hard in zip(boxes, classes, difficult):
            annotations.append({"id": len(annotations) + 1,  # pycocotools reads id 0 as "unmatched"
                                "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(hard)})
    for detection in detections:
        image_id = int(detection["image_id"])
        height, width = sizes.get(image_id, (1.0, 1.0))
        boxes = convert_format(np.asarray(detection["boxes"], np.float64).reshape(-1, 4), "rel_yxyx", "xywh",
                               height, width)
        for box, label, score in zip(boxes, np.asarray(detection["classes"]).reshape(-1),
                                     np.asarray(detection["scores"]).reshape(-1)):
            results.append({"image_id": image_id, "category_id": int(label) + 1,
                            "bbox": box.tolist(), "score": float(score)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": str(i)} for i in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, results


def coco_evaluation(ground_truth, detections, num_classes):
    """pycocotools COCOeval on in-memory data.

    Returns:
        The evaluated `COCOeval` (its `stats[0]` is AP@[.5:.95], `stats[1]`
        AP@.5, `eval["precision"]` the [T, R, K, A, M] precision table), or
        None when there are no detections (pycocotools cannot load none).
    """
    from pycocotools.cocoeval import COCOeval

    coco, results = _coco_objects(ground_truth, detections, num_classes)
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        coco_detections = coco.loadRes(results)
        evaluator = COCOeval(coco, coco_detections, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def detection_metrics(ground_truth, detections, class_names, use_07_metric=False, coco=True):
    """The detection metrics of DESIGN.md.

    Args:
        ground_truth: list of per-image ground-truth dicts (module docstring).
        detections: list of per-image detection dicts.
        class_names: names of the class indices.
        use_07_metric: VOC2007 11-point AP for `map50` (default: all points).
        coco: also compute `map` with pycocotools.

    Returns:
        dict with `map50` (mean VOC AP at IoU 0.5 over classes that have
        ground truth), `map` (COCO AP@[.5:.95]; absent when `coco=False`) and
        `ap50_per_class` (name -> AP, None for classes without ground truth).
    """
    aps = average_precision_per_class(ground_truth, detections, len(class_names), 0.5, use_07_metric)
    present = ~np.isnan(aps)
    metrics = {
        "map50": float(np.mean(aps[present])) if present.any() else 0.0,
        "ap50_per_class": {str(n): (None if np.isnan(a) else float(a)) for n, a in zip(class_names, aps)},
    }
    if coco:
        evaluator = coco_evaluation(ground_truth, detections, len(class_names))
        metrics["map"] = float(max(evaluator.stats[0], 0.0)) if evaluator is not None else 0.0
    return metrics


def collect_ground_truth(dataset):
    """Ground-truth dicts from an unbatched dataset of detection elements."""
    truths = []
    for element in dataset.as_numpy_iterator():
        height, width = element["image"].shape[:2]
        truths.append({"image_id": int(element["image_id"]), "boxes": element["boxes"],
                       "classes": element["classes"], "difficult": element["difficult"],
                       "height": height, "width": width})
    return truths


def evaluate_detector(model, test, class_names, batch_size=16, score_threshold=0.005, iou_threshold=0.5,
                      max_detections=100):
    """`detection_metrics` of a detector on an unbatched dataset of detection elements.

    Args:
        model: has `detect(images, score_threshold, iou_threshold, max_detections)`
            returning padded `detection_boxes` (`rel_yxyx` on its input),
            `detection_scores`, `detection_classes` and `num_detections`.
        test: elements at the model's input size (normalised boxes on the
            resized image equal those on the original).
        class_names: names of the class indices.
        score_threshold, iou_threshold, max_detections: decoding settings
            (a low score threshold, as mAP ranks every detection).

    Returns:
        dict with `map50`, `map` and `ap50_per_class` (`detection_metrics`).
    """
    import tensorflow as tf

    from vislearn.data.detection import pad_batch

    ground_truth, detections = [], []
    detect = tf.function(lambda images: model.detect(images, score_threshold, iou_threshold, max_detections))
    for batch in pad_batch(test, batch_size).as_numpy_iterator():
        outputs = {k: v.numpy() for k, v in detect(tf.constant(batch["image"])).items()}
        for i in range(len(batch["image"])):
            n = int(outputs["num_detections"][i])
            height, width = batch["image"].shape[1:3]
            real = batch["classes"][i] >= 0  # pad_batch pads with class -1
            ground_truth.append({"image_id": int(batch["image_id"][i]), "boxes": batch["boxes"][i][real],
                                 "classes": batch["classes"][i][real], "difficult": batch["difficult"][i][real],
                                 "height": height, "width": width})
            detections.append({"image_id": int(batch["image_id"][i]),
                               "boxes": outputs["detection_boxes"][i, :n],
                               "scores": outputs["detection_scores"][i, :n],
                               "classes": outputs["detection_classes"][i, :n]})
    return detection_metrics(ground_truth, detections, class_names)
