"""Contrastive instance discrimination: InfoNCE/NT-Xent, views, SimCLR, MoCo v1/v2, MoChi."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from vislearn import recipes
from vislearn.config import ConfigError
from vislearn.data.views import (LUMA, brightness_contrast_saturation, check_affine, check_elastic, map_views,
                                 random_affine, random_elastic, random_stroke_width, simclr_augment, split_seed)
from vislearn.losses.contrastive import InfoNCE, moco_similarities, nt_xent_similarities
from vislearn.models.moco import MoCo, enqueue, mochi_negatives, momentum_update
from vislearn.models.simclr import SimCLR

TINY = {"name": "small_cnn", "width": 8, "depth": 2}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cross_entropy(logits, positive):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(logits)), positive].mean()


# ---------------------------------------------------------------- losses


def test_nt_xent_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)).astype("float32"), rng.normal(size=(5, 7)).astype("float32")
    temperature = 0.3
    # Reference: the 2N x 2N cosine matrix, self-similarity removed, positive = the other view.
    z = _unit(np.concatenate([a, b]).astype("float64"))
    logits = z @ z.T / temperature
    np.fill_diagonal(logits, -np.inf)
    expected = _cross_entropy(logits, np.concatenate([np.arange(5, 10), np.arange(5)]))
    loss = InfoNCE(temperature)(*nt_xent_similarities(a, b))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_moco_info_nce_matches_a_numpy_reference_with_extra_negatives():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    queue = _unit(rng.normal(size=(10, 6)))
    extra = _unit(rng.normal(size=(4, 3, 6)))
    temperature = 0.07
    qn, kn = _unit(q), _unit(k)
    logits = np.concatenate([np.sum(qn * kn, 1, keepdims=True), qn @ queue.T,
                             np.einsum("nd,nmd->nm", qn, extra)], axis=1) / temperature
    positive, similarities = moco_similarities(q.astype("float32"), k.astype("float32"),
                                               queue.astype("float32"), extra.astype("float32"))
    assert similarities.shape == (4, 14) and not np.any(positive)
    np.testing.assert_allclose(float(InfoNCE(temperature)(positive, similarities)),
                               _cross_entropy(logits, np.zeros(4, int)), rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_temperature_must_be_positive_and_the_error_names_it(temperature):
    with pytest.raises(ValueError, match=f"received {temperature}"):
        InfoNCE(temperature)
    with pytest.raises(ValueError, match=f"model.temperature: .*received {temperature}"):
        SimCLR(backbone=TINY, temperature=temperature)
    with pytest.raises(ValueError, match=f"model.temperature: .*received {temperature}"):
        MoCo(backbone=TINY, temperature=temperature, queue_size=8)


# ---------------------------------------------------------------- views


def test_views_are_seeded_in_range_and_differ_between_seeds():
    images = tf.random.stateless_uniform([6, 16, 16, 3], [0, 1])
    first = simclr_augment(images, seed=[3, 4], blur=True)
    np.testing.assert_array_equal(first, simclr_augment(images, seed=[3, 4], blur=True))
    assert float(tf.reduce_mean(tf.abs(first - simclr_augment(images, seed=[3, 5], blur=True)))) > 0.02
    assert first.shape == images.shape and 0.0 <= float(tf.reduce_min(first)) and float(tf.reduce_max(first)) <= 1.0
    # A full-image crop with no colour change or blur is the image (or its mirror).
    plain = simclr_augment(images, seed=[1, 1], strength=0.0, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                           grayscale_probability=0.0)
    for view, image in zip(plain.numpy(), images.numpy()):
        assert min(np.abs(view - image).max(), np.abs(view - image[:, ::-1]).max()) < 1e-5
    # In tf.data: two different views per batch, the same on every pass.
    dataset = map_views(tf.data.Dataset.from_tensor_slices(images).batch(3), seed=7)
    (a1, b1), (a2, _) = next(iter(dataset)), next(iter(dataset))
    np.testing.assert_array_equal(a1, a2)
    assert float(tf.reduce_mean(tf.abs(a1 - b1))) > 0.02


def test_brightness_contrast_saturation_as_one_matrix_equals_the_three_steps():
    rng = np.random.default_rng(0)
    images = rng.random((4, 5, 6, 3), dtype=np.float32)
    brightness, contrast, saturation = (rng.uniform(0.2, 1.8, 4).astype(np.float32) for _ in range(3))
    luma = np.array(LUMA, np.float32)
    # The reference order of SimCLR's jitter, one step at a time (clipped once, at the end).
    x = images * brightness[:, None, None, None]
    mean = (x @ luma).mean(axis=(1, 2))[:, None, None, None]
    x = (x - mean) * contrast[:, None, None, None] + mean
    gray = (x @ luma)[..., None]
    expected = np.clip(gray + (x - gray) * saturation[:, None, None, None], 0.0, 1.0)
    result = brightness_contrast_saturation(images, brightness, contrast, saturation).numpy()
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert 0.0 < (expected == 1.0).mean() < 0.5  # the factors push some pixels into the clip


def _bright_centroids(images):
    """(x, y) intensity centroid of each single-channel image."""
    images = np.asarray(images)[..., 0]
    ys, xs = np.mgrid[:images.shape[1], :images.shape[2]]
    mass = images.sum(axis=(1, 2))
    return np.stack([(images * xs).sum(axis=(1, 2)) / mass, (images * ys).sum(axis=(1, 2)) / mass], axis=1)


def test_affine_views_rotate_zoom_and_shift_by_no_more_than_their_ranges():
    # One bright 3x3 block 8 px right of the centre (15.5, 15.5) of 32x32 images.
    images = np.zeros((64, 32, 32, 1), np.float32)
    images[:, 14:17, 22:25] = 1.0
    centre = np.array([15.5, 15.5])
    seeds = split_seed([5, 6], 5)
    np.testing.assert_array_equal(random_affine(images, seeds), images)            # no ranges: the image
    np.testing.assert_array_equal(random_affine(images, seeds, rotation=20.0),
                                  random_affine(images, seeds, rotation=20.0))     # seeded

    start = _bright_centroids(images)[0] - centre                                 # (7.5, -0.5)
    radius = np.linalg.norm(start)
    moved = _bright_centroids(random_affine(images, seeds, rotation=30.0)) - centre
    angles = np.degrees(np.arctan2(moved[:, 1], moved[:, 0]) - np.arctan2(start[1], start[0]))
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), radius, atol=0.3)  # a rotation keeps the radius
    assert np.abs(angles).max() <= 30.5 and angles.max() - angles.min() > 30    # and turns by up to 30 degrees

    zoomed = _bright_centroids(random_affine(images, seeds, zoom=0.2)) - centre
    scales = np.linalg.norm(zoomed, axis=1) / radius
    assert 0.8 - 0.05 <= scales.min() and scales.max() <= 1.2 + 0.05 and scales.max() - scales.min() > 0.2
    np.testing.assert_allclose(np.arctan2(zoomed[:, 1], zoomed[:, 0]), np.arctan2(start[1], start[0]), atol=0.02)

    shifted = _bright_centroids(random_affine(images, seeds, translate=0.1)) - centre - start
    assert np.abs(shifted).max() <= 3.2 + 0.05 and np.abs(shifted).min() < 1.0   # 10% of 32 px at most
    assert np.ptp(shifted[:, 0]) > 3 and np.ptp(shifted[:, 1]) > 3              # along both axes


def test_affine_views_leave_the_other_steps_draws_alone_and_bad_ranges_name_the_key():
    images = tf.random.stateless_uniform([4, 16, 16, 3], [0, 1])
    still = {"rotation": 0, "zoom": 0, "shear": 0, "translate": 0}
    np.testing.assert_allclose(simclr_augment(images, seed=[3, 4], affine=still),
                               simclr_augment(images, seed=[3, 4]), atol=1e-6)
    warped = simclr_augment(images, seed=[3, 4], affine={"rotation": 15, "translate": 0.1})
    assert float(tf.reduce_mean(tf.abs(warped - simclr_augment(images, seed=[3, 4])))) > 0.02
    assert check_affine({"rotation": 15}) == {"rotation": 15.0, "zoom": 0.0, "shear": 0.0, "translate": 0.0}
    with pytest.raises(ConfigError, match=r"model.affine.rotate: unknown key; expected one of \['rotation'"):
        SimCLR(backbone=TINY, affine={"rotate": 15})
    with pytest.raises(ConfigError, match="model.affine.zoom: expected a zoom range below 1"):
        MoCo(backbone=TINY, affine={"zoom": 1.5})
    with pytest.raises(ConfigError, match="model.affine.shear: expected a number >= 0, received -0.1"):
        SimCLR(backbone=TINY, affine={"shear": -0.1})
    with pytest.raises(ConfigError, match=r"model.flip: expected a probability in \[0, 1\], received 2"):
        MoCo(backbone=TINY, flip=2)


def test_stroke_width_views_thicken_thin_or_keep_a_stroke_a_third_of_the_time_each():
    # A bright vertical stroke 3 px wide: 5 px after a 3x3 dilation, 1 px after an erosion.
    images = np.zeros((300, 16, 16, 1), np.float32)
    images[:, 2:14, 6:9] = 1.0
    views = random_stroke_width(images, [7, 8], window=3).numpy()
    np.testing.assert_array_equal(views, random_stroke_width(images, [7, 8], window=3))     # seeded
    widths = (views[:, 8, :, 0] == 1.0).sum(axis=1)
    assert set(widths) == {1, 3, 5}
    for width in (1, 3, 5):
        assert 0.25 < np.mean(widths == width) < 0.42
    assert set(np.unique(views)) == {0.0, 1.0}           # max and min filters make no new values
    np.testing.assert_array_equal(views[widths == 3], images[widths == 3])


def test_stroke_width_views_leave_the_other_steps_draws_alone_and_bad_windows_name_the_key():
    images = tf.random.stateless_uniform([4, 16, 16, 3], [0, 1])
    np.testing.assert_allclose(simclr_augment(images, seed=[3, 4], stroke_jitter=None),
                               simclr_augment(images, seed=[3, 4]), atol=1e-6)
    changed = simclr_augment(images, seed=[3, 4], stroke_jitter=3)
    assert float(tf.reduce_mean(tf.abs(changed - simclr_augment(images, seed=[3, 4])))) > 0.01
    for window in (1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"model.stroke_jitter: expected the window .* received {window}"):
            SimCLR(backbone=TINY, stroke_jitter=window)
    with pytest.raises(ConfigError, match="model.stroke_jitter: expected the window"):
        MoCo(backbone=TINY, stroke_jitter=0)


def test_elastic_views_move_each_pixel_by_at_most_the_shift_along_a_smooth_field():
    # Channels 0 and 1 hold each pixel's own x and y: bilinear reads of a
    # linear ramp are exact, so the output is where each pixel read from.
    ys, xs = np.mgrid[:32, :32].astype(np.float32)
    images = np.repeat(np.stack([xs, ys], axis=-1)[None], 16, axis=0)
    np.testing.assert_array_equal(random_elastic(images, [1, 2], shift=0.0), images)     # no shift: the image
    warped = random_elastic(images, [1, 2], shift=2.0, sigma=4.0).numpy()
    np.testing.assert_array_equal(warped, random_elastic(images, [1, 2], shift=2.0, sigma=4.0))    # seeded
    assert np.abs(warped - random_elastic(images, [3, 4], shift=2.0, sigma=4.0)).max() > 0.5

    displacement = (warped - images)[:, 3:-3, 3:-3]          # away from the zero-filled border
    assert np.abs(displacement).max() <= 2.0 + 1e-4          # each image's largest move is the shift
    assert np.abs(displacement).reshape(16, -1).max(axis=1).min() > 1.0
    # Smooth: neighbours move alike (i.i.d. moves of this size would differ by ~1.3 px on average).
    assert np.abs(np.diff(displacement, axis=1)).mean() < 0.2
    assert np.abs(np.diff(displacement, axis=2)).mean() < 0.2


def test_elastic_views_leave_the_other_steps_draws_alone_and_bad_values_name_the_key():
    images = tf.random.stateless_uniform([4, 16, 16, 3], [0, 1])
    np.testing.assert_allclose(simclr_augment(images, seed=[3, 4], elastic={"shift": 0}),
                               simclr_augment(images, seed=[3, 4]), atol=1e-6)
    bent = simclr_augment(images, seed=[3, 4], elastic={"shift": 2, "sigma": 3})
    assert float(tf.reduce_mean(tf.abs(bent - simclr_augment(images, seed=[3, 4])))) > 0.02
    assert check_elastic({"shift": 2}) == {"shift": 2.0, "sigma": 4.0}
    with pytest.raises(ConfigError, match=r"model.elastic.alpha: unknown key; expected one of \['shift', 'sigma'\]"):
        SimCLR(backbone=TINY, elastic={"alpha": 34})
    with pytest.raises(ConfigError, match="model.elastic.sigma: expected a number > 0, received 0"):
        MoCo(backbone=TINY, elastic={"shift": 2, "sigma": 0})
    with pytest.raises(ConfigError, match="model.elastic: expected a mapping with keys"):
        SimCLR(backbone=TINY, elastic=2.0)


# ---------------------------------------------------------------- MoCo state


def test_queue_replaces_the_oldest_keys_in_order():
    queue = keras.Variable(np.zeros((6, 2), "float32"), trainable=False)
    pointer = keras.Variable(0, dtype="int32", trainable=False)
    for batch in range(4):  # 4 batches of 2 into 6 slots: the 4th overwrites the 1st
        enqueue(queue, pointer, np.full((2, 2), batch + 1, "float32") + [[0, 0], [0.5, 0.5]])
    np.testing.assert_array_equal(queue.numpy()[:, 0], [4, 4.5, 2, 2.5, 3, 3.5])
    assert int(pointer.numpy()) == 2


def test_momentum_update_arithmetic_and_the_key_encoder_pairs():
    query, key = keras.Variable([1.0, -2.0]), keras.Variable([3.0, 5.0], trainable=False)
    momentum_update([(query, key)], 0.9)
    np.testing.assert_allclose(key.numpy(), [0.9 * 3 + 0.1 * 1, 0.9 * 5 + 0.1 * -2], rtol=1e-6)
    model = MoCo(backbone=TINY, queue_size=8, embedding_dim=4, hidden_units=8, momentum=0.5, bn_groups=1)
    pairs = model.momentum_pairs()
    assert len(pairs) == len(model.encoder.trainable_weights) + len(model.projector.trainable_weights)
    assert not model.key_encoder.trainable_weights and not model.key_projector.trainable_weights
    for q, k in pairs:
        np.testing.assert_array_equal(q.numpy(), k.numpy())  # the key encoder starts as a copy
    # ... and computes the same embeddings in training mode (batch statistics; the shuffle undone).
    images = tf.random.stateless_uniform([8, 32, 32, 3], [0, 2])
    np.testing.assert_allclose(model._embed(model.key_encoder, model.key_projector, images, shuffle=True),
                               model._embed(model.encoder, model.projector, images, shuffle=False), atol=1e-5)
    for q, k in pairs:
        q.assign(q + 1.0)
    before = [k.numpy() for _, k in pairs]
    momentum_update(pairs, 0.5)
    for (q, k), old in zip(pairs, before):
        np.testing.assert_allclose(k.numpy(), old + 0.5, rtol=1e-6, atol=1e-6)


def test_mochi_negatives_are_unit_norm_mixed_from_the_hardest_and_carry_no_gradient():
    dim, hardest = 16, 4
    queue = tf.eye(dim)                       # key i is the i-th axis
    rng = np.random.default_rng(0)
    hard_axes = np.stack([rng.choice(dim, hardest, replace=False) for _ in range(3)])
    q = np.zeros((3, dim), "float32")
    for row, axes in enumerate(hard_axes):
        q[row, axes] = [4.0, 3.0, 2.0, 1.0]     # the query is most similar to exactly these keys
    q += 0.01                                 # ... and barely similar to every other key
    q = tf.constant(q)
    with tf.GradientTape() as tape:
        tape.watch(q)
        synthetic = mochi_negatives(q, queue, hardest, mix=5, query_mix=3, seed=[0, 1])
    assert synthetic.shape == (3, 8, dim)
    synthetic_values = synthetic.numpy()
    np.testing.assert_allclose(np.linalg.norm(synthetic, axis=-1), 1.0, rtol=1e-5)
    assert tape.gradient(tf.reduce_sum(synthetic), q) is None
    for row, axes in enumerate(hard_axes):
        others = np.setdiff1d(np.arange(dim), axes)
        # Pair mixes live on the hardest keys only; query mixes add the query's small rest.
        assert np.abs(synthetic_values[row, :5][:, others]).max() < 1e-6
        assert np.abs(synthetic_values[row, 5:][:, others]).max() < 0.01
    # Without the stop, the query still gets its gradient through the logits.
    with tf.GradientTape() as tape:
        tape.watch(q)
        _, similarities = moco_similarities(q, q, queue, synthetic)
        synthetic_logits = tf.reduce_sum(similarities[:, -8:])
    assert tape.gradient(synthetic_logits, q) is not None


# ---------------------------------------------------------------- bad input


def test_build_time_errors_name_the_value():
    with pytest.raises(ValueError, match="queue_size: 100 is not a multiple of the global batch 32"):
        MoCo(backbone=TINY, queue_size=100, global_batch_size=32)
    with pytest.raises(ValueError, match="mochi_hardest: 64 hardest negatives requested from a queue of 32"):
        MoCo(backbone=TINY, queue_size=32, mochi_hardest=64, mochi_mix=8)
    with pytest.raises(ValueError, match="global batch of 1 image"):
        SimCLR(backbone=TINY, global_batch_size=1)
    # Unknown to the model until fit: the first step refuses it, naming both numbers.
    model = MoCo(backbone=TINY, queue_size=48, embedding_dim=4, hidden_units=8)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="queue_size: 48 is not a multiple of the global batch 32"):
        model.fit(tf.data.Dataset.from_tensors(tf.zeros([32, 32, 32, 3])), epochs=1, verbose=0)


def test_a_recipe_with_a_batch_that_does_not_divide_the_queue_fails_before_training(digits_folders_root, tmp_path):
    recipe, source = recipes.load_recipe("moco_v2_digits", [f"data.root={digits_folders_root}",
                                                            "data.batch_size=100"])
    with pytest.raises(ConfigError, match="queue_size: 512 is not a multiple of the global batch 100"):
        recipes.fit(recipe, source, tmp_path / "run", verbose=0)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- distributed

MIRRORED_SCRIPT = """
import numpy as np, tensorflow as tf, keras
from vislearn.distribute import use_logical_cpus
use_logical_cpus(2)
from vislearn.models.moco import MoCo
from vislearn.models.simclr import SimCLR

