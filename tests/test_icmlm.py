"""ICMLM: concept masking, both variants' shapes, the text-only ablation, bad
input, a recipe fit under MirroredStrategy (2 logical CPUs) whose visual
encoder exports as `embed_image` and transfers through `backbone.from_run`,
and a user's local BERT preset as the frozen language model (a tiny random
BERT saved as a keras-hub preset; in-process fits of both variants)."""

import json
import shutil
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import mirrored_run, register_mirrored_fit, run_cli, two_step_fit
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


@pytest.mark.parametrize("variant", ["tfm", "att"])
def test_variant_trains_from_model_fit_in_a_script(variant):
    keras.utils.set_random_seed(0)
    model = ICMLM(variant=variant, **TINY_MODEL)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    encoder_before = [v.numpy().copy() for v in model.encoder.trainable_variables]
    dataset = tf.data.Dataset.from_tensors(batch()).repeat()
    history = model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0).history
    assert {"loss", "tag_loss", "masked_accuracy", "masked_accuracy_text_only"} <= set(history)
    assert all(np.isfinite(history[key][-1]) for key in ("loss", "tag_loss"))
    # The visual encoder learns from the masked-word and tag losses.
    assert any(not np.allclose(before, after.numpy())
               for before, after in zip(encoder_before, model.encoder.trainable_variables))


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


# ---------------------------------------------------------------- a user's local BERT preset, frozen


def save_tiny_bert_preset(directory, words):
    """A tiny random BERT (2 layers, hidden 32) and its WordPiece tokenizer,
    saved as a local keras-hub preset the way a user saves a pretrained one.
    [MASK] is id 4 (not 2 as in a captions-built vocabulary), so a model that
    masked with the wrong id would be caught."""
    import keras_hub

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", *words]
    keras_hub.models.BertBackbone(vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=32,
                                  intermediate_dim=64, max_sequence_length=64).save_to_preset(str(directory))
    keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True).save_to_preset(str(directory))
    return directory


@pytest.fixture(scope="module")
def bert_preset(tmp_path_factory):
    """captioned_shapes and a tiny BERT preset whose vocabulary is its caption
    words, except "triangle", which it splits into two wordpieces (so it
    cannot be a concept)."""
    from vislearn.data.caption_concepts import caption_words
    from vislearn.data.captioned_shapes import JSON_NAME

    root = tmp_path_factory.mktemp("bert_preset")
    shapes = make_captioned_shapes(root / "shapes", n_train=24, n_val=16, n_test=24, image_size=32, max_objects=1)
    images = json.loads((shapes / JSON_NAME).read_text())["images"]
    words = sorted({w for image in images for s in image["sentences"] for w in caption_words(s["raw"])})
    assert "triangle" in words
    words = [w for w in words if w != "triangle"] + ["tri", "##angle"]
    return SimpleNamespace(shapes=shapes, words=words, path=save_tiny_bert_preset(root / "tiny_bert", words))


def bert_weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.bert.weights]


@pytest.fixture(scope="module", params=["tfm", "att"])
def bert_run(request, bert_preset, tmp_path_factory):
    """`vislearn fit icmlm_shapes --set model.bert_preset=DIR` in this process;
    the model `fit` trained is kept, with its weights before training."""
    run_dir = tmp_path_factory.mktemp(f"bert_{request.param}") / "run"
    build_model, built = recipes.build_model, []

    def build_and_remember(recipe, section):
        model = build_model(recipe, section)
        built.append(SimpleNamespace(model=model, bert=bert_weights(model), encoder=model.encoder.get_weights()))
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipes, "build_model", build_and_remember)
        result = run_cli("fit", "icmlm_shapes", "--run-dir", run_dir, *TINY_FIT,
                         "--set", f"data.root={bert_preset.shapes}", "--set", f"model.bert_preset={bert_preset.path}",
                         "--set", f"model.variant={request.param}")
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(run_dir=run_dir, initial=built[0], model=built[0].model, preset=bert_preset)


def test_bert_preset_fit_keeps_bert_frozen_and_trains_the_visual_encoder(bert_run):
    import keras_hub

    model = bert_run.model
    pretrained = keras_hub.models.BertBackbone.from_preset(str(bert_run.preset.path))
    for trained, initial, saved in zip(bert_weights(model), bert_run.initial.bert, pretrained.get_weights()):
        np.testing.assert_array_equal(trained, initial)
        np.testing.assert_array_equal(trained, saved)
    frozen = {id(v) for v in model.bert.weights}
    assert not any(id(v) in frozen for v in model.trainable_variables)
    assert model.text_projection is not None  # BERT's hidden 32 -> width 16
    changed = [not np.array_equal(a, b) for a, b in zip(model.encoder.get_weights(), bert_run.initial.encoder)]
    assert any(changed)

    metrics = json.loads((bert_run.run_dir / "metrics.json").read_text())
    for key in ("masked_accuracy", "masked_accuracy_text_only"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["masked_captions"] > 0
    history = (bert_run.run_dir / "history.csv").read_text().splitlines()
    assert "nan" not in history[1] and "inf" not in history[1]
    resolved = recipes.read_yaml(bert_run.run_dir / "recipe.yaml")["model"]
    assert resolved["bert_preset"] == str(bert_run.preset.path) and "vocabulary" not in resolved
    assert resolved["vocabulary_size"] == len(model.vocabulary)
    assert "triangle" not in resolved["concepts"] and {"circle", "square"} <= set(resolved["concepts"])


def test_bert_preset_load_trained_gives_the_same_predictions(bert_run, tmp_path):
    _, loaded, data = recipes.load_trained(bert_run.run_dir)
    assert loaded.bert_preset == str(bert_run.preset.path)
    images = next(iter(data.test.images))[:4]
    captioned = {"image": images, "captions": tf.constant([["a red circle", "a large blue star on a cat"]] * 4)}
    expected = bert_run.model.masked_batch(captioned, seed=(3, 4))[0]
    outputs = loaded.masked_batch(captioned, seed=(3, 4))[0]
    for key in ("text_logits", "image_logits"):
        np.testing.assert_allclose(outputs[key], expected[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded(images), bert_run.model(images), rtol=1e-5, atol=1e-5)

    # The preset moved away: rebuilding the run is a one-line error naming the key and the path.
    moved = tmp_path / "run"
    shutil.copytree(bert_run.run_dir, moved)
    recipe_file = moved / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(bert_run.preset.path), str(tmp_path / "gone")))
    with pytest.raises(ConfigError, match=r"^model.bert_preset: '.*gone' is not an existing local directory") as error:
        recipes.load_trained(moved)
    assert "\n" not in str(error.value)


