"""Detection data builders: the three on-disk formats give the same batches; made on first use."""

import numpy as np
import pytest

from vislearn.config import ConfigError
from vislearn.data import DATASETS, detection_folder, shapes_on_photos
from vislearn.data.shapes import make_shapes_on_photos


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection_sets")
    return {fmt: make_shapes_on_photos(root / fmt, seed=3, file_format=fmt, n_train=10, n_test=6, image_size=64)
            for fmt in ("coco", "voc", "yolo")}


def test_registered():
    assert DATASETS["detection_folder"] is detection_folder
    assert DATASETS["shapes_on_photos"] is shapes_on_photos


def test_formats_give_the_same_held_out_objects(made):
    seen = {}
    for fmt, root in made.items():
        data = detection_folder(root, fmt, image_size=(48, 48), batch_size=4, augment=False)
        assert data.class_names == ["circle", "square", "triangle", "star", "cross"]
        assert data.image_shape == (48, 48, 3) and data.counts == {"train": 10, "test": 6}
        assert data.steps_per_epoch == 3
        elements = list(data.test.as_numpy_iterator())
        assert len(elements) == 6 and elements[0]["image"].shape == (48, 48, 3)
        seen[fmt] = sorted((int(c), tuple(np.round(b, 2))) for e in elements
                           for b, c in zip(e["boxes"], e["classes"]))
    assert seen["coco"] == seen["voc"] == seen["yolo"]


def test_training_batches_are_padded_dicts_and_augmented(made):
    data = detection_folder(made["coco"], "coco", image_size=(48, 48), batch_size=4, max_boxes=7, seed=1)
    batch = next(iter(data.train))
    assert batch["image"].shape == (4, 48, 48, 3) and batch["boxes"].shape == (4, 7, 4)
    assert batch["classes"].shape == (4, 7)
    classes = batch["classes"].numpy()
    assert (classes >= -1).all() and (classes >= 0).any()
    assert (batch["boxes"].numpy()[classes < 0] == 0).all()
    assert 0.0 <= float(batch["image"].numpy().min()) and float(batch["image"].numpy().max()) <= 1.0
    validation = next(iter(data.validation))
    assert validation["image"].shape == (4, 48, 48, 3) and validation["boxes"].shape == (4, 7, 4)


def test_augmented_stream_repeats_for_a_seed(made):
    """Stateless draws keyed by the element's position: the same seed gives the
    same jittered batches whatever tf.data's parallel maps do; another seed differs."""
    def first_batches(seed):
        data = detection_folder(made["coco"], "coco", image_size=(48, 48), batch_size=4, seed=seed)
        return [batch["image"].numpy() for batch in data.train.take(4)]

    first, again, other = first_batches(1), first_batches(1), first_batches(2)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not all((a == b).all() for a, b in zip(first, other))


def test_shapes_on_photos_is_made_on_first_use(data_home):
    data = shapes_on_photos(format="yolo", image_size=(48, 48), batch_size=4, n_train=8, n_test=4, source_size=64)
    assert (data_home / "shapes_on_photos-yolo-0-8-4-64" / "dataset.json").exists()
    assert data.counts == {"train": 8, "test": 4}


def test_user_mistakes_are_one_line_errors(made, tmp_path):
    with pytest.raises(ConfigError, match="data.format: unknown value 'pascal'"):
        detection_folder(made["voc"], "pascal")
    with pytest.raises(ConfigError, match="data.batch_size: 64 is larger than the training set"):
        detection_folder(made["coco"], "coco", image_size=(48, 48), batch_size=64)
    with pytest.raises(ConfigError, match="does not exist"):
        detection_folder(tmp_path / "nothing", "coco")
    with pytest.raises(ConfigError, match="instances_val2017.json: COCO annotation file not found"):
        detection_folder(made["coco"], "coco", test_split="val2017")
    with pytest.raises(ConfigError, match="data.image_size"):
        detection_folder(made["coco"], "coco", image_size=(16, 16), batch_size=4)
