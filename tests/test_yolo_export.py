"""Detector export: in-graph decoding + NMS, any-size encoded images, loaded without vislearn."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import as_set_args, load_in_fresh_process, run_cli, tiny_yolo_v1_overrides


@pytest.fixture(scope="module")
def exported(data_home, tmp_path_factory):
    """A seconds-long yolo_shapes run, exported with a zero score threshold so
    the untrained network still returns boxes to compare."""
    root = tmp_path_factory.mktemp("yolo_export")
    env = {"VISLEARN_DATA": str(data_home)}
    overrides = tiny_yolo_v1_overrides() + ["export.score_threshold=0.0", "export.max_detections=10"]
    result = run_cli("fit", "yolo_shapes", "--run-dir", root / "run", *as_set_args(overrides), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("export", root / "run", "--out", root / "models", "--version", "1", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _photo(width, height, seed):
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def _encode(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_layout_signatures_and_metadata(exported):
    version = exported / "models" / "yolo_shapes" / "1"
    assert (version / "saved_model.pb").exists()
    metadata = json.loads((version / "assets.extra" / "vislearn.json").read_text())
    assert metadata["kind"] == "detector"
    assert metadata["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    assert metadata["max_detections"] == 10 and metadata["resize"] == "stretch"
    cli = subprocess.run([str(Path(sys.executable).parent / "saved_model_cli"), "show", "--dir", str(version),
                          "--tag_set", "serve", "--signature_def", "serving_default"], capture_output=True, text=True)
    for name in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        assert name in cli.stdout


def test_round_trip_png_and_jpeg_of_any_size_in_a_fresh_process(exported, data_home):
    version = exported / "models" / "yolo_shapes" / "1"
    png_pixels, jpeg_pixels = _photo(120, 80, 0), _photo(50, 90, 1)
    encoded = [_encode(png_pixels, "PNG"), _encode(jpeg_pixels, "JPEG")]
    result = load_in_fresh_process(version, "serving_default", f"images=tf.constant({encoded!r})")
    assert result["vislearn_imported"] is False
    out = {k: np.array(v) for k, v in result["outputs"].items() if k != "detection_labels"}
    assert out["detection_boxes"].shape == (2, 10, 4)
    assert out["detection_scores"].shape == (2, 10) and out["num_detections"].shape == (2,)
    assert (out["num_detections"] > 0).all()
    assert ((out["detection_boxes"] >= 0) & (out["detection_boxes"] <= 1)).all()

    # The same detections as the Keras model on the stretched image, in this process.
    from vislearn.recipes import load_trained

    _, model, _ = load_trained(exported / "run")
    decoded_jpeg = tf.io.decode_jpeg(encoded[1]).numpy()  # JPEG is lossy: compare on its decoded pixels
    for i, pixels in enumerate((png_pixels, decoded_jpeg)):
        image = tf.image.resize(tf.image.convert_image_dtype(pixels, tf.float32), [64, 64], antialias=True)
        expected = model.detect(tf.clip_by_value(image, 0, 1)[None], 0.0, 0.45, 10)
        n = int(expected["num_detections"][0])
        assert out["num_detections"][i] == n
        np.testing.assert_allclose(out["detection_boxes"][i, :n], expected["detection_boxes"][0, :n], atol=1e-4)
        np.testing.assert_allclose(out["detection_scores"][i, :n], expected["detection_scores"][0, :n], atol=1e-4)
        names = result["outputs"]["detection_labels"][i][:n]
        classes = out["detection_classes"][i, :n]
        assert names == [["circle", "square", "triangle", "star", "cross"][c] for c in classes]

    # The uint8 signature gives the same answer for the PNG's pixels.
    pixels = load_in_fresh_process(version, "detect_images", f"images=tf.constant({png_pixels[None].tolist()!r}, tf.uint8)")
    np.testing.assert_allclose(pixels["outputs"]["detection_boxes"][0], out["detection_boxes"][0], atol=1e-5)


def test_letterbox_export_maps_boxes_back_to_the_original_image(exported, tmp_path):
    from vislearn.data.detection_augment import letterbox, unletterbox_boxes
    from vislearn.export import export_detector
    from vislearn.recipes import load_trained

    _, model, data = load_trained(exported / "run")
    path = export_detector(model, tmp_path / "lb" / "1", data.image_shape, data.class_names, score_threshold=0.0,
                           max_detections=5, resize="letterbox")
    pixels = _photo(128, 48, 2)
    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures["serving_default"](images=tf.constant([_encode(pixels, "PNG")]))
    element = letterbox({"image": tf.image.convert_image_dtype(pixels, tf.float32), "boxes": tf.zeros([0, 4])},
                        (64, 64))
    expected = model.detect(element["image"][None], 0.0, 0.45, 5)
    n = int(expected["num_detections"][0])
    np.testing.assert_allclose(out["detection_boxes"][0, :n],
                               unletterbox_boxes(expected["detection_boxes"][0, :n], element["letterbox"]), atol=1e-4)


def test_non_image_bytes_are_an_error_not_a_crash(exported):
    version = exported / "models" / "yolo_shapes" / "1"
    loaded = tf.saved_model.load(str(version))
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](images=tf.constant([b"certainly not an image"]))
    # The model keeps serving after the bad request.
    ok = loaded.signatures["serving_default"](images=tf.constant([_encode(_photo(32, 32, 3), "PNG")]))
    assert ok["detection_boxes"].shape == (1, 10, 4)


def test_bad_export_options_are_config_errors(exported, tmp_path):
    from vislearn.config import ConfigError
    from vislearn.export import export_detector
    from vislearn.recipes import load_trained

    _, model, data = load_trained(exported / "run")
    with pytest.raises(ConfigError, match="export.iou_threshold: expected a number in"):
        export_detector(model, tmp_path / "x", data.image_shape, data.class_names, iou_threshold=1.5)


def test_predict_draws_labelled_boxes(exported, tmp_path):
    image = tmp_path / "photo.jpg"
    Image.fromarray(_photo(100, 70, 4)).save(image)
    result = run_cli("predict", exported / "models" / "yolo_shapes", image, "--out", tmp_path / "drawn")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{image}: " in result.stdout and "detection(s)" in result.stdout
    drawn = Image.open(tmp_path / "drawn" / "photo.png")
    assert drawn.size == (100 * 2, 70 * 2)  # small images are scaled up for drawing
    assert np.asarray(drawn).std() > 0
