"""Self-supervised pretext models: their steps, their pretext data, their configs."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import run_cli, two_step_fit
from vislearn.config import ConfigError
from vislearn.data import digits_ssl
from vislearn.models import Autoencoder, ContextPrediction, ExemplarCNN, RotNet, Supervised
from vislearn.models.context_prediction import NEIGHBOURS, patch_grid_encoder
from vislearn.models.rotnet import rotate_batch

TINY = {"name": "small_cnn", "width": 8, "depth": 2}


@pytest.fixture(scope="module")
def images(digits_folders_root):
    data = digits_ssl(root=digits_folders_root, batch_size=16)
    return data, next(iter(data.train))


def _fit_and_round_trip(model, dataset, image_shape=(32, 32, 3)):
    keras.utils.set_random_seed(0)
    before = [w.copy() for w in model.encoder.get_weights()]
    history = two_step_fit(model, dataset, optimizer=keras.optimizers.Adam(1e-3))
    assert all(np.isfinite(v).all() for v in history.values()), history
    assert any(not np.allclose(a, b) for a, b in zip(before, model.encoder.get_weights())), "encoder not trained"
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(0).random((2, *image_shape)).astype("float32")
    np.testing.assert_allclose(model.encoder(x), clone.encoder(x), rtol=1e-5, atol=1e-6)
    return history


@pytest.mark.parametrize("corruption", [None, "masking", "gaussian"])
def test_autoencoder_trains_and_reconstructs_the_image_shape(images, corruption):
    data, batch = images
    model = Autoencoder(backbone=TINY, code_size=8, decoder_width=4, corruption=corruption)
    history = _fit_and_round_trip(model, data.train)
    assert set(history) == {"loss", "mse"}
    assert model(batch).shape == batch.shape


def test_denoising_corruptions_mask_pixels_or_add_noise_and_keep_the_clean_image(images):
    _, batch = images
    masking = Autoencoder(backbone=TINY, corruption="masking", corruption_level=0.5)
    corrupted = np.asarray(masking.corrupt(tf.ones_like(batch)))
    assert 0.45 < 1 - corrupted.mean() < 0.55                               # ~half the pixels zeroed
    assert np.all(corrupted.min(-1) == corrupted.max(-1))                   # a pixel, all its channels
    gaussian = Autoencoder(backbone=TINY, corruption="gaussian", corruption_level=0.1)
    noisy = np.asarray(gaussian.corrupt(tf.fill(batch.shape, 0.5)))
    assert 0.08 < noisy.std() < 0.12 and noisy.min() >= 0 and noisy.max() <= 1
    assert np.array_equal(Autoencoder(backbone=TINY).corrupt(batch), batch)
    with pytest.raises(ValueError, match="model.corruption: expected one of"):
        Autoencoder(corruption="salt")


def test_rotations_are_made_inside_the_batch_with_their_labels(images):
    data, batch = images
    rotated, labels = rotate_batch(batch)
    n = batch.shape[0]
    assert rotated.shape[0] == 4 * n and list(np.asarray(labels)) == [k for k in range(4) for _ in range(n)]
    np.testing.assert_array_equal(rotated[n:2 * n], np.rot90(np.asarray(batch), 1, axes=(1, 2)))
    history = _fit_and_round_trip(RotNet(backbone=TINY, head_units=(16,)), data.train)
    assert set(history) == {"loss", "rotation_accuracy"}
    with pytest.raises(ValueError, match="square images"):
        RotNet(image_shape=(32, 24, 3))


def test_rotnet_crops_before_rotating_and_checks_the_crop_scale(images):
    data, batch = images
    model = RotNet(backbone=TINY, head_units=(16,), crop_scale=(0.5, 1.0))
    history = _fit_and_round_trip(model, data.train)
    assert set(history) == {"loss", "rotation_accuracy"} and model.get_config()["crop_scale"] == [0.5, 1.0]
    with pytest.raises(ConfigError, match=r"model.crop_scale: expected 0 < min <= max <= 1, received \[0.0, 1.0\]"):
        RotNet(crop_scale=[0, 1])


def test_rotnet_head_can_read_the_feature_map_before_the_pooling(images):
    data, batch = images
    model = RotNet(backbone=TINY, head_units=(16,), head_input="feature_map")
    # TINY's two stages take 32x32 to an 8x8x16 map; the head's first layer reads it flattened.
    assert model.head.get_layer("head_fc0").kernel.shape == (8 * 8 * 16, 16)
    _fit_and_round_trip(model, data.train)
    assert model(batch).shape == (batch.shape[0], 4) and model.get_config()["head_input"] == "feature_map"
    with pytest.raises(ValueError, match=r"model.head_input: expected one of \['pooled', 'feature_map'\]"):
        RotNet(head_input="map")


def test_exemplar_classes_are_seed_indices_and_transformations_are_strong(digits_folders_root, images):
    _, batch = images
    data = digits_ssl(root=digits_folders_root, batch_size=16, train_targets="exemplars", num_exemplars=48)
    model = ExemplarCNN(num_exemplars=48, backbone=TINY, head_units=(16,))
    history = _fit_and_round_trip(model, data.train)
    assert set(history) == {"loss", "exemplar_accuracy"} and model(batch).shape == (16, 48)
    a, b = np.asarray(model.transform(batch)), np.asarray(model.transform(batch))
    assert a.shape == batch.shape and 0 <= a.min() and a.max() <= 1
    assert np.abs(a - b).mean() > 0.02 and np.abs(a - np.asarray(batch)).mean() > 0.02  # random, per call


def test_context_pairs_come_from_the_labelled_grid_position():
    # Pixel values encode their own coordinates, so a patch's mean says where it was cut.
    size, p, g = 32, 9, 1
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = np.stack([yy, xx, np.zeros_like(yy)], -1).astype("float32") / (size - 1)
    model = ContextPrediction(backbone=TINY, patch_size=p, gap=g, jitter=0, colour_handling=None)
    centre, neighbour, labels = model.sample_pairs(tf.constant(np.repeat(coords[None], 64, 0)))
    offset = (np.asarray(neighbour)[..., :2].mean((1, 2)) - np.asarray(centre)[..., :2].mean((1, 2))) * (size - 1)
    expected = (np.array(NEIGHBOURS)[np.asarray(labels)] - 1) * (p + g)
    np.testing.assert_allclose(offset, expected, atol=1e-3)
    assert centre.shape == (64, 32, 32, 3) and len(set(np.asarray(labels))) > 4


def test_native_patches_keep_their_pixels_centred_on_a_black_canvas(images):
    size, p = 32, 9
    image = np.random.default_rng(0).random((1, size, size, 3)).astype("float32")
    model = ContextPrediction(backbone=TINY, patch_size=p, gap=1, jitter=0, colour_handling=None,
                              patch_scale="native")
    centre, neighbour, _ = model.sample_pairs(tf.constant(np.repeat(image, 8, 0)))
    centre, neighbour = np.asarray(centre), np.asarray(neighbour)
    start = (size - p) // 2
    inside = np.zeros((size, size), bool)
    inside[start:start + p, start:start + p] = True
    assert centre.shape == (8, size, size, 3) and np.all(centre[:, ~inside] == 0) and np.all(neighbour[:, ~inside] == 0)
    # The centre cell's pixels, unscaled: the 29-pixel grid sits at offset 0..3, its cells 10 apart.
    cuts = [image[0, y + 10:y + 10 + p, x + 10:x + 10 + p] for y in range(4) for x in range(4)]
    for patch in centre[:, inside].reshape(8, p, p, 3):
        assert any(np.allclose(patch, cut, atol=1e-5) for cut in cuts)
    history = _fit_and_round_trip(ContextPrediction(backbone=TINY, fusion_units=16, patch_scale="native",
                                                    crop_scale=(0.5, 1.0)), images[0].train)
    assert set(history) == {"loss", "position_accuracy"}
    with pytest.raises(ConfigError, match="model.patch_scale: expected one of"):
        ContextPrediction(patch_scale="zoom")


def test_patch_grid_embedding_reads_the_nine_cells_in_grid_order():
    # Each cell of the centred grid is filled with its own value; an encoder that
    # sums its input then returns the nine cell sums in row-major order.
    size, p, g = 32, 9, 1
    top = (size - (3 * p + 2 * g)) // 2
    images = np.zeros((2, size, size, 3), "float32")
    for cell in range(9):
        row, col = divmod(cell, 3)
        y, x = top + row * (p + g), top + col * (p + g)
        images[:, y:y + p, x:x + p] = np.array([cell + 1, 9 - cell])[:, None, None, None] / 10
    inputs = keras.Input((size, size, 3))
    summing = keras.Model(inputs, keras.layers.Lambda(lambda t: tf.reduce_sum(t, [1, 2]))(inputs))
    for scale in ("native", "resize"):
        grid = patch_grid_encoder(summing, p, g, scale)
        out = np.asarray(grid(images))
        assert out.shape == (2, 27) and grid.output_shape == (None, 27)
        sums = out.reshape(2, 9, 3)[..., 0] / (p * p * (1 if scale == "native" else (size / p) ** 2))
        np.testing.assert_allclose(sums[0], np.arange(1, 10) / 10, rtol=2e-2)
        np.testing.assert_allclose(sums[1], np.arange(9, 0, -1) / 10, rtol=2e-2)
    model = ContextPrediction(backbone=TINY, probe_embedding="patch_grid", patch_scale="native")
    assert model.probe_encoder()(images).shape == (2, 9 * model.encoder.output_shape[-1])
    whole_image = ContextPrediction(backbone=TINY)
    assert whole_image.probe_encoder() is whole_image.encoder
    with pytest.raises(ConfigError, match="model.probe_embedding: expected one of"):
        ContextPrediction(probe_embedding="patches")


def test_context_prediction_trains_and_handles_colour(images):
    data, batch = images
    history = _fit_and_round_trip(ContextPrediction(backbone=TINY, fusion_units=16, colour_handling="drop"), data.train)
    assert set(history) == {"loss", "position_accuracy"}
    colour = tf.random.uniform((4, 32, 32, 3))
    projected = ContextPrediction(backbone=TINY, colour_handling="project").handle_colour(colour)
    np.testing.assert_allclose(np.asarray(projected) @ np.array([-1, 2, -1]) / 6**0.5, 0, atol=1e-5)
    dropped = np.asarray(ContextPrediction(backbone=TINY, colour_handling="drop").handle_colour(colour))
    for image in dropped:
        spread = image.std((0, 1))                           # one channel keeps the image, two are faint noise
        assert np.sort(spread)[-1] > 0.2 and np.sort(spread)[1] < 0.01


def test_images_smaller_than_the_grid_name_the_size():
    with pytest.raises(ConfigError, match=r"images of 24x24 are smaller than the 3x3 grid \(31x31"):
        ContextPrediction(image_shape=(24, 24, 3), patch_size=9, gap=1, jitter=1)


def test_supervised_baseline_trains_with_labels(digits_folders_root):
    data = digits_ssl(root=digits_folders_root, batch_size=16, train_targets="labels")
    history = _fit_and_round_trip(Supervised(backbone=TINY), data.train)
    assert set(history) == {"loss", "accuracy"}


MIRRORED_SCRIPT = """
import keras, numpy as np
from vislearn.distribute import make_strategy
from vislearn.data import digits_ssl
from vislearn.models import Autoencoder, ContextPrediction, ExemplarCNN, RotNet, Supervised
tiny = {"name": "small_cnn", "width": 8, "depth": 2}
strategy = make_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2
plain = digits_ssl(root=ROOT, batch_size=16)
cases = [(lambda: Autoencoder(backbone=tiny, code_size=8, corruption="masking"), plain),
         (lambda: RotNet(backbone=tiny), plain), (lambda: ContextPrediction(backbone=tiny), plain),
         (lambda: ExemplarCNN(num_exemplars=32, backbone=tiny),
          digits_ssl(root=ROOT, batch_size=16, train_targets="exemplars", num_exemplars=32)),
         (lambda: Supervised(backbone=tiny), digits_ssl(root=ROOT, batch_size=16, train_targets="labels"))]
for make, data in cases:
    with strategy.scope():
        model = make()
        model.build((None, 32, 32, 3))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(data.train, steps_per_epoch=2, epochs=1, verbose=0).history
    assert all(np.isfinite(v).all() for v in history.values()), history
    print(type(model).__name__, "ok")
"""


def test_every_method_fits_under_mirrored_strategy_on_two_logical_cpus(digits_folders_root, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT.replace("ROOT", repr(str(digits_folders_root))))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, VISLEARN_LOGICAL_CPUS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == 5
