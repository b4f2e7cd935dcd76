"""Boxes stay on their objects through resize, letterbox and the YOLOv1 augmentation.

Each test paints solid rectangles on a grey image, transforms the element,
and checks each transformed box against the extent of its rectangle's pixels.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from vislearn.data import detection_augment as aug

COLOURS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], np.float32)


def _element(height=60, width=80, rects=((10, 8, 30, 40), (35, 50, 55, 76))):
    """Grey image with coloured rectangles given in pixel (ymin, xmin, ymax, xmax)."""
    image = np.full((height, width, 3), 0.5, np.float32)
    for colour, (y0, x0, y1, x1) in zip(COLOURS, rects):
        image[y0:y1, x0:x1] = colour
    boxes = (np.array(rects) / [height, width, height, width]).astype(np.float32)
    return {"image": tf.constant(image), "boxes": tf.constant(boxes),
            "classes": tf.constant(np.arange(len(rects)), tf.int32),
            "difficult": tf.zeros(len(rects), tf.bool), "image_id": tf.constant(7, tf.int64)}


def _pixel_extent(image, colour):
    """rel_yxyx extent of the pixels closest to `colour`, or None."""
    close = np.abs(image - colour).max(axis=-1) < 0.35
    rows, cols = np.nonzero(close.any(axis=1))[0], np.nonzero(close.any(axis=0))[0]
    if rows.size == 0:
        return None
    h, w = close.shape
    return np.array([rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w])


def _assert_boxes_on_rectangles(element, tolerance_pixels=1.5):
    image = element["image"].numpy()
    h, w = image.shape[:2]
    tolerance = tolerance_pixels * np.array([1 / h, 1 / w, 1 / h, 1 / w])
    for box, label in zip(element["boxes"].numpy(), element["classes"].numpy()):
        extent = _pixel_extent(image, COLOURS[label])
        assert extent is not None, f"box {box} of class {label} has no pixels"
        assert np.all(np.abs(box - extent) <= tolerance), (box, extent)
    assert np.all(element["boxes"].numpy() >= 0) and np.all(element["boxes"].numpy() <= 1)


def test_source_boxes_match_rectangles():
    _assert_boxes_on_rectangles(_element())


def test_resize_keeps_normalised_boxes():
    out = aug.resize(_element(), (96, 96))
    assert out["image"].shape == (96, 96, 3)
    np.testing.assert_allclose(out["boxes"].numpy(), _element()["boxes"].numpy())
    _assert_boxes_on_rectangles(out)


def test_letterbox_and_back():
    element = _element(height=60, width=120)
    out = aug.letterbox(element, (100, 100))
    assert out["image"].shape == (100, 100, 3)
    _assert_boxes_on_rectangles(out)
    # Bars above and below are the fill value.
    np.testing.assert_allclose(out["image"].numpy()[:20], 0.5, atol=1e-6)
    back = aug.unletterbox_boxes(out["boxes"], out["letterbox"])
    np.testing.assert_allclose(back.numpy(), element["boxes"].numpy(), atol=1e-6)


def test_flip_matches_keras_cv_and_pixels():
    element = _element()
    flipped = aug.flip_horizontal(element)
    _assert_boxes_on_rectangles(flipped)
    np.testing.assert_allclose(aug.flip_horizontal(flipped)["boxes"].numpy(), element["boxes"].numpy(), atol=1e-6)

    import keras_cv

    # keras-cv's RandomFlip works on batched tensors; with a 50% chance per
    # image, keep the seed that flips and compare boxes.
    inputs = {"images": element["image"][None],
              "bounding_boxes": {"boxes": element["boxes"][None],
                                 "classes": tf.cast(element["classes"], tf.float32)[None]}}
    for seed in range(10):
        result = keras_cv.layers.RandomFlip("horizontal", bounding_box_format="rel_yxyx", seed=seed)(inputs)
        if not np.allclose(result["images"][0].numpy(), element["image"].numpy()):
            theirs = result["bounding_boxes"]["boxes"]
            theirs = theirs.to_tensor() if isinstance(theirs, tf.RaggedTensor) else theirs
            np.testing.assert_allclose(theirs[0].numpy(), flipped["boxes"].numpy(), atol=1e-6)
            break
    else:
        pytest.fail("keras-cv RandomFlip never flipped in 10 seeds")


@pytest.mark.parametrize("scale,shift_y,shift_x",
                         [(1.0, 0.0, 0.0), (1.2, 0.1, -0.15), (0.8, -0.2, 0.2), (1.15, 0.0, 0.2)])
def test_scale_translate_moves_boxes_with_pixels(scale, shift_y, shift_x):
    element = aug.resize(_element(), (64, 64))
    out = aug.scale_translate(element, scale, shift_y, shift_x)
    assert out["image"].shape == (64, 64, 3)
    _assert_boxes_on_rectangles(out)
    if (scale, shift_y, shift_x) == (1.0, 0.0, 0.0):
        np.testing.assert_allclose(out["image"].numpy(), element["image"].numpy(), atol=1e-5)


def test_scale_translate_drops_boxes_pushed_out():
    element = _element()  # the second rectangle lies in the right third
    out = aug.scale_translate(element, 1.0, 0.0, -0.98)
    assert out["boxes"].shape[0] == 0 and out["classes"].shape[0] == 0 and out["difficult"].shape[0] == 0
    out = aug.scale_translate(element, 1.0, 0.0, 0.5)  # first stays (clipped), second leaves
    assert out["classes"].numpy().tolist() == [0]
    assert out["boxes"].numpy()[0, 3] == pytest.approx(1.0)


def test_exposure_saturation_in_hsv():
    element = _element()
    out = aug.adjust_exposure_saturation(element, 0.5, 1.0)
    np.testing.assert_allclose(out["image"].numpy(), element["image"].numpy() * 0.5, atol=1e-5)
    np.testing.assert_allclose(out["boxes"].numpy(), element["boxes"].numpy())
    desaturated = aug.adjust_exposure_saturation(element, 1.0, 0.0)["image"].numpy()
    np.testing.assert_allclose(desaturated.std(axis=-1), 0.0, atol=1e-5)  # grey everywhere
    hsv = tf.image.rgb_to_hsv(aug.adjust_exposure_saturation(element, 1.0, 1.5)["image"]).numpy()
    assert hsv[..., 1].max() <= 1.0 and hsv[..., 2].max() <= 1.0


@pytest.mark.parametrize("exposure,saturation", [(1.5, 1.5), (0.67, 0.67), (1.5, 0.67), (0.67, 1.5), (1.0, 3.0)])
def test_exposure_saturation_equals_the_hsv_round_trip(exposure, saturation):
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, (16, 16, 3)).astype("float32")
    image[0, :4] = [[0, 0, 0], [0.5, 0.5, 0.5], [1, 1, 1], [1, 0, 0]]  # black, grey, white, pure red
    hue, sat, value = tf.unstack(tf.image.rgb_to_hsv(image), 3, axis=-1)
    expected = tf.image.hsv_to_rgb(tf.stack([hue, tf.clip_by_value(sat * saturation, 0.0, 1.0),
                                             tf.clip_by_value(value * exposure, 0.0, 1.0)], axis=-1))
    out = aug.adjust_exposure_saturation({"image": tf.constant(image)}, exposure, saturation)["image"]
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=2e-5)


def test_yolo_v1_augment_keeps_boxes_on_objects_in_tf_data():
    keras.utils.set_random_seed(3)
    element = _element()
    dataset = tf.data.Dataset.from_tensors(element).repeat(12).map(
        lambda e: aug.yolo_v1_augment(e, size=(64, 64), max_exposure=1.0, max_saturation=1.0))
    sizes = set()
    for out in dataset:
        assert out["image"].shape == (64, 64, 3)
        _assert_boxes_on_rectangles(out, tolerance_pixels=2.0)
        sizes.add(round(float(out["boxes"][0, 2] - out["boxes"][0, 0]), 3))
    assert len(sizes) > 3  # the scale really varies
    # With colour jitter on, the values stay images.
    jittered = next(iter(tf.data.Dataset.from_tensors(element).map(lambda e: aug.yolo_v1_augment(e, size=(64, 64)))))
    assert 0.0 <= float(tf.reduce_min(jittered["image"])) and float(tf.reduce_max(jittered["image"])) <= 1.0
