"""ICMLM: concept masking, both variants' shapes, the text-only ablation, bad
input, and a recipe fit under MirroredStrategy (2 logical CPUs) whose visual
encoder exports as `embed_image` and transfers through `backbone.from_run`."""

import json
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import mirrored_run, register_mirrored_fit
from vislearn import recipes
from vislearn.backbones import build_backbone
from vislearn.config import ConfigError
from vislearn.data.caption_concepts import (concept_labels, concept_vocabulary, mask_one_concept, read_vocabulary,
                                            unmaskable)
from vislearn.data.captioned_shapes import make_captioned_shapes
from vislearn.data.captions import captioned_shapes
from vislearn.models.icmlm import ICMLM

VOCABULARY = ["[PAD]", "[UNK]", "[MASK]", ",", "a", "an", "on", "of", "and", "the", "photo", "cat", "red", "blue",
              "green", "circle", "star", "square", "small", "large"]
CONCEPTS = ["photo", "cat", "red", "blue", "green", "circle", "star", "square", "small", "large"]
TINY_MODEL = dict(image_shape=(32, 32, 3), vocabulary=VOCABULARY, concepts=CONCEPTS,
                  backbone={"name": "small_cnn", "width": 4, "depth": 2}, sequence_length=12, width=16,
                  num_heads=2, intermediate_dim=32, text_layers=1, fusion_layers=1, dropout=0.0)
CAPTIONS = [["a red circle on a photo of a cat", "a small blue star"],
            ["a large green square", "of the and"]]  # the last caption has no concept word
TINY_FIT = ["--set", "data.image_size=[32, 32]", "--set", "data.batch_size=8", "--set", "train.epochs=1",
            "--set", "train.steps_per_epoch=2", "--set", "model.width=16", "--set", "model.num_heads=2",
            "--set", "model.intermediate_dim=32", "--set", "model.text_layers=1", "--set", "model.sequence_length=24",
            "--set", "model.backbone={name: small_cnn, width: 4, depth: 2}"]


def batch():
    images = tf.random.stateless_uniform((2, 32, 32, 3), seed=(1, 2))
    return {"image": images, "captions": tf.constant(CAPTIONS)}


# ---------------------------------------------------------------- masking and concepts


