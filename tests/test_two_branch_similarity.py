"""two_branch_similarity: the logistic pair loss, scoring-based retrieval
against brute force, a short fit of the bundled recipe under MirroredStrategy
(2 logical CPUs), the export's `score` signature."""

import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import mirrored_run, register_mirrored_fit
from vislearn.data.captioned_shapes import make_captioned_shapes
from vislearn.evaluation.retrieval import RECALL_AT
from vislearn.models.two_branch_similarity import PairLogisticLoss, TwoBranchSimilarity, scored_retrieval_metrics

TINY = ["data.image_size=[32, 32]", "data.batch_size=8", "train.epochs=1", "train.steps_per_epoch=2",
        "model.hidden_units=32", "model.embed_dim=16", "model.word_dim=8", "model.similarity_units=8",
        "model.backbone={name: small_cnn, width: 8, depth: 2}"]


def tiny_model(**kwargs):
    model = TwoBranchSimilarity(image_shape=(32, 32, 3), vocabulary=["red", "circle", "blue", "star"],
                               backbone={"name": "small_cnn", "width": 4, "depth": 1}, word_dim=8,
                               hidden_units=16, embed_dim=8, similarity_units=6, **kwargs)
    model.build((None, 32, 32, 3))
    return model


def test_pair_logistic_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.normal(0, 3, 20), [60.0, -60.0]]).astype(np.float32)
    labels = np.concatenate([rng.integers(0, 2, 20), [0, 1]]).astype(np.float32)
    sign = 2 * labels.astype(np.float64) - 1
    expected = np.mean(np.logaddexp(0.0, -sign * logits))  # log(1 + exp(-y s)), stable
    assert float(PairLogisticLoss()(labels, logits)) == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(expected) and expected > 60 / 22  # the two saturated wrong pairs dominate


def test_sampled_pairs_are_mismatched_and_balanced():
    model = tiny_model(negatives_per_positive=3)
    sentence_image = tf.repeat(tf.range(5), 2)  # 5 images x 2 captions
    images, sentences, labels = (x.numpy() for x in model._sampled_pairs(sentence_image, 5))
    owner = sentence_image.numpy()[sentences]
    assert len(labels) == 10 * 4 and labels.sum() == 10
    assert np.all((owner == images) == (labels == 1))  # positives match, every negative is mismatched


def test_hardest_negatives_are_the_top_scoring_mismatched_pairs():
    model = tiny_model(negatives_per_positive=3, negative_sampling="hardest")
    rng = np.random.default_rng(3)
    images, sentences = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    sentence_image = np.repeat(np.arange(5), 2)
    rows, columns, labels = (x.numpy() for x in model._sampled_pairs(tf.constant(sentence_image, tf.int32), 5,
                                                                      tf.constant(images), tf.constant(sentences)))
    scores = model.score_matrix(images, sentences).T  # [sentence, image]
    for s in range(10):  # sentence s's negatives follow the 10 positives, 3 per sentence
        negatives = set(zip(rows[10 + 3 * s:13 + 3 * s], columns[10 + 3 * s:13 + 3 * s]))
        i = sentence_image[s]
        other_images = [j for j in np.argsort(-scores[s], kind="stable") if j != i][:2]
        other_sentences = [t for t in np.argsort(-scores[:, i], kind="stable") if sentence_image[t] != i][:1]
        assert negatives == {(other_images[0], s), (other_images[1], s), (i, other_sentences[0])}
    with pytest.raises(ValueError, match="negative_sampling: expected one of"):
        tiny_model(negative_sampling="semi_hard")


