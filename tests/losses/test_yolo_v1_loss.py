"""YOLOv1 loss against a loop-by-loop numpy reference, and its target encoder."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from vislearn.losses.yolo_v1 import YoloV1Loss, encode_yolo_v1_targets, yolo_v1_training_pair

S, B, C = 2, 2, 3


def _iou(a, b):
    """a, b: (cx, cy, w, h)."""
    ay0, ax0, ay1, ax1 = a[1] - a[3] / 2, a[0] - a[2] / 2, a[1] + a[3] / 2, a[0] + a[2] / 2
    by0, bx0, by1, bx1 = b[1] - b[3] / 2, b[0] - b[2] / 2, b[1] + b[3] / 2, b[0] + b[2] / 2
    inter = max(min(ay1, by1) - max(ay0, by0), 0) * max(min(ax1, bx1) - max(ax0, bx0), 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def reference_loss(y_true, y_pred, lambda_coord=5.0, lambda_noobj=0.5, confidence_target="iou", lambda_class=1.0):
    """Equation (3) of the paper written as loops, per image (`lambda_class` 1 in the paper)."""
    losses = []
    for truth_image, pred_image in zip(y_true, y_pred):
        total = 0.0
        for i in range(S):
            for j in range(S):
                truth, pred = truth_image[i, j], pred_image[i, j]
                boxes = [pred[k * 5:(k + 1) * 5] for k in range(B)]
                if truth[4] == 0:
                    total += lambda_noobj * sum(box[4] ** 2 for box in boxes)
                    continue
                true_box = (truth[0] / S, truth[1] / S, truth[2], truth[3])
                pred_boxes = [(box[0] / S, box[1] / S, box[2] ** 2, box[3] ** 2) for box in boxes]
                ious = [_iou(p, true_box) for p in pred_boxes]
                if max(ious) > 0:
                    r = int(np.argmax(ious))
                else:
                    r = int(np.argmin([np.sqrt(sum((p[k] - true_box[k]) ** 2 for k in range(4))) for p in pred_boxes]))
                for k, box in enumerate(boxes):
                    if k != r:
                        total += lambda_noobj * box[4] ** 2
                box = boxes[r]
                total += lambda_coord * ((box[0] - truth[0]) ** 2 + (box[1] - truth[1]) ** 2)
                total += lambda_coord * ((box[2] - np.sqrt(truth[2])) ** 2 + (box[3] - np.sqrt(truth[3])) ** 2)
                target = ious[r] if confidence_target == "iou" else 1.0
                total += (box[4] - target) ** 2
                total += lambda_class * sum((pred[B * 5 + c] - truth[5 + c]) ** 2 for c in range(C))
        losses.append(total)
    return np.array(losses)


def _targets():
    """Two images on a 2x2 grid: objects in cells (0,0) and (1,1); one in cell (0,1)."""
    image_a = encode_yolo_v1_targets([[0.1, 0.1, 0.4, 0.3], [0.6, 0.55, 0.9, 0.95]], [2, 0], S, C)
    image_b = encode_yolo_v1_targets([[0.05, 0.6, 0.45, 0.9]], [1], S, C)
    return np.stack([image_a.numpy(), image_b.numpy()])


def test_encoder_places_objects_in_their_cells():
    y_true = _targets()
    assert y_true.shape == (2, S, S, 5 + C)
    # Box 1: centre (x 0.2, y 0.25) -> cell (0, 0), offsets (0.4, 0.5), size (w 0.2, h 0.3), class 2.
    np.testing.assert_allclose(y_true[0, 0, 0], [0.4, 0.5, 0.2, 0.3, 1, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(y_true[0, 1, 1], [0.5, 0.5, 0.4, 0.3, 1, 1, 0, 0], atol=1e-6)
    assert y_true[0, 0, 1].sum() == 0 and y_true[0, 1, 0].sum() == 0
    np.testing.assert_allclose(y_true[1, 0, 1], [0.5, 0.5, 0.3, 0.4, 1, 0, 1, 0], atol=1e-6)
    # Two centres in one cell: the first listed keeps it; difficult ones are left out.
    shared = encode_yolo_v1_targets([[0.1, 0.1, 0.2, 0.2], [0.0, 0.0, 0.4, 0.4]], [0, 1], S, C).numpy()
    np.testing.assert_allclose(shared[0, 0, 5:], [1, 0, 0])
    assert shared[..., 4].sum() == 1
    skipped = encode_yolo_v1_targets([[0.1, 0.1, 0.2, 0.2]], [0], S, C, difficult=[True]).numpy()
    assert skipped.sum() == 0
    empty = encode_yolo_v1_targets(np.zeros((0, 4)), np.zeros(0), S, C).numpy()
    assert empty.shape == (S, S, 5 + C) and empty.sum() == 0


def test_encoder_in_tf_data():
    element = {"image": tf.zeros((8, 8, 3)), "boxes": tf.constant([[0.1, 0.1, 0.4, 0.3]]),
               "classes": tf.constant([2], tf.int32), "difficult": tf.constant([False]),
               "image_id": tf.constant(0, tf.int64)}
    dataset = tf.data.Dataset.from_tensors(element).map(lambda e: yolo_v1_training_pair(e, S, C)).batch(1)
    image, target = next(iter(dataset))
    assert image.shape == (1, 8, 8, 3) and target.shape == (1, S, S, 5 + C)


@pytest.mark.parametrize("confidence_target, lambda_class", [("iou", 1.0), ("one", 1.0), ("one", 2.5)])
def test_loss_matches_numpy_reference(confidence_target, lambda_class):
    rng = np.random.default_rng(0)
    y_true = _targets()
    y_pred = rng.uniform(0, 1, size=(2, S, S, B * 5 + C)).astype(np.float32)
    # Cell (0,1) of image 0 has no object; cell (0,1) of image 1 gets two
    # predictors far from its object (no overlap), so the RMSE rule decides.
    y_pred[1, 0, 1, :10] = [0.0, 0.0, 0.1, 0.1, 0.3, 0.9, 0.9, 0.1, 0.1, 0.6]
    loss = YoloV1Loss(S, B, C, confidence_target=confidence_target, lambda_class=lambda_class, reduction=None)
    ours = loss(y_true, y_pred).numpy()
    np.testing.assert_allclose(ours, reference_loss(y_true, y_pred, confidence_target=confidence_target,
                                                    lambda_class=lambda_class), rtol=1e-5)
    reduced = YoloV1Loss(S, B, C, confidence_target=confidence_target, lambda_class=lambda_class)(
        y_true, y_pred.reshape(2, -1))
    assert float(reduced) == pytest.approx(ours.mean(), rel=1e-5)


def test_hand_computed_single_object():
    """All-zero predictions, one object: sum the terms by hand."""
    y_true = encode_yolo_v1_targets([[0.1, 0.1, 0.4, 0.3]], [2], S, C).numpy()[None]
    y_pred = np.zeros((1, S, S, B * 5 + C), np.float32)
    # No predictor overlaps (zero size); equal RMSE -> predictor 0. Confidences are 0.
    coords = 5.0 * ((0.4 ** 2 + 0.5 ** 2) + (0.2 + 0.3))  # sqrt terms: (0 - sqrt(w))^2 = w
    confidence = (0 - 0.0) ** 2  # target IoU 0
    classes = 1.0  # one-hot class 2 vs zeros
    expected = coords + confidence + classes
    assert float(YoloV1Loss(S, B, C, reduction=None)(y_true, y_pred)[0]) == pytest.approx(expected, rel=1e-6)
    # A perfect responsible predictor and silent others cost nothing.
    perfect = np.zeros_like(y_pred)
    perfect[0, 0, 0, 5:10] = [0.4, 0.5, np.sqrt(0.2), np.sqrt(0.3), 1.0]
    perfect[0, 0, 0, 10:] = [0, 0, 1]
    assert float(YoloV1Loss(S, B, C, reduction=None)(y_true, perfect)[0]) == pytest.approx(0.0, abs=1e-6)


def test_gradients_finite_and_config_round_trip():
    y_true = tf.constant(_targets())
    y_pred = tf.Variable(tf.random.uniform((2, S, S, B * 5 + C)))
    loss = YoloV1Loss(S, B, C, lambda_coord=4.0, lambda_class=2.0)
    with tf.GradientTape() as tape:
        value = loss(y_true, y_pred)
    gradient = tape.gradient(value, y_pred)
    assert np.all(np.isfinite(gradient.numpy())) and float(tf.reduce_sum(tf.abs(gradient))) > 0
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, YoloV1Loss) and clone.lambda_coord == 4.0 and clone.grid_size == S
    assert clone.lambda_class == 2.0
    assert float(clone(y_true, y_pred)) == pytest.approx(float(value))
    with pytest.raises(ValueError, match="confidence_target"):
        YoloV1Loss(confidence_target="half")


def test_loss_trains_a_tiny_model_with_fit():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    targets = np.repeat(_targets(), 2, axis=0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, strides=4, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(S * S * (B * 5 + C)),
                              keras.layers.Reshape((S, S, B * 5 + C))])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=YoloV1Loss(S, B, C))
    history = model.fit(images, targets, batch_size=2, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
