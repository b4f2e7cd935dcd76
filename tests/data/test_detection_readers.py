"""shapes_on_photos on disk in COCO / VOC / YOLO, the three readers, TFDS, and bad annotations."""

import json
import logging
import shutil

import numpy as np
import pytest
import tensorflow as tf

from helpers import run_cli
from vislearn.config import ConfigError
from vislearn.data.coco import read_coco
from vislearn.data.detection import pad_batch
from vislearn.data.detection_augment import resize
from vislearn.data.folders import CorruptImageError
from vislearn.data.make import MAKERS
from vislearn.data.shapes import SHAPE_CLASSES
from vislearn.data.voc import read_voc
from vislearn.data.yolo_txt import read_yolo_txt

SMALL = {"n_train": 10, "n_test": 6, "image_size": 96}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The same small set (same seed) written in each format."""
    root = tmp_path_factory.mktemp("shapes")
    return {fmt: MAKERS["shapes_on_photos"](root / fmt, seed=0, file_format=fmt, **SMALL)
            for fmt in ("coco", "voc", "yolo")}


def _read(fmt, root, split="test", **kwargs):
    if fmt == "coco":
        return read_coco(root / "annotations" / f"instances_{split}.json", root / split, **kwargs)
    if fmt == "voc":
        return read_voc(root, split, **kwargs)
    return read_yolo_txt(root / "data.yaml", split, **kwargs)


def _elements(detection_set):
    return list(detection_set.dataset.as_numpy_iterator())


def test_three_formats_read_back_the_same_objects(shapes):
    info = json.loads((shapes["coco"] / "dataset.json").read_text())
    assert info["classes"] == SHAPE_CLASSES and info["test"] == SMALL["n_test"]
    read = {fmt: _read(fmt, root) for fmt, root in shapes.items()}
    reference = _elements(read["coco"])
    assert sum(len(e["classes"]) for e in reference) == info["objects"]["test"]
    for fmt, detection_set in read.items():
        assert detection_set.class_names == SHAPE_CLASSES and detection_set.count == SMALL["n_test"]
        assert detection_set.report == {"clipped_boxes": 0, "dropped_boxes": 0, "skipped_images": 0}
        elements = _elements(detection_set)
        for ours, theirs in zip(elements, reference):
            assert ours["image"].shape == (96, 96, 3) and ours["image"].dtype == np.float32
            assert 0.0 <= ours["image"].min() and ours["image"].max() <= 1.0
            assert ours["boxes"].dtype == np.float32 and ours["classes"].dtype == np.int32
            np.testing.assert_array_equal(ours["classes"], theirs["classes"])
            np.testing.assert_allclose(ours["boxes"], theirs["boxes"], atol=1e-4)
            np.testing.assert_allclose(ours["image"], theirs["image"])


def test_boxes_hold_the_coloured_shapes(shapes):
    """Every box holds saturated shape pixels along its whole extent."""
    for element in _elements(_read("coco", shapes["coco"], "train")):
        assert 1 <= len(element["classes"]) <= 4
        hsv = tf.image.rgb_to_hsv(element["image"]).numpy()
        for ymin, xmin, ymax, xmax in (element["boxes"] * 96).round().astype(int):
            assert ymax > ymin and xmax > xmin
            saturated = hsv[ymin:ymax, xmin:xmax, 1] > 0.4
            assert saturated.mean() > 0.2
            # Tight: the box's first and last rows and columns touch the shape.
            assert saturated[0].any() or saturated[-1].any() or saturated[:, 0].any()


def test_batches_after_resize(shapes):
    dataset = _read("yolo", shapes["yolo"]).dataset.map(lambda e: resize(e, (64, 64)))
    batch = next(iter(pad_batch(dataset, 4, max_boxes=6)))
    assert batch["image"].shape == (4, 64, 64, 3)
    assert batch["boxes"].shape == (4, 6, 4) and batch["classes"].shape == (4, 6)
    assert set(np.unique(batch["classes"].numpy())) - set(range(5)) <= {-1}


def _copy(shapes, fmt, tmp_path):
    return shutil.copytree(shapes[fmt], tmp_path / fmt)


def test_coco_bad_boxes_are_clipped_and_dropped_with_counts(shapes, tmp_path, caplog):
    root = _copy(shapes, "coco", tmp_path)
    path = root / "annotations" / "instances_test.json"
    data = json.loads(path.read_text())
    first, second = data["annotations"][0], data["annotations"][1]
    first["bbox"] = [80.0, -10.0, 40.0, 30.0]  # reaches past the right and top edges of 96x96
    second["bbox"] = [10.0, 10.0, 0.0, 20.0]  # zero width
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="vislearn.data"):
        detection_set = read_coco(path, root / "test")
    assert detection_set.report == {"clipped_boxes": 1, "dropped_boxes": 1, "skipped_images": 0}
    assert "clipped 1 box" in caplog.text and "dropped 1 box" in caplog.text
    total = sum(len(e["classes"]) for e in _elements(detection_set))
    assert total == len(data["annotations"]) - 1
    element = next(e for e in _elements(detection_set) if e["image_id"] == first["image_id"])
    assert any(np.allclose(b, [0.0, 80 / 96, 20 / 96, 1.0]) for b in element["boxes"])


def test_coco_unknown_category_names_the_file(shapes, tmp_path):
    root = _copy(shapes, "coco", tmp_path)
    path = root / "annotations" / "instances_test.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 42
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"instances_test.json.*unknown category_id 42"):
        read_coco(path, root / "test")
    with pytest.raises(ConfigError, match=r"unknown class name 'circle'"):
        read_coco(shapes["coco"] / "annotations" / "instances_test.json", shapes["coco"] / "test",
                  class_names=["square", "triangle", "star", "cross"])


def test_missing_and_corrupt_images(shapes, tmp_path):
    root = _copy(shapes, "coco", tmp_path)
    path = root / "annotations" / "instances_test.json"
    (root / "test" / "test_00001.jpg").unlink()
    with pytest.raises(ConfigError, match=r"test_00001.jpg: image file not found"):
        read_coco(path, root / "test")
    corrupt = root / "test" / "test_00002.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # a truncated JPEG
    skipped = read_coco(path, root / "test", skip_corrupt=True)
    assert skipped.report["skipped_images"] == 2 and skipped.count == SMALL["n_test"] - 2
    assert len(_elements(skipped)) == SMALL["n_test"] - 2
    shutil.copy(shapes["coco"] / "test" / "test_00001.jpg", root / "test" / "test_00001.jpg")
    with pytest.raises(CorruptImageError, match=r"test_00002.jpg: cannot decode image"):
        read_coco(path, root / "test")


def test_voc_unknown_class_and_clipping(shapes, tmp_path, caplog):
    root = _copy(shapes, "voc", tmp_path)
    xml = root / "Annotations" / "test_00000.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<xmax>", "<xmax>1", 1))  # e.g. 50 -> 150 on a 96-wide image
    with caplog.at_level(logging.WARNING, logger="vislearn.data"):
        assert read_voc(root, "test").report["clipped_boxes"] == 1
    first_name = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{first_name}</name>", "<name>hexagon</name>", 1))
    with pytest.raises(ConfigError, match=r"test_00000.xml: unknown class name 'hexagon'"):
        read_voc(root, "test")
    with pytest.raises(ConfigError, match=r"VOC split list not found; splits present: \['test', 'train'\]"):
        read_voc(root, "val")


def test_yolo_bad_lines_name_file_and_line(shapes, tmp_path):
    root = _copy(shapes, "yolo", tmp_path)
    label = root / "labels" / "test" / "test_00000.txt"
    lines = label.read_text().splitlines()
    label.write_text("\n".join([lines[0], "7 0.5 0.5 0.2 0.2"]) + "\n")
    with pytest.raises(ConfigError, match=r"test_00000.txt:2: unknown class index 7"):
        read_yolo_txt(root / "data.yaml", "test")
    label.write_text("0 0.5 0.5\n")
    with pytest.raises(ConfigError, match=r"test_00000.txt:1: expected 'class x_center"):
        read_yolo_txt(root / "data.yaml", "test")
    label.write_text("0 0.95 0.5 0.2 0.2\n1 0.5 0.5 0.0 0.3\n")  # past the right edge; zero width
    report = read_yolo_txt(root / "data.yaml", "test").report
    assert report == {"clipped_boxes": 1, "dropped_boxes": 1, "skipped_images": 0}


def test_tfds_voc_and_coco_from_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from vislearn.data.detection_tfds import load_detection_tfds

    with pytest.raises(ConfigError, match=r"'voc/2007' split 'train' is not prepared in .*does not download"):
        load_detection_tfds("voc/2007", "train", tmp_path / "absent")
    with pytest.raises(ConfigError, match="not supported"):
        load_detection_tfds("mnist", "train", tmp_path)
    for name, classes in (("voc/2007", 20), ("coco/2017", 80)):
        with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path / "mock")):
            detection_set = load_detection_tfds(name, "train", tmp_path / "mock")
            elements = list(detection_set.dataset.as_numpy_iterator())
        assert detection_set.num_classes == classes and len(elements) == 3
        for element in elements:
            assert element["image"].dtype == np.float32 and element["image"].shape[-1] == 3
            assert element["boxes"].shape[1:] == (4,) and len(element["classes"]) == len(element["boxes"])
            assert np.all(element["boxes"][:, 2] > element["boxes"][:, 0])
            assert np.all((0 <= element["classes"]) & (element["classes"] < classes))


@pytest.mark.slow
def test_cli_makes_shapes_in_voc(tmp_path):
    result = run_cli("data", "make", "shapes_on_photos", "--out", tmp_path / "voc", "--format", "voc")
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_voc(tmp_path / "voc", "test", verify_images=False).count == 200
    bad = run_cli("data", "make", "shapes_on_photos", "--out", tmp_path / "x", "--format", "csv")
    assert bad.returncode != 0 and "expected one of ['coco', 'voc', 'yolo']" in bad.stderr
