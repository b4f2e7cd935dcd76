"""Export in TF Serving layout, loaded in a process that never imports vislearn."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import call_in_fresh_process, quick_fit_args, run_cli


@pytest.fixture(scope="module")
def exported(digits_m_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    result = run_cli(*quick_fit_args(digits_m_root, root / "run", epochs=1, steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("export", root / "run", "--out", root / "models", "--version", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_layout_and_signatures(exported):
    version = exported / "models" / "dann_digits" / "3"
    assert (version / "saved_model.pb").exists() and (version / "variables").is_dir()
    assert (version / "assets.extra" / "vislearn.json").exists()
    saved_model_cli = Path(sys.executable).parent / "saved_model_cli"
    cli = subprocess.run([str(saved_model_cli), "show", "--dir", str(version), "--tag_set", "serve"], capture_output=True, text=True)
    assert "serving_default" in cli.stdout and "predict_images" in cli.stdout
    # An existing version is never overwritten.
    again = run_cli("export", exported / "run", "--out", exported / "models", "--version", "3")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_round_trip_in_fresh_process_matches_in_process_model(exported, digits_m_root):
    version = exported / "models" / "dann_digits" / "3"
    paths = sorted((digits_m_root / "target" / "test" / "4").glob("*.png"))[:3]
    encoded = [p.read_bytes() for p in paths]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in paths])
    result = call_in_fresh_process({  # both signatures in one new process
        "bytes": (str(version), "serving_default", f"dict(images=tf.constant({encoded!r}))"),
        "floats": (str(version), "predict_images", f"dict(images=tf.constant({pixels.tolist()!r}))")})
    assert result["vislearn_imported"] is False
    outputs = result["bytes"]
    probabilities = np.array(outputs["probabilities"])
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    assert outputs["classes"] == probabilities.argmax(-1).tolist()
    assert outputs["labels"] == [str(c) for c in outputs["classes"]]

    # Same numbers as the float signature and as the Keras model in this process.
    from vislearn.recipes import load_trained

    _, model, _ = load_trained(exported / "run")
    np.testing.assert_allclose(model(pixels), probabilities, atol=1e-4)
    np.testing.assert_allclose(result["floats"]["probabilities"], probabilities, atol=1e-4)


def test_predict_writes_annotated_pngs(exported, digits_m_root, tmp_path):
    image = sorted((digits_m_root / "target" / "test" / "4").glob("*.png"))[0]
    result = run_cli("predict", exported / "models" / "dann_digits", image, "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{image}: " in result.stdout
    assert Image.open(tmp_path / f"{image.stem}.png").size[0] >= 28
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run_cli("predict", exported / "models" / "dann_digits", bad)
    assert result.returncode == 2 and f"{bad}: cannot decode image" in result.stderr
