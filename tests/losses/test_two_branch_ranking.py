"""The bi-directional ranking loss against a plain numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

from vislearn.losses.ranking import BidirectionalRankingLoss


def _reduce(hinges, negatives, mode, k):
    values = hinges[negatives]
    if mode == "sum":
        return values.sum()
    if mode == "hardest":
        return values.max()
    return np.sort(values)[::-1][:k].mean()


def reference(sentence_image, images, sentences, margin, k, mode, w_si, w_is, w_ss):
    """Loops over anchors, written from the definitions in the module docstring."""
    d = lambda a, b: float(np.sum((a - b) ** 2))  # noqa: E731
    n_s, n_i = len(sentences), len(images)
    to_image, to_sentence, within = [], [], []
    for s in range(n_s):
        pos = d(sentences[s], images[sentence_image[s]])
        hinges = np.array([max(0.0, margin + pos - d(sentences[s], images[j])) for j in range(n_i)])
        to_image.append(_reduce(hinges, np.arange(n_i) != sentence_image[s], mode, k))
        hinges = np.array([max(0.0, margin + pos - d(sentences[t], images[sentence_image[s]])) for t in range(n_s)])
        other = sentence_image != sentence_image[s]
        to_sentence.append(_reduce(hinges, other, mode, k))
        siblings = [t for t in range(n_s) if t != s and sentence_image[t] == sentence_image[s]]
        if siblings:
            far = max(d(sentences[s], sentences[t]) for t in siblings)
            hinges = np.array([max(0.0, margin + far - d(sentences[s], sentences[t])) for t in range(n_s)])
            within.append(_reduce(hinges, other, mode, k))
    terms = np.mean(to_image), np.mean(to_sentence), np.mean(within) if within else 0.0
    return w_si * terms[0] + w_is * terms[1] + w_ss * terms[2], terms


def _normalised(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("mode,k", [("top_k", 10), ("top_k", 3), ("hardest", 10), ("sum", 10)])
def test_matches_numpy_reference(mode, k):
    rng = np.random.default_rng(0)
    # 12 images x 2 captions, plus two images with 1 and 3 captions (no sibling / several).
    sentence_image = np.array(list(np.repeat(np.arange(12), 2)) + [12, 13, 13, 13])
    images, sentences = _normalised(rng, (14, 8)), _normalised(rng, (len(sentence_image), 8))
    # Pull matching sentences towards their image so some hinges are zero and some are not.
    sentences = sentences + 0.8 * images[sentence_image]
    sentences /= np.linalg.norm(sentences, axis=1, keepdims=True)
    loss = BidirectionalRankingLoss(margin=0.2, top_k=k, negatives=mode)
    got = float(loss(sentence_image, (images, sentences)))
    expected, terms = reference(sentence_image, images, sentences, 0.2, k, mode, 1.5, 1.0, 0.05)
    assert all(t > 0 for t in terms)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    got_terms = loss.terms(tf.constant(sentence_image), images, sentences)
    np.testing.assert_allclose([float(got_terms[n]) for n in ("sentence_to_image", "image_to_sentence",
                                                              "sentence_sentence")], terms, rtol=1e-4)


def test_weights_and_constraint_off():
    rng = np.random.default_rng(1)
    sentence_image = np.repeat(np.arange(6), 3)
    images, sentences = _normalised(rng, (6, 4)), _normalised(rng, (18, 4))
    loss = BidirectionalRankingLoss(margin=0.1, sentence_to_image_weight=2.0, image_to_sentence_weight=0.5,
                                    sentence_weight=0.0)
    expected, _ = reference(sentence_image, images, sentences, 0.1, 10, "top_k", 2.0, 0.5, 0.0)
    np.testing.assert_allclose(float(loss(sentence_image, (images, sentences))), expected, rtol=1e-4)


def test_perfect_separation_gives_zero_and_gradients_flow():
    images = np.eye(4, dtype=np.float32)
    sentence_image = np.repeat(np.arange(4), 2)
    loss = BidirectionalRankingLoss()
    assert float(loss(sentence_image, (images, images[sentence_image]))) == 0.0
    variable = tf.Variable(np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        value = loss(sentence_image, (images, tf.math.l2_normalize(variable, axis=1)))
    assert float(value) > 0 and float(tf.reduce_sum(tf.abs(tape.gradient(value, variable)))) > 0


def test_bad_options():
    with pytest.raises(ValueError, match="negatives"):
        BidirectionalRankingLoss(negatives="semi_hard")
    with pytest.raises(ValueError, match="top_k"):
        BidirectionalRankingLoss(top_k=0)


def image_image_reference(images, neighbours, margin, k, mode):
    """The image constraint by loops: farthest neighbour + m < every non-neighbour."""
    d = lambda a, b: float(np.sum((a - b) ** 2))  # noqa: E731
    n = len(images)
    values = []
    for i in range(n):
        near = [j for j in range(n) if j != i and neighbours[i, j]]
        if near:
            far = max(d(images[i], images[j]) for j in near)
            hinges = np.array([max(0.0, margin + far - d(images[i], images[j])) for j in range(n)])
            others = np.array([j != i and not neighbours[i, j] for j in range(n)])
            values.append(_reduce(hinges, others, mode, k))
    return float(np.mean(values))


@pytest.mark.parametrize("mode,k", [("top_k", 10), ("top_k", 2), ("hardest", 10), ("sum", 10)])
def test_image_constraint_matches_numpy_reference(mode, k):
    rng = np.random.default_rng(3)
    sentence_image = np.repeat(np.arange(8), 2)
    images, sentences = _normalised(rng, (8, 6)), _normalised(rng, (16, 6))
    # Images 0-2 share a sentence, 3-4 too; 5-7 have no neighbour (skipped).
    neighbours = np.zeros((8, 8), bool)
    for group in ((0, 1, 2), (3, 4)):
        for a in group:
            for b in group:
                neighbours[a, b] = True
    loss = BidirectionalRankingLoss(margin=0.3, top_k=k, negatives=mode, image_weight=0.7)
    expected_image = image_image_reference(images, neighbours, 0.3, k, mode)
    assert expected_image > 0
    got = loss.terms(sentence_image, images, sentences, neighbours)["image_image"]
    np.testing.assert_allclose(float(got), expected_image, rtol=1e-4)
    # The total adds image_weight times it to the other three terms.
    base, _ = reference(sentence_image, images, sentences, 0.3, k, mode, 1.5, 1.0, 0.05)
    total = float(loss((sentence_image, neighbours), (images, sentences)))
    np.testing.assert_allclose(total, base + 0.7 * expected_image, rtol=1e-4)
    with pytest.raises(ValueError, match="image_weight is set"):
        loss(sentence_image, (images, sentences))
    # Off by default: the pair form of y_true then changes nothing.
    plain = BidirectionalRankingLoss(margin=0.3, top_k=k, negatives=mode)
    np.testing.assert_allclose(float(plain((sentence_image, neighbours), (images, sentences))), base, rtol=1e-4)
