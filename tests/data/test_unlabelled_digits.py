"""digits_ssl / image_folders: unlabelled streams and labelled probe splits."""

import json
import shutil

import numpy as np
import pytest

from helpers import run_cli
from vislearn.config import ConfigError
from vislearn.data import DATASETS
from vislearn.data.make import MAKERS


def test_digits_folders_layout(digits_folders_root):
    info = json.loads((digits_folders_root / "dataset.json").read_text())
    assert info["train"] + info["test"] == 1797 and "digits_folders" in MAKERS
    assert len(list((digits_folders_root / "train").glob("*/*.png"))) == info["train"]
    assert sorted(p.name for p in (digits_folders_root / "test").iterdir()) == [str(c) for c in range(10)]


def test_digits_ssl_stream_has_no_labels_and_probe_splits_have_them(digits_folders_root):
    data = DATASETS["digits_ssl"](root=digits_folders_root, batch_size=32)
    batch = next(iter(data.train))
    assert batch.shape == (32, 32, 32, 3) and 0.0 <= float(np.min(batch)) and float(np.max(batch)) <= 1.0
    images, labels = next(iter(data.probe_test))
    assert images.shape[1:] == (32, 32, 3) and labels.dtype.name == "int64"
    assert data.counts == {"train": 1258, "probe_train": 1258, "probe_test": 539}
    assert data.steps_per_epoch == 40 and data.num_classes == 10


def test_few_labels_probe_is_class_balanced_and_seeded(digits_folders_root):
    data = DATASETS["digits_ssl"](root=digits_folders_root, batch_size=32, probe_labels_per_class=10)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in data.probe_train])
    assert data.counts["probe_train"] == 100 and np.bincount(labels).tolist() == [10] * 10
    again = DATASETS["digits_ssl"](root=digits_folders_root, batch_size=32, probe_labels_per_class=10)
    first, second = next(iter(data.probe_train))[0], next(iter(again.probe_train))[0]
    assert np.array_equal(first.numpy(), second.numpy())
    with pytest.raises(ConfigError, match="probe_labels_per_class: 500 is more than"):
        DATASETS["digits_ssl"](root=digits_folders_root, probe_labels_per_class=500)
    with pytest.raises(ConfigError, match="probe_labels_per_class: expected a positive integer"):
        DATASETS["digits_ssl"](root=digits_folders_root, probe_labels_per_class=0)


def test_targets_for_supervised_and_exemplar_streams(digits_folders_root):
    labelled = DATASETS["digits_ssl"](root=digits_folders_root, batch_size=16, train_targets="labels")
    _, labels = next(iter(labelled.train))
    assert set(labels.numpy()) <= set(range(10))
    exemplars = DATASETS["digits_ssl"](root=digits_folders_root, batch_size=16,
                                       train_targets="exemplars", num_exemplars=64)
    _, indices = next(iter(exemplars.train))
    assert exemplars.steps_per_epoch == 4 and set(indices.numpy()) <= set(range(64))
    with pytest.raises(ConfigError, match="num_exemplars: 5000 must be between 1 and the 1258"):
        DATASETS["digits_ssl"](root=digits_folders_root, train_targets="exemplars", num_exemplars=5000)


def test_image_folders_reads_nested_unlabelled_images(digits_folders_root, tmp_path):
    user = tmp_path / "mine" / "nested"
    shutil.copytree(digits_folders_root / "test" / "3", user)
    data = DATASETS["image_folders"](root=tmp_path / "mine", image_size=[24, 24], batch_size=8)
    assert next(iter(data.train)).shape == (8, 24, 24, 3) and data.probe_train is None
    with_probe = DATASETS["image_folders"](root=tmp_path / "mine", batch_size=8,
                                           probe_train=digits_folders_root / "train",
                                           probe_test=digits_folders_root / "test")
    assert with_probe.num_classes == 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        DATASETS["image_folders"](root=tmp_path / "empty")
    with pytest.raises(ConfigError, match="give both class-per-folder trees or neither"):
        DATASETS["image_folders"](root=tmp_path / "mine", batch_size=8, probe_train=digits_folders_root / "train")


def test_data_make_cli(tmp_path):
    result = run_cli("data", "make", "digits_folders", "--out", tmp_path / "d")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "d" / "train" / "0").is_dir()