# SimCLR: loss and gradients of 2 replicas x 4 images == 1 replica x 8 images.
rng = np.random.default_rng(0)
views_a, views_b = (rng.random((8, 16, 16, 3), dtype=np.float32) for _ in range(2))
def make():  # no batch norm: BN statistics are per replica by design, the loss is what is compared
    keras.utils.set_random_seed(1)
    return SimCLR(image_shape=(16, 16, 3), backbone={"name": "dann_mnist"}, projection_units=(32, 16),
                  temperature=0.2)
def loss_and_gradients(model, a, b):
    with tf.GradientTape() as tape:
        loss = model.contrastive_loss(a, b)[0]
    return loss, tape.gradient(loss, model.trainable_variables)
one = make()
loss_1, gradients_1 = loss_and_gradients(one, views_a, views_b)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    two = make()
two.set_weights(one.get_weights())
shards = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((views_a, views_b)).batch(8))
@tf.function
def distributed(a, b):
    loss, gradients = strategy.run(lambda a, b: loss_and_gradients(two, a, b), (a, b))
    return strategy.reduce("SUM", loss, None), [strategy.reduce("SUM", g, None) for g in gradients]
loss_2, gradients_2 = distributed(*next(iter(shards)))
print("loss", float(loss_1), float(loss_2))
print("gradient", max(float(np.abs(g1 - g2).max()) for g1, g2 in zip(gradients_1, gradients_2)))