def test_bert_preset_masks_concept_tokens_with_its_mask_id_and_text_only_trains(bert_preset):
    keras.utils.set_random_seed(0)
    model = ICMLM(**{**TINY_MODEL, "vocabulary": None, "bert_preset": str(bert_preset.path), "variant": "text_only"})
    vocabulary = (bert_preset.path / "assets" / "tokenizer" / "vocabulary.txt").read_text().split()
    assert model.vocabulary == vocabulary and model.mask_id == vocabulary.index("[MASK]") == 4
    tokens = model.tokenize(tf.reshape(batch()["captions"], [-1]))
    assert np.all(tokens.numpy()[:, 0] == vocabulary.index("[CLS]"))  # [CLS] caption [SEP]: BERT's layout
    masked, positions, labels, valid = (t.numpy() for t in mask_one_concept(
        tokens, tf.gather(model.concept_index, tokens) >= 0, model.mask_id, (0, 0)))
    np.testing.assert_array_equal(valid, [True, True, True, False])
    for row in np.flatnonzero(valid):
        assert masked[row, positions[row]] == 4 and vocabulary[labels[row]] in CONCEPTS
    # The text-only ablation: the frozen BERT and the encoder stay; the projection and the head learn.
    assert {v.path.split("/")[0] for v in model.trainable_variables} == {"text_projection", "text_head"}
    history = two_step_fit(model, tf.data.Dataset.from_tensors(batch()).repeat(), optimizer=keras.optimizers.Adam(1e-2))
    assert np.isfinite(history["loss"][-1]) and history["unmaskable_captions"][-1] == 2.0


def test_bert_preset_bad_input(bert_preset, tmp_path, caplog):
    args = {**TINY_MODEL, "vocabulary": None}
    bad = {
        str(tmp_path / "missing"): r"'.*missing' is not an existing local directory; only local keras-hub presets",
        "bert_tiny_en_uncased": r"'bert_tiny_en_uncased' is not an existing local directory",  # never downloaded
        str(tmp_path): r".* is not a keras-hub BERT preset \(it holds no config.json",
    }
    only_backbone = tmp_path / "only_backbone"
    only_backbone.mkdir()
    for name in ("config.json", "model.weights.h5", "metadata.json"):
        shutil.copy(bert_preset.path / name, only_backbone / name)
    bad[str(only_backbone)] = r".*only_backbone is not a keras-hub BERT preset \(it holds no tokenizer.json"
    not_bert = tmp_path / "not_bert"
    not_bert.mkdir()
    (not_bert / "config.json").write_text("{}")
    (not_bert / "tokenizer.json").write_text("{}")
    bad[str(not_bert)] = r".*not_bert is not a keras-hub BERT preset that loads as BertTokenizer \(Unrecognized"
    for path, message in bad.items():
        with pytest.raises(ConfigError, match=f"^model.bert_preset: {message}") as error:
            ICMLM(**{**args, "bert_preset": path})
        assert "\n" not in str(error.value)
    preset = str(bert_preset.path)
    with pytest.raises(ConfigError, match=r"model.vocabulary: give either model.vocabulary or model.bert_preset"):
        ICMLM(**{**args, "vocabulary": VOCABULARY, "bert_preset": preset})
    with pytest.raises(ConfigError, match=r"\['triangle'\] are not whole tokens of the vocabulary"):
        ICMLM(**{**args, "concepts": CONCEPTS + ["triangle"], "bert_preset": preset})  # split into wordpieces
    with pytest.raises(ConfigError, match=r"holds \d+ tokens but the model was built for vocabulary_size 7"):
        ICMLM(**{**args, "vocabulary_size": 7, "bert_preset": preset})
    with pytest.raises(ConfigError, match=r"model.sequence_length: 100 is longer than .* max_sequence_length 64"):
        ICMLM(**{**args, "sequence_length": 100, "bert_preset": preset})

    # Recipes derive the concepts from the preset's vocabulary; a word it splits is counted and left out.
    data = SimpleNamespace(image_shape=(32, 32, 3), train_captions=["a red triangle", "a blue circle"] * 5)
    filled = recipes._icmlm_model_args({"bert_preset": preset}, data, 1)
    assert "vocabulary" not in filled and filled["vocabulary_size"] == 6 + len(bert_preset.words)
    assert {"red", "blue", "circle"} <= set(filled["concepts"]) and "triangle" not in filled["concepts"]
    assert "1 caption word(s) that would be concepts are not one token of model.bert_preset's vocabulary " \
           "(e.g. 'triangle')" in caplog.text
