"""Retrieval metrics against a numpy reference, and the exact chunked top-k lookup."""

import numpy as np
import pytest
import tensorflow as tf

from vislearn.evaluation.retrieval import embedding_metrics, rank_metrics, text_to_text_r1
from vislearn.index import exact_top_k


def reference_metrics(similarity, caption_image):
    """Ranks counted one query at a time: how many candidates score strictly
    higher, or equal with a lower index (the stable tie rule)."""
    n_images, n_captions = similarity.shape

    def rank(scores, target):
        return int(np.sum(scores > scores[target]) + np.sum(scores[:target] == scores[target]))

    i2t = [min(rank(similarity[i], c) for c in range(n_captions) if caption_image[c] == i) for i in range(n_images)]
    t2i = [rank(similarity[:, c], caption_image[c]) for c in range(n_captions)]
    out = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = float(np.mean(ranks < k))
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(np.mean(ranks) + 1)
    out["rsum"] = sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def test_rank_metrics_match_reference():
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(40), 5)
    # Scores with signal (own image higher on average), noise, and some exact ties.
    similarity = rng.normal(size=(40, 200)) + 1.5 * (caption_image[None, :] == np.arange(40)[:, None])
    similarity = np.round(similarity, 1).astype(np.float32)
    got, expected = rank_metrics(similarity, caption_image), reference_metrics(similarity, caption_image)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key
    assert 0 < got["i2t_r1"] < got["i2t_r5"] < got["i2t_r10"] < 1 and 0 < got["t2i_r1"] < got["t2i_r10"] < 1


def test_design_keys_perfect_and_text_to_text():
    images = np.eye(6, dtype=np.float32)
    caption_image = np.repeat(np.arange(6), 3)
    metrics = embedding_metrics(images, images[caption_image], caption_image)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert metrics[key] == 1.0
    assert metrics["rsum"] == 6.0 and metrics["i2t_medr"] == metrics["t2i_medr"] == 1.0 and metrics["t2t_r1"] == 1.0
    # Captions whose nearest other caption belongs to another image.
    captions = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1]], np.float32)
    assert text_to_text_r1(captions, np.array([0, 0, 1, 1])) == 0.0
    assert text_to_text_r1(captions, np.array([0, 1, 0, 1])) == 1.0


def test_coco_1k_protocol_averages_five_folds():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(500, 8)).astype(np.float32)
    caption_image = np.repeat(np.arange(500), 2)
    captions = images[caption_image] + rng.normal(scale=1.2, size=(1000, 8)).astype(np.float32)
    metrics = embedding_metrics(images, captions, caption_image, fold_size=100)
    folds = [rank_metrics(images[s:s + 100] @ captions[2 * s:2 * s + 200].T, caption_image[:200])
             for s in range(0, 500, 100)]
    assert metrics["1k_t2i_r1"] == pytest.approx(np.mean([f["t2i_r1"] for f in folds]))
    assert metrics["1k_i2t_r10"] > metrics["i2t_r10"]  # the smaller folds are easier


@pytest.mark.parametrize("k,chunk", [(5, 7), (5, 1000), (40, 16), (1, 3)])
def test_exact_top_k_equals_brute_force(k, chunk):
    rng = np.random.default_rng(k + chunk)
    index, queries = rng.normal(size=(37, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    scores, ids = exact_top_k(queries, index, tf.constant(k), chunk)
    brute = queries @ index.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :min(k, 37)]  # k > N is clamped to N
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(brute, expected, axis=1), rtol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be at least 1"):
        exact_top_k(queries, index, tf.constant(0), chunk)
