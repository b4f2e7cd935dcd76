"""The self-supervised evaluation protocol against scikit-learn references."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vislearn.data.unlabelled import labelled_subset
from vislearn.evaluation.representation import (KNNMonitor, extract_features, knn_predict, knn_top1,
                                                label_budget_metrics, linear_top1, representation_metrics)


@pytest.fixture(scope="module")
def digit_features():
    """Real features: the 64 raw pixels of scikit-learn's digits, a fixed split."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    x, y = digits.data[order].astype("float32"), digits.target[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def test_linear_probe_matches_scikit_learn_on_the_same_features(digit_features):
    x_train, y_train, x_test, y_test = digit_features
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    expected = float(np.mean(reference.predict(x_test) == y_test))
    assert linear_top1(x_train, y_train, x_test, y_test) == pytest.approx(expected)
    assert expected > 0.9  # digits pixels are nearly linearly separable


def test_knn_matches_scikit_learn_weighted_cosine_knn(digit_features):
    x_train, y_train, x_test, y_test = digit_features
    # sklearn's cosine distance is 1 - similarity; weights exp(similarity / 0.07).
    reference = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                                     weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(x_train, y_train)
    expected = reference.predict(x_test)
    predicted = knn_predict(x_train, y_train, x_test, k=20, temperature=0.07)
    assert np.mean(predicted == expected) >= 0.995
    assert knn_top1(x_train, y_train, x_test, y_test) == pytest.approx(np.mean(expected == y_test), abs=0.004)


def test_knn_votes_are_temperature_weighted_not_majority():
    # Two near neighbours of class 1 outvote three far ones of class 0 only
    # because their exp(sim / T) weights are larger.
    bank = np.array([[1.0, 0.02], [1.0, -0.02], [0.5, 1.0], [0.5, -1.0], [0.4, 1.0]], "float32")
    labels = np.array([1, 1, 0, 0, 0])
    query = np.array([[1.0, 0.0]], "float32")
    assert knn_predict(bank, labels, query, k=5, temperature=0.07)[0] == 1
    assert knn_predict(bank, labels, query, k=5, temperature=1e3)[0] == 0  # ~majority vote


def _labelled(x, y, batch=64):
    images = tf.image.resize(tf.constant(x.reshape(-1, 8, 8, 1) / 16.0, "float32"), (8, 8))
    return tf.data.Dataset.from_tensor_slices((tf.repeat(images, 3, axis=-1), y)).batch(batch)


def test_label_budgets_average_the_probe_over_class_balanced_draws(digit_features):
    x_train, y_train, x_test, y_test = digit_features
    train, test = _labelled(x_train, y_train), _labelled(x_test, y_test)
    inputs = keras.Input((8, 8, 3))
    encoder = keras.Model(inputs, keras.layers.Flatten()(inputs), name="identity")
    results = label_budget_metrics(encoder, train, test, budgets=(1, 5, None), draws=2)
    assert set(results) == {1, 5, None}

    features, labels = extract_features(encoder, train)
    test_features, _ = extract_features(encoder, test)
    draws = [labelled_subset(labels, 5, draw) for draw in range(2)]
    for keep in draws:  # 5 images of every class, a different 50 per draw
        assert np.array_equal(np.bincount(labels[keep]), np.full(10, 5))
    assert not np.array_equal(draws[0], draws[1])
    expected = np.mean([linear_top1(features[keep], labels[keep], test_features, y_test) for keep in draws])
    assert results[5]["linear_top1"] == pytest.approx(expected)
    assert results[None]["linear_top1"] == pytest.approx(linear_top1(features, labels, test_features, y_test))
    assert results[None]["knn_top1"] == pytest.approx(knn_top1(features, labels, test_features, y_test))
    # More labels, a better probe, on real pixels.
    assert results[1]["linear_top1"] < results[5]["linear_top1"] < results[None]["linear_top1"]


def test_metrics_of_an_encoder_and_the_online_monitor_in_history_csv(digit_features, tmp_path):
    x_train, y_train, x_test, y_test = digit_features
    train, test = _labelled(x_train, y_train), _labelled(x_test, y_test)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    encoder = keras.Model(inputs, keras.layers.Flatten()(inputs), name="identity")
    metrics = representation_metrics(encoder, train, test)
    features, labels = extract_features(encoder, test)
    assert features.shape == (len(x_test), 192) and np.array_equal(labels, y_test)
    assert metrics["knn_top1"] == pytest.approx(knn_top1(*extract_features(encoder, train), features, labels))

    # The monitor writes knn_top1 into the logs before CSVLogger reads them.
    head = keras.layers.Dense(10, activation="softmax")
    model = keras.Model(inputs, head(keras.layers.Dense(16, activation="relu")(encoder.output)))
    model.encoder = encoder
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    csv_file = tmp_path / "history.csv"
    history = model.fit(train, epochs=2, verbose=0,
                        callbacks=[KNNMonitor(train, test), keras.callbacks.CSVLogger(str(csv_file))])
    assert history.history["knn_top1"] == pytest.approx([metrics["knn_top1"]] * 2)  # identity encoder
    rows = list(csv.DictReader(csv_file.open()))
    assert len(rows) == 2 and float(rows[0]["knn_top1"]) == pytest.approx(metrics["knn_top1"])


def test_extracted_features_follow_the_encoders_current_weights(digit_features):
    # extract_features reuses one traced forward pass per encoder (the kNN
    # monitor calls it every epoch): it must read the weights as they are now.
    x_train, y_train, _, _ = digit_features
    images = _labelled(x_train[:100], y_train[:100], batch=32)  # a short last batch (100 = 3*32 + 4)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    encoder = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    eager = np.concatenate([encoder(batch, training=False) for batch, _ in images])
    before, labels = extract_features(encoder, images)
    np.testing.assert_allclose(before, eager, rtol=1e-5, atol=1e-6)
    assert np.array_equal(labels, y_train[:100])

    kernel = encoder.layers[-1].kernel
    kernel.assign(kernel.numpy() * -2.0)  # the bias is zero, so the features scale by -2
    after, _ = extract_features(encoder, images)
    np.testing.assert_allclose(after, -2.0 * before, rtol=1e-4, atol=1e-5)
