"""Self-supervised recipes end to end: fit, kNN monitor, metrics, export, from_run transfer."""

import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import call_in_fresh_process, run_cli
from vislearn import recipes
from vislearn.backbones import build_backbone, pretrained_encoder
from vislearn.config import ConfigError

QUICK = ["--set", "train.epochs=2", "--set", "train.steps_per_epoch=2", "--set", "data.batch_size=32"]


@pytest.fixture(scope="module")
def rotnet_run(digits_folders_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ssl") / "rotnet"
    result = run_cli("fit", "rotnet_digits", "--run-dir", run_dir, "--set", f"data.root={digits_folders_root}", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_bundled_recipes_validate():
    for name in ("autoencoder", "denoising_autoencoder", "rotnet", "exemplar", "context_prediction", "supervised"):
        recipe, _ = recipes.load_recipe(f"{name}_digits")
        assert recipe["data"]["name"] == "digits_ssl"


def test_fit_logs_knn_per_epoch_and_writes_protocol_metrics(rotnet_run):
    header, *rows = (rotnet_run / "history.csv").read_text().splitlines()
    assert "knn_top1" in header.split(",") and len(rows) == 2
    knn_column = header.split(",").index("knn_top1")
    assert all(0.0 < float(row.split(",")[knn_column]) <= 1.0 for row in rows)
    metrics = json.loads((rotnet_run / "metrics.json").read_text())
    assert set(metrics) == {"linear_top1", "knn_top1"} and all(0.1 < v <= 1.0 for v in metrics.values())
    assert (rotnet_run / "plots" / "history.png").exists()
    evaluated = run_cli("evaluate", rotnet_run, "--json")
    assert evaluated.returncode == 0 and set(json.loads(evaluated.stdout.strip().splitlines()[-1])) == set(metrics)
    for protocol in ("linear", "knn"):
        evaluated = run_cli("evaluate", rotnet_run, "--protocol", protocol, "--json")
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        key = f"{protocol}_top1"
        assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == {key: pytest.approx(metrics[key], abs=1e-6)}


def test_export_is_an_image_embedder_loaded_without_vislearn(rotnet_run, digits_folders_root, tmp_path):
    result = run_cli("export", rotnet_run, "--out", tmp_path / "serving", "--name", "ssl")
    assert result.returncode == 0, result.stderr[-3000:]
    version = tmp_path / "serving" / "ssl" / "1"
    files = sorted((digits_folders_root / "test" / "7").glob("*.png"))[:3]
    encoded = [f.read_bytes() for f in files]
    result = call_in_fresh_process({signature: (str(version), signature, f"dict(images=tf.constant({encoded!r}))")
                                    for signature in ("embed_image", "serving_default")})
    assert not result["vislearn_imported"]
    outputs = {signature: np.array(result[signature]["embeddings"]) for signature in ("embed_image", "serving_default")}
    np.testing.assert_allclose(outputs["embed_image"], outputs["serving_default"])
    np.testing.assert_allclose(np.linalg.norm(outputs["embed_image"], axis=1), 1.0, rtol=1e-5)
    # Same vectors as the run's encoder in-process.
    encoder, _ = pretrained_encoder(rotnet_run)
    from vislearn.data.folders import decode_image
    images = tf.stack([decode_image(e, [32, 32]) for e in encoded])
    expected = tf.math.l2_normalize(encoder(images), axis=-1).numpy()
    np.testing.assert_allclose(outputs["embed_image"], expected, atol=1e-5)


def test_from_run_loads_the_exact_encoder_weights(rotnet_run):
    spec = {"name": "small_cnn", "width": 16, "depth": 3}
    source, _ = pretrained_encoder(rotnet_run)
    transferred = build_backbone({**spec, "from_run": str(rotnet_run), "trainable": False}, (32, 32, 3))
    assert not transferred.trainable and len(transferred.get_weights()) == len(source.get_weights())
    for a, b in zip(transferred.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)
    fresh = build_backbone(spec, (32, 32, 3))
    assert any(not np.array_equal(a, b) for a, b in zip(fresh.get_weights(), source.get_weights()))


def test_from_run_with_an_incompatible_backbone_names_both(rotnet_run):
    with pytest.raises(ConfigError, match=r"holds backbone \{'name': 'small_cnn', 'width': 16, 'depth': 3\}, "
                                          r"incompatible with the requested backbone \{'name': 'resnet_small'"):
        build_backbone({"name": "resnet_small", "from_run": str(rotnet_run)}, (32, 32, 3))
    with pytest.raises(ConfigError, match="width': 8"):
        build_backbone({"name": "small_cnn", "width": 8, "depth": 3, "from_run": str(rotnet_run)}, (32, 32, 3))


def test_a_recipe_initialises_its_backbone_from_a_pretraining_run(rotnet_run, digits_folders_root, tmp_path):
    run_dir = tmp_path / "transfer"
    result = run_cli("fit", "supervised_digits", "--run-dir", run_dir, "--set", f"data.root={digits_folders_root}",
                     "--set", f"model.backbone.from_run={rotnet_run}", "--set", "model.backbone.trainable=false",
                     "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "data.batch_size=32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads((run_dir / "metrics.json").read_text())) == {"linear_top1", "knn_top1"}


def test_images_smaller_than_the_context_grid_are_a_one_line_error(digits_folders_root, tmp_path):
    result = run_cli("fit", "context_prediction_digits", "--run-dir", tmp_path / "ctx",
                     "--set", f"data.root={digits_folders_root}", "--set", "data.image_size=[24, 24]")
    assert result.returncode == 2
    assert "images of 24x24 are smaller than the 3x3 grid" in result.stderr
    assert "Traceback" not in result.stderr


def test_context_prediction_is_probed_and_exported_as_its_patch_grid(digits_folders_root, tmp_path):
    from vislearn.data.folders import decode_image
    from vislearn.evaluation.representation import representation_metrics
    from vislearn.models.context_prediction import patch_grid_encoder

    run_dir = tmp_path / "ctx"
    result = run_cli("fit", "context_prediction_digits", "--run-dir", run_dir,
                     "--set", f"data.root={digits_folders_root}", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("export", run_dir, "--out", tmp_path / "serving", "--name", "ctx")
    assert result.returncode == 0, result.stderr[-3000:]
    encoded = [f.read_bytes() for f in sorted((digits_folders_root / "test" / "3").glob("*.png"))[:3]]
    result = call_in_fresh_process({"embed_image": (str(tmp_path / "serving" / "ctx" / "1"), "embed_image",
                                                    f"dict(images=tf.constant({encoded!r}))")})
    exported = np.array(result["embed_image"]["embeddings"])
    # The exported vectors and the protocol's numbers are the nine patches' features, not the whole image's.
    recipe, model, data = recipes.load_trained(run_dir)
    assert recipe["model"]["probe_embedding"] == "patch_grid"
    encoder, _ = pretrained_encoder(run_dir)
    grid = patch_grid_encoder(encoder, recipe["model"]["patch_size"], recipe["model"]["gap"], recipe["model"]["patch_scale"])
    images = tf.stack([decode_image(e, [32, 32]) for e in encoded])
    assert exported.shape == (3, 9 * encoder.output_shape[-1])
    np.testing.assert_allclose(exported, tf.math.l2_normalize(grid(images), axis=-1).numpy(), atol=1e-5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = representation_metrics(grid, data.probe_train, data.probe_test)
    assert metrics == {key: pytest.approx(value, abs=1e-6) for key, value in expected.items()}