# Every method fits under the strategy; the queue stays identical on both replicas.
images = tf.data.Dataset.from_tensor_slices(rng.random((32, 16, 16, 3), dtype=np.float32)).repeat().batch(8)
tiny = {"name": "small_cnn", "width": 4, "depth": 2}
for make_model in (lambda: SimCLR(image_shape=(16, 16, 3), backbone=tiny, projection_units=(16, 8)),
                   lambda: MoCo(image_shape=(16, 16, 3), backbone=tiny, version=1, queue_size=24, embedding_dim=8,
                                mochi_hardest=4, mochi_mix=2, mochi_query_mix=2)):
    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.SGD(0.01))
    history = model.fit(images, steps_per_epoch=2, epochs=1, verbose=0).history
    assert all(np.isfinite(v).all() for v in history.values()), history
    if isinstance(model, MoCo):
        copies = [v.numpy() for v in strategy.experimental_local_results(model.queue.value)]
        np.testing.assert_array_equal(copies[0], copies[1])
        assert int(model.queue_pointer.numpy()) == 2 * 8  # two global batches of 8 into 24 slots
    print(type(model).__name__, "fits")
"""


def test_simclr_two_replicas_equal_one_replica_and_methods_fit_mirrored(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    loss_1, loss_2 = map(float, lines["loss"].split())
    assert abs(loss_1 - loss_2) < 1e-4 and loss_1 > 1.0
    assert float(lines["gradient"]) < 1e-4
    assert lines["SimCLR"] == "fits" and lines["MoCo"] == "fits"


# ---------------------------------------------------------------- end to end


# One run per registered method: `simclr`, and `moco` with MoChi on (which runs all of MoCo v2's
# step); v1 and the shuffled-BN groups run in the mirrored test. Few steps keep the file < 90 s.
@pytest.mark.parametrize("recipe, extra", [
    ("simclr_digits", ["model.online_probe=true", "optimizer.schedule.warmup_steps=1"]),
    ("mochi_digits", ["model.mochi_start_step=0", "model.bn_groups=1"]),
])
def test_fit_evaluate_and_export_an_image_embedder(recipe, extra, digits_folders_root, tmp_path):
    overrides = [f"data.root={digits_folders_root}", "train.epochs=1", "train.steps_per_epoch=2",
                 "data.batch_size=32", "data.image_size=[16, 16]", "data.probe_labels_per_class=3", *extra]
    loaded, source = recipes.load_recipe(recipe, overrides)
    keras.backend.clear_session()
    metrics = recipes.fit(loaded, source, tmp_path / "run", verbose=0)
    assert set(metrics) == {"linear_top1", "knn_top1"} and all(0.0 < v <= 1.0 for v in metrics.values())
    header, *rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"loss", "contrastive_accuracy", "knn_top1"} <= set(columns) and len(rows) == 1
    assert np.isfinite(float(rows[0].split(",")[columns.index("loss")]))
    if "model.online_probe=true" in extra:
        assert "probe_accuracy" in columns

    path = recipes.export(tmp_path / "run", tmp_path / "serving", name="ssl")
    embed = tf.saved_model.load(str(path)).signatures["embed_image"]
    files = sorted((digits_folders_root / "test" / "3").glob("*.png"))[:2]
    embeddings = embed(images=tf.constant([f.read_bytes() for f in files]))["embeddings"].numpy()
    assert embeddings.shape[0] == 2 and np.all(np.isfinite(embeddings))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_lars_scales_kernel_steps_by_the_trust_ratio_and_leaves_vectors_plain():
    from vislearn.optimizers import OPTIMIZERS, LARS

    assert OPTIMIZERS["lars"] is LARS
    kernel, bias = keras.Variable([[3.0, 4.0]]), keras.Variable([1.0, 1.0])
    grad_kernel, grad_bias = np.array([[0.6, 0.8]], "float32"), np.array([0.5, -0.5], "float32")
    optimizer = LARS(learning_rate=0.1, momentum=0.9, weight_decay=0.01, eta=0.001)
    for step in range(2):
        optimizer.apply([grad_kernel, grad_bias], [kernel, bias])
    # Reference, two steps: g = grad + wd w; r = eta |w| / |g|; v = m v + lr r g; w -= v.
    w, v, b, vb = np.array([[3.0, 4.0]]), 0.0, np.array([1.0, 1.0]), 0.0
    for step in range(2):
        g = grad_kernel + 0.01 * w
        v = 0.9 * v + 0.1 * (0.001 * np.linalg.norm(w) / np.linalg.norm(g)) * g
        w = w - v
        vb = 0.9 * vb + 0.1 * grad_bias
        b = b - vb
    np.testing.assert_allclose(kernel.numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(bias.numpy(), b, rtol=1e-5)
    assert LARS.from_config(optimizer.get_config()).eta == 0.001


@pytest.mark.slow
def test_moco_fits_on_two_workers_with_its_queue(digits_folders_root, tmp_path):
    """MultiWorkerMirroredStrategy across two local processes: MoCo all-gathers
    the keys of both workers into its queue every step."""
    from helpers import fit_on_two_workers

    run_dir = tmp_path / "moco_multi"
    args = ["fit", "moco_v2_digits", "--run-dir", run_dir]
    for override in (f"data.root={digits_folders_root}", "train.epochs=1", "train.steps_per_epoch=2",
                     "data.batch_size=32", "data.image_size=[16, 16]", "data.probe_labels_per_class=3"):
        args += ["--set", override]
    fit_on_two_workers(args, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"linear_top1", "knn_top1"} and all(0.0 < v <= 1.0 for v in metrics.values())