def test_score_matrix_and_metrics_equal_brute_force():
    model = tiny_model()
    rng = np.random.default_rng(1)
    head = model.similarity_head
    head.layers[1].moving_mean.assign(rng.normal(size=6).astype(np.float32))  # non-trivial inference BN
    head.layers[1].moving_variance.assign(rng.uniform(0.5, 2, size=6).astype(np.float32))
    images = rng.normal(size=(7, 8)).astype(np.float32)
    texts = rng.normal(size=(14, 8)).astype(np.float32)
    caption_image = np.repeat(np.arange(7), 2)

    w1, b1 = (np.asarray(v) for v in head.layers[0].weights)
    gamma, beta, mean, variance = (np.asarray(v) for v in head.layers[1].weights)
    w2, b2 = (np.asarray(v) for v in head.layers[3].weights)
    brute = np.zeros((7, 14))
    for i in range(7):
        for t in range(14):
            hidden = (images[i] * texts[t]) @ w1 + b1
            hidden = (hidden - mean) / np.sqrt(variance + head.layers[1].epsilon) * gamma + beta
            brute[i, t] = (np.maximum(hidden, 0) @ w2 + b2)[0]
    for budget in (1, 50, 2 ** 24):  # one image per chunk, a few, all at once
        np.testing.assert_allclose(model.score_matrix(images, texts, max_chunk_values=budget), brute, atol=1e-4)

    class Split:  # a RetrievalSplit of precomputed "images" through an identity model
        captions = [str(t) for t in range(14)]

    Split.caption_image, Split.images = caption_image, [images]
    model.embed_image = lambda batch, training=False: batch
    model.embed_text = lambda strings, training=False: texts[[int(s) for s in np.asarray(strings).astype(str)]]
    metrics = scored_retrieval_metrics(model, Split)
    for k in RECALL_AT:
        t2i = np.mean([np.sum(brute[:, t] > brute[caption_image[t], t]) < k for t in range(14)])
        i2t = np.mean([min(np.sum(brute[i] > brute[i, t]) for t in np.flatnonzero(caption_image == i)) < k
                       for i in range(7)])
        assert metrics[f"t2i_r{k}"] == pytest.approx(t2i) and metrics[f"i2t_r{k}"] == pytest.approx(i2t)


register_mirrored_fit("two_branch_similarity", "two_branch_similarity_shapes", TINY,
                      make_data=lambda data: make_captioned_shapes(data, n_train=24, n_val=8, n_test=12, image_size=32))


@pytest.fixture(scope="module")
def run(mirrored_runs):
    root = mirrored_run(mirrored_runs, "two_branch_similarity")
    return root, json.loads((root / "run" / "metrics.json").read_text())


def test_recipe_fit_writes_retrieval_metrics(run):
    root, metrics = run
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "t2t_r1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["rsum"] == pytest.approx(sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT))
    header = (root / "run" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "pair_accuracy", "val_loss", "val_rsum"} <= set(header)
    resolved = (root / "run" / "recipe.yaml").read_text()
    assert "name: two_branch_similarity" in resolved and "- circle" in resolved


def test_index_build_refuses_a_similarity_run(run):
    """A cosine index of the branch embeddings is not what this model scores."""
    from vislearn.config import ConfigError
    from vislearn.index import build_index

    root, _ = run
    with pytest.raises(ConfigError, match="scores pairs with a network"):
        build_index(root / "run", root / "lookups", "shapes", captions=root / "data" / "dataset_captioned_shapes.json")


def test_export_score_signature_matches_model(tmp_path):
    from PIL import Image

    from vislearn.export import decode_batch
    from vislearn.models.two_branch_similarity import export_text_image_scorer

    model = tiny_model()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    encoded = tf.constant([(tmp_path / f"{i}.png").read_bytes() for i in range(3)])
    texts = tf.constant(["a red circle", "", "zebra"])  # plain, empty, out-of-vocabulary
    loaded = tf.saved_model.load(str(export_text_image_scorer(model, tmp_path / "export" / "1", (32, 32, 3))))
    scores = loaded.signatures["score"](images=encoded, texts=texts)["scores"].numpy()
    expected = model.score_matrix(model.embed_image(decode_batch(encoded, (32, 32, 3))), model.embed_text(texts))
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="negatives_per_positive: expected a positive integer, received 0"):
        tiny_model(negatives_per_positive=0)
    assert TwoBranchSimilarity.from_config(tiny_model().get_config()).similarity_units == 6
