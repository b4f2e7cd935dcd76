"""object_crops: a detection set's objects as a labelled classification set (a detector's pretraining data)."""

import json

import numpy as np
import pytest
from PIL import Image

from vislearn.config import ConfigError
from vislearn.data import DATASETS, object_crops

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _write_coco(root, split, images):
    """images: list of [(colour, [x, y, w, h], class name, iscrowd)] drawn as filled squares on black 100x100."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries, annotations = [], []
    for image_id, objects in enumerate(images, 1):
        pixels = np.zeros((100, 100, 3), np.uint8)
        for colour, (x, y, w, h), name, crowd in objects:
            pixels[y:y + h, x:x + w] = colour
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "category_id": {"a": 1, "b": 2}[name], "area": w * h, "iscrowd": crowd})
        Image.fromarray(pixels).save(root / split / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "height": 100, "width": 100})
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": entries, "annotations": annotations,
         "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    _write_coco(root, "train", [
        [(RED, [10, 10, 20, 20], "a", 0), (GREEN, [60, 50, 30, 30], "b", 0)],
        [(BLUE, [40, 40, 10, 10], "a", 1)],  # a crowd (difficult) object: not a training crop
    ])
    _write_coco(root, "test", [[(BLUE, [40, 40, 20, 20], "b", 0)]])
    return root


def test_registered():
    assert DATASETS["object_crops"] is object_crops


def test_each_object_is_a_centred_crop_labelled_with_its_class(squares):
    data = object_crops(squares, image_size=(16, 16), context=2.0, batch_size=2, train_targets="labels")
    assert data.class_names == ["a", "b"] and data.num_classes == 2 and data.image_shape == (16, 16, 3)
    assert data.counts == {"train": 2, "probe_train": 2, "probe_test": 1}
    crops, labels = (np.concatenate(parts) for parts in zip(*data.probe_train.as_numpy_iterator()))
    red, green = crops[np.argsort(labels)]
    assert sorted(labels) == [0, 1]
    # Context 2: the square fills the middle half of its crop, the rest is the black image...
    np.testing.assert_allclose(red[8, 8], [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(red[1, 1], [0, 0, 0], atol=0.02)
    np.testing.assert_allclose(green[8, 8], [0, 1, 0], atol=0.02)
    # ...or grey where the crop reaches past the image (the green square's crop ends at x = 105 of 100).
    np.testing.assert_allclose(green[8, -1], [0.5, 0.5, 0.5], atol=0.02)
    test_crops, test_labels = next(data.probe_test.as_numpy_iterator())
    assert test_labels.tolist() == [1]
    np.testing.assert_allclose(test_crops[0, 8, 8], [0, 0, 1], atol=0.02)
    images, targets = next(iter(data.train))
    assert images.dtype == "float32" and images.shape == (2, 16, 16, 3) and sorted(targets.numpy()) == [0, 1]


def test_bad_context_or_a_set_without_objects_is_a_config_error(squares, tmp_path):
    with pytest.raises(ConfigError, match="data.context"):
        object_crops(squares, context=0.5)
    _write_coco(tmp_path, "train", [[]])
    _write_coco(tmp_path, "test", [[]])
    with pytest.raises(ConfigError, match="no objects"):
        object_crops(tmp_path)
