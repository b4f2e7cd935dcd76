"""digits -> digits-M on disk, the class-per-folder reader and the TFDS reader."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from helpers import run_cli
from vislearn.config import ConfigError
from vislearn.data import digits_m, domain_folders, domain_tfds
from vislearn.data.folders import image_folder


def test_digits_m_layout_and_counts(digits_m_root):
    info = json.loads((digits_m_root / "dataset.json").read_text())
    assert info["train"] + info["test"] == 1797
    for domain in ("source", "target"):
        for split in ("train", "test"):
            files = list((digits_m_root / domain / split).glob("*/*.png"))
            assert len(files) == info[split]
    # Target = |photo patch - digit|: colourful, unlike the grey source.
    source = np.asarray(Image.open(next((digits_m_root / "source/train/3").glob("*.png"))))
    target = np.asarray(Image.open(next((digits_m_root / "target/train/3").glob("*.png"))))
    assert source.shape == target.shape == (28, 28, 3)
    assert np.all(source[..., 0] == source[..., 1])
    assert np.abs(target[..., 0].astype(int) - target[..., 1]).mean() > 3


def test_domain_data_batches(digits_m_root):
    data = digits_m(root=digits_m_root, batch_size=16)
    batch = next(iter(data.train))
    assert batch["source_image"].shape == (16, 28, 28, 3)
    assert batch["target_image"].shape == (16, 28, 28, 3)
    assert batch["source_label"].dtype.name == "int64"
    assert 0.0 <= float(np.min(batch["source_image"])) and float(np.max(batch["source_image"])) <= 1.0
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        digits_m(root=tmp_path / "nope")
    with pytest.raises(ConfigError, match="image folder not found"):
        domain_folders(tmp_path / "a", tmp_path / "b")


def _tree_with_corrupt_file(tmp_path):
    root = tmp_path / "tree"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return root, bad


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    root, bad = _tree_with_corrupt_file(tmp_path)
    with pytest.raises(ConfigError, match=f"{bad}: cannot decode image"):
        image_folder(root, (8, 8))
    dataset, names, count = image_folder(root, (8, 8), skip_corrupt=True)
    assert names == ["a", "b"] and count == 6
    assert len(list(dataset)) == 6


def test_cli_corrupt_image_and_missing_data_exit_2(digits_m_root, tmp_path):
    result = run_cli("fit", "dann_digits", "--set", f"data.root={tmp_path / 'missing'}",
                     "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and "data.root:" in result.stderr and "Traceback" not in result.stderr


def test_tfds_reader_from_local_data_dir(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        data = domain_tfds("mnist", "mnist", data_dir=str(tmp_path), batch_size=8)
        batch = next(iter(data.train))
    assert batch["source_image"].shape == (8, 28, 28, 3)
    assert data.num_classes == 10


def test_tfds_absent_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"TFDS dataset 'mnist' .* not prepared"):
        domain_tfds("mnist", "mnist", data_dir=str(tmp_path))


def test_data_make_cli_refuses_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = run_cli("data", "make", "digits_m", "--out", tmp_path)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"
