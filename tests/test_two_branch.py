"""two_branch end to end: recipe fit under MirroredStrategy, metrics, export of
embed_image / embed_text, lookup models built by `index build`, all loaded in a
process that imports only TensorFlow."""

import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import call_in_fresh_process, mirrored_run, register_mirrored_fit
from vislearn import recipes
from vislearn.data.captioned_shapes import make_captioned_shapes
from vislearn.data.folders import decode_image
from vislearn.export import export_text_image_embedder
from vislearn.index import build_index, index_model

DESIGN_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"}
TINY = ["--set", "data.image_size=[32, 32]", "--set", "data.batch_size=8", "--set", "train.epochs=1",
        "--set", "train.steps_per_epoch=2", "--set", "model.hidden_units=64", "--set", "model.embed_dim=32",
        "--set", "model.word_dim=16", "--set", "model.backbone={name: small_cnn, width: 8, depth: 2}"]


register_mirrored_fit("two_branch", "two_branch_shapes", TINY[1::2], make_data=lambda data: make_captioned_shapes(
    data, n_train=40, n_val=8, n_test=16, image_size=32))


@pytest.fixture(scope="module")
def run(mirrored_runs):
    return mirrored_run(mirrored_runs, "two_branch")


@pytest.fixture(scope="module")
def trained(run):
    """(recipe, model, data) of the run, loaded once in this process."""
    return recipes.load_trained(run / "run")


CAPTIONS = ["a large red circle on a photo of a cat", "two shapes: a blue star and a green cross",
            "a cup of coffee behind a yellow square"]
QUERIES = ["a red circle", "", "zebra xylophone"]  # plain, empty, out-of-vocabulary


