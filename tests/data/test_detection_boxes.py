"""Box format conversions and IoU, cross-checked against keras-cv."""

import numpy as np
import pytest
import tensorflow as tf

from vislearn.data.boxes import FORMATS, area, convert_format, iou


def _random_yxyx(rng, n, height, width):
    corners = rng.uniform(0, 1, size=(n, 2, 2)) * [height, width]
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


@pytest.mark.parametrize("target", FORMATS)
def test_round_trip_through_every_format(target):
    rng = np.random.default_rng(0)
    height, width = 120.0, 200.0
    boxes = _random_yxyx(rng, 10, height, width)
    there = convert_format(boxes, "yxyx", target, height, width)
    back = convert_format(there, target, "yxyx", height, width)
    np.testing.assert_allclose(back, boxes, atol=1e-9)
    # Tensors in, tensors out, same numbers.
    tensor = convert_format(tf.constant(boxes, tf.float32), "yxyx", target, height, width)
    assert isinstance(tensor, tf.Tensor)
    np.testing.assert_allclose(tensor.numpy(), there, rtol=1e-5, atol=1e-3)


def test_known_values():
    box = np.array([[10.0, 20.0, 50.0, 100.0]])  # ymin, xmin, ymax, xmax on a 100 x 200 image
    np.testing.assert_allclose(convert_format(box, "yxyx", "xywh"), [[20, 10, 80, 40]])
    np.testing.assert_allclose(convert_format(box, "yxyx", "xyxy"), [[20, 10, 100, 50]])
    np.testing.assert_allclose(convert_format(box, "yxyx", "rel_center_xywh", 100, 200), [[0.3, 0.3, 0.4, 0.4]])
    np.testing.assert_allclose(convert_format(box, "yxyx", "rel_yxyx", 100, 200), [[0.1, 0.1, 0.5, 0.5]])
    with pytest.raises(ValueError, match="height and width"):
        convert_format(box, "yxyx", "rel_yxyx")
    with pytest.raises(ValueError, match="unknown box format"):
        convert_format(box, "yxyx", "cxcywh")


def test_conversions_agree_with_keras_cv():
    from keras_cv import bounding_box

    rng = np.random.default_rng(1)
    height, width = 64, 96
    boxes = _random_yxyx(rng, 7, height, width).astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for target in ("xyxy", "xywh", "center_xywh", "rel_yxyx", "rel_xyxy"):
        theirs = bounding_box.convert_format(boxes, source="yxyx", target=target, images=image)
        np.testing.assert_allclose(convert_format(boxes, "yxyx", target, height, width),
                                   np.asarray(theirs), rtol=1e-5, atol=1e-4)


def test_iou_known_values_and_keras_cv():
    a = np.array([[0.0, 0.0, 10.0, 10.0]])
    b = np.array([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20, 20, 30, 30], [3, 3, 3, 8]])
    np.testing.assert_allclose(iou(a, b), [[25 / 175, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(area(b), [100, 100, 100, 0])

    from keras_cv import bounding_box

    rng = np.random.default_rng(2)
    boxes1 = _random_yxyx(rng, 6, 50, 50).astype(np.float32)
    boxes2 = _random_yxyx(rng, 9, 50, 50).astype(np.float32)
    theirs = bounding_box.compute_iou(boxes1, boxes2, bounding_box_format="yxyx")
    np.testing.assert_allclose(iou(boxes1, boxes2), np.asarray(theirs), atol=1e-5)
    np.testing.assert_allclose(iou(tf.constant(boxes1), tf.constant(boxes2)).numpy(), np.asarray(theirs), atol=1e-5)