def test_masking_picks_only_concept_tokens_and_labels_are_the_originals():
    tokens = tf.constant([[4, 12, 15, 6, 11, 0], [4, 18, 13, 16, 0, 0], [4, 7, 8, 0, 0, 0]])
    is_concept = tf.constant([[False, True, True, False, True, False], [False, True, True, True, False, False],
                              [False] * 6])
    seen = set()
    for seed in range(40):
        masked, positions, labels, valid = (t.numpy() for t in mask_one_concept(tokens, is_concept, 2, (seed, 0)))
        np.testing.assert_array_equal(valid, [True, True, False])
        for row in range(2):
            assert is_concept.numpy()[row, positions[row]]                     # only concept tokens
            assert labels[row] == tokens.numpy()[row, positions[row]]          # label = the original id
            assert list(masked[row]).count(2) == 1                             # exactly one [MASK]
            expected = tokens.numpy()[row].copy()
            expected[positions[row]] = 2
            np.testing.assert_array_equal(masked[row], expected)
            seen.add((row, int(positions[row])))
        np.testing.assert_array_equal(masked[2], tokens.numpy()[2])           # no concept: unmasked
    assert seen == {(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (1, 3)}           # every concept gets picked


def test_concept_rule_and_caption_labels():
    captions = ["A red circle on a photo.", "two shapes: a red star and a blue circle", "the red one"] * 5
    captions.append("a cat")  # in one caption only: rare
    concepts = concept_vocabulary(captions, VOCABULARY + ["shapes", "two", "one"], min_count=5)
    assert concepts[0] == "red"  # most frequent first
    assert set(concepts) == {"red", "circle", "photo", "star", "blue", "shapes"}  # no stop words, no rare words
    assert "shapes" not in concept_vocabulary(captions, VOCABULARY, min_count=5)  # not a whole token
    assert unmaskable(["of the and", "a red star"], concepts) == ["of the and"]
    labels = concept_labels([["a red circle", "circle"], ["a star and a circle"], ["a cat"]], ["circle", "star"])
    np.testing.assert_array_equal(labels, [0, -1, -1])


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize("variant", ["tfm", "att"])
def test_variant_output_and_attention_shapes(variant):
    keras.utils.set_random_seed(0)
    model = ICMLM(variant=variant, **TINY_MODEL)
    data = batch()
    outputs, labels, valid, tags = model.masked_batch(data, seed=(0, 0))
    cells, captions, vocab = 8 * 8, 4, len(VOCABULARY)
    assert outputs["image_logits"].shape == (captions, vocab) and outputs["text_logits"].shape == (captions, vocab)
    expected = (captions, 2, 1, cells) if variant == "att" else (captions, 2, cells + 12, cells + 12)
    assert tuple(outputs["attention"].shape) == expected
    np.testing.assert_allclose(np.sum(outputs["attention"].numpy(), axis=-1), 1.0, rtol=1e-4)
    assert outputs["tag_logits"].shape == (2, len(CONCEPTS))
    np.testing.assert_array_equal(valid.numpy(), [True, True, True, False])
    # Tag targets: the concepts any caption of the image names.
    named = [{"red", "circle", "photo", "cat", "small", "blue", "star"}, {"large", "green", "square"}]
    for row, words in enumerate(named):
        assert {CONCEPTS[i] for i in np.flatnonzero(tags.numpy()[row])} == words
    assert model(data["image"]).shape == (2, 8)  # call: the pooled visual encoder
    # The image-conditioned prediction depends on the image.
    other = {"image": 1.0 - data["image"], "captions": data["captions"]}
    assert not np.allclose(outputs["image_logits"], model.masked_batch(other, seed=(0, 0))[0]["image_logits"])


def test_text_only_ablation_ignores_the_image_and_trains_only_the_language_model():
    keras.utils.set_random_seed(0)
    model = ICMLM(variant="text_only", **TINY_MODEL)
    data = batch()
    outputs = model.masked_batch(data, seed=(0, 0))[0]
    assert set(outputs) == {"text_logits"}
    other = {"image": 1.0 - data["image"], "captions": data["captions"]}
    np.testing.assert_allclose(outputs["text_logits"], model.masked_batch(other, seed=(0, 0))[0]["text_logits"])
    assert not any(v.path.startswith("small_cnn") for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    dataset = tf.data.Dataset.from_tensors(data).repeat()
    history = model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0).history
    assert history["masked_accuracy"] == history["masked_accuracy_text_only"]
    assert history["unmaskable_captions"][-1] == 2.0  # "of the and", counted (weight 0) in both steps
    clone = ICMLM.from_config(model.get_config())
    assert clone.variant == "text_only" and clone.vocabulary == VOCABULARY


# ---------------------------------------------------------------- bad input


def test_vocabulary_that_does_not_match_the_model(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(VOCABULARY[:-1]) + "\n")
    with pytest.raises(ConfigError, match=r"vocab.txt holds 19 tokens but the model was built for vocabulary_size 20"):
        ICMLM(**{**TINY_MODEL, "vocabulary": str(vocab_file), "concepts": CONCEPTS[:-1], "vocabulary_size": 20})
    vocab_file.write_text("\n".join(["[CLS]", *VOCABULARY]) + "\n")
    with pytest.raises(ConfigError, match=r"starts with \['\[CLS\]', '\[PAD\]', '\[UNK\]'\]; expected the reserved"):
        read_vocabulary(str(vocab_file))
    with pytest.raises(ConfigError, match=r"\['zebra'\] are not whole tokens of the vocabulary"):
        ICMLM(**{**TINY_MODEL, "concepts": CONCEPTS + ["zebra"]})
    with pytest.raises(ConfigError, match="vocabulary file .*missing.txt not found"):
        read_vocabulary(str(tmp_path / "missing.txt"))
    for error in (ConfigError, ValueError):
        with pytest.raises(error):
            read_vocabulary([])


def test_captions_without_concepts_and_missing_images(tmp_path):
    data = SimpleNamespace(image_shape=(32, 32, 3), train_captions=["of the and", "a the"] * 5)
    with pytest.raises(ConfigError, match="none of the 10 training captions contains a concept word"):
        recipes._icmlm_model_args({"vocabulary": VOCABULARY, "concepts": CONCEPTS}, data, 1)
    data.train_captions = ["of the and", "a red star", "a blue circle"] * 5
    filled = recipes._icmlm_model_args({"vocabulary": VOCABULARY}, data, 1)  # 5 skipped, counted in the log
    assert filled["vocabulary_size"] == len(VOCABULARY) and {"red", "star"} <= set(filled["concepts"])

    root = make_captioned_shapes(tmp_path / "shapes", n_train=4, n_val=0, n_test=2, image_size=32)
    (root / "images" / "train_00002.jpg").unlink()
    with pytest.raises(ConfigError, match=r"train_00002.jpg\): image file .*train_00002.jpg not found"):
        captioned_shapes(root, image_size=(32, 32), batch_size=2)


# ---------------------------------------------------------------- recipe fit, export, transfer


register_mirrored_fit("icmlm", "icmlm_shapes", TINY_FIT[1::2], make_data=lambda data: make_captioned_shapes(
    data, n_train=24, n_val=16, n_test=24, image_size=32, max_objects=1))


@pytest.fixture(scope="module")
def run(mirrored_runs):
    return mirrored_run(mirrored_runs, "icmlm")


@pytest.mark.slow  # the module's mirrored CLI fit: ~85 s of this file's wall time on the loaded 2-core machine
def test_recipe_fit_writes_masked_accuracy_and_probe_metrics(run):
    recipe, _ = recipes.load_recipe("icmlm_shapes")
    assert recipe["model"]["variant"] == "tfm" and recipe["train"]["seed"] == 0
    metrics = json.loads((run / "run" / "metrics.json").read_text())
    for key in ("masked_accuracy", "masked_accuracy_text_only", "linear_top1", "knn_top1", "linear_top1_colour"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["masked_captions"] == 24 * 5 and metrics["unmaskable_captions"] == 0
    header = (run / "run" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "masked_accuracy", "masked_accuracy_text_only", "tag_loss", "val_masked_accuracy"} <= set(header)
    resolved = (run / "run" / "recipe.yaml").read_text()
    assert "- '[MASK]'" in resolved and "concepts:" in resolved and "- circle" in resolved


@pytest.mark.slow
def test_export_embed_image_round_trip_and_from_run_transfer(run, tmp_path):
    _, model, data = recipes.load_trained(run / "run")
    path = recipes.export(run / "run", tmp_path / "models")
    loaded = tf.saved_model.load(str(path))
    images = next(iter(data.test.images))[:4]
    expected = tf.math.l2_normalize(model.encoder(images, training=False), axis=-1)
    np.testing.assert_allclose(loaded.signatures["embed_pixels"](images=images)["embeddings"], expected, atol=1e-5)
    encoded = tf.constant([tf.io.encode_png(tf.cast(tf.round(i * 255), tf.uint8)).numpy() for i in images])
    embedded = loaded.signatures["embed_image"](images=encoded)["embeddings"]
    np.testing.assert_allclose(embedded, expected, atol=1e-5)
    assert json.loads((path / "assets.extra" / "vislearn.json").read_text())["kind"] == "image_embedder"

    transferred = build_backbone({"name": "small_cnn", "width": 4, "depth": 2, "from_run": str(run / "run")},
                                 (32, 32, 3))
    for a, b in zip(transferred.get_weights(), model.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