@pytest.fixture(scope="module")
def served(run, trained):
    """The embedder export and both lookup models, called in one fresh process."""
    _, model, data = trained
    gallery = run / "data" / "images"
    names = sorted(p.name for p in gallery.glob("*.jpg"))
    encoded = [(gallery / n).read_bytes() for n in names]
    embedder = export_text_image_embedder(model, run / "models" / "tb" / "1", data.image_shape)
    by_text = index_model(model, data.image_shape, run / "lookups", "by_text", images=gallery, chunk_size=5)
    (run / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    by_image = index_model(model, data.image_shape, run / "lookups", "by_image", captions=run / "captions.txt",
                           chunk_size=2)
    images, queries, captions = (f"tf.constant({x!r})" for x in (encoded, QUERIES, CAPTIONS))
    e, t, i = str(embedder), str(by_text), str(by_image)
    out = call_in_fresh_process({
        "image": (e, "embed_image", f"dict(images={images})"),
        "default": (e, "serving_default", f"dict(images={images})"),
        "text": (e, "embed_text", f"dict(texts={queries})"),
        "top5": (t, "lookup_text", f"dict(texts={queries}, k=tf.constant(5))"),
        "clamped": (t, "lookup_text", f"dict(texts={queries}, k=tf.constant(1000))"),
        "zero": (t, "lookup_text", f"dict(texts={queries}, k=tf.constant(0))"),
        "top2": (i, "lookup_image", f"dict(images={images}, k=tf.constant(2))"),
        "captions": (i, "embed_text", f"dict(texts={captions})")})
    return {"out": out, "names": names, "encoded": encoded, "paths": (embedder, by_text, by_image)}


def test_bundled_recipe_validates_and_fit_writes_retrieval_metrics(run):
    recipe, _ = recipes.load_recipe("two_branch_shapes")
    assert recipe["model"]["name"] == "two_branch" and recipe["model"]["sentence_weight"] == 0.05
    metrics = json.loads((run / "run" / "metrics.json").read_text())
    assert DESIGN_KEYS <= set(metrics) and "t2t_r1" in metrics
    assert all(0.0 <= metrics[k] <= 1.0 for k in DESIGN_KEYS - {"rsum", "i2t_medr", "t2i_medr"})
    assert 1.0 <= metrics["t2i_medr"] <= 16 and 1.0 <= metrics["i2t_medr"] <= 80
    header = (run / "run" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "val_loss", "val_rsum", "val_t2t_r1", "batch_t2i_r1"} <= set(header)
    resolved = (run / "run" / "recipe.yaml").read_text()
    assert "vocabulary:" in resolved and "- circle" in resolved  # built from the training captions


def test_evaluate_matches_metrics(run, trained):
    recipe, model, data = trained
    evaluated = recipes.method_of(recipe).metrics(model, data)  # what `vislearn evaluate` prints
    stored = json.loads((run / "run" / "metrics.json").read_text())
    assert set(evaluated) == set(stored)
    for key in DESIGN_KEYS:
        assert evaluated[key] == pytest.approx(stored[key], abs=1e-6)


def test_export_embed_image_and_text_round_trip(served, trained):
    _, model, _ = trained
    out = served["out"]
    assert not out["vislearn_imported"]
    images = tf.stack([decode_image(e, [32, 32]) for e in served["encoded"]])
    np.testing.assert_allclose(out["image"]["embeddings"], model.embed_image(images), atol=1e-5)
    np.testing.assert_allclose(out["default"]["embeddings"], out["image"]["embeddings"])
    np.testing.assert_allclose(out["text"]["embeddings"], model.embed_text(tf.constant(QUERIES)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text"]["embeddings"], axis=1), 1.0, rtol=1e-5)


def test_index_build_lookups_equal_brute_force(served):
    out, names = served["out"], served["names"]
    meta = json.loads((served["paths"][1] / "assets.extra" / "vislearn.json").read_text())
    assert meta["kind"] == "embedding_lookup" and meta["size"] == 64 and meta["gallery"] == "images"
    brute = np.array(out["text"]["embeddings"]) @ np.array(out["image"]["embeddings"]).T
    expected = np.argsort(-brute, axis=1, kind="stable")
    np.testing.assert_array_equal(out["top5"]["ids"], expected[:, :5])
    np.testing.assert_allclose(out["top5"]["scores"], np.take_along_axis(brute, expected[:, :5], 1), atol=1e-5)
    assert out["top5"]["names"][0] == [names[i] for i in expected[0, :5]]
    np.testing.assert_array_equal(out["clamped"]["ids"], expected)  # k larger than the gallery: clamped to 64
    assert "k must be at least 1" in out["zero"]["error"]

    brute = np.array(out["image"]["embeddings"]) @ np.array(out["captions"]["embeddings"]).T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out["top2"]["ids"], expected)
    assert out["top2"]["names"][1] == [CAPTIONS[i] for i in expected[1]]


def test_index_build_bad_input(run, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --images DIR or --captions FILE"):
        build_index(run / "run", tmp_path, "x")
    (tmp_path / "captions.txt").write_text("a red circle\n\nblue star\n")
    with pytest.raises(ValueError, match="caption 2 is empty"):
        build_index(run / "run", tmp_path, "x", captions=tmp_path / "captions.txt")
    with pytest.raises(ValueError, match="no images"):
        build_index(run / "run", tmp_path, "x", images=tmp_path)
    (tmp_path / "good.txt").write_text("a red circle\n")
    with pytest.raises(ValueError, match="not a run dir"):
        build_index(tmp_path, tmp_path, "x", captions=tmp_path / "good.txt")


def test_image_constraint_neighbours_are_images_sharing_a_caption():
    from vislearn.models.two_branch import TwoBranch

    captions = [["A red circle.", "one shape"], ["a red circle", "a cat"], ["two shapes", "a dog"]]
    model = TwoBranch(image_shape=(16, 16, 3), vocabulary=["a", "red", "circle", "cat", "dog", "shapes"],
                      backbone={"name": "small_cnn", "width": 4, "depth": 1}, word_dim=8, hidden_units=16,
                      embed_dim=8, image_weight=0.5)
    data = {"image": tf.random.stateless_uniform((3, 16, 16, 3), seed=(0, 1)), "captions": tf.constant(captions)}
    sentence_image, neighbours = model._loss_targets(data, tf.constant([0, 0, 1, 1, 2, 2]))
    np.testing.assert_array_equal(neighbours.numpy(), [[1, 1, 0], [1, 1, 0], [0, 0, 1]])  # case, punctuation ignored
    # The step's loss includes image_weight x the image term.
    _, images, sentences = model._embed_batch(data, training=False)
    terms = model.loss_fn.terms(sentence_image, images, sentences, neighbours)
    assert float(terms["image_image"]) > 0
    expected = (1.5 * terms["sentence_to_image"] + terms["image_to_sentence"] + 0.05 * terms["sentence_sentence"]
                + 0.5 * terms["image_image"])
    np.testing.assert_allclose(float(model.loss_fn((sentence_image, neighbours), (images, sentences))),
                               float(expected), rtol=1e-5)
    assert TwoBranch.from_config(model.get_config()).loss_fn.image_weight == 0.5
    model.compile(optimizer="adam")
    assert np.isfinite(model.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0).history["loss"][0])


def test_default_word_embedding_keeps_the_checkpoint_layout_of_earlier_runs(tmp_path):
    """Checkpoints name layers by class: the default text branch must stay a
    plain `Embedding` so runs trained before word vectors existed still load."""
    import h5py

    from vislearn.models.two_branch import TwoBranch

    model = TwoBranch(image_shape=(16, 16, 3), vocabulary=["a", "red", "circle"],
                      backbone={"name": "small_cnn", "width": 4, "depth": 1}, word_dim=8, hidden_units=16, embed_dim=8)
    model.build()
    model.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "w.weights.h5") as weights:
        assert weights["layers/embedding/vars/0"].shape == (5, 8)
