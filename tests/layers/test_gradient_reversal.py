import numpy as np
import pytest
import tensorflow as tf

from helpers import layer_round_trip
from vislearn.layers import GradientReversal


def test_forward_is_identity_and_config_round_trips():
    layer = GradientReversal(0.7)
    x = tf.random.normal([4, 3], seed=0)
    np.testing.assert_allclose(layer(x), x)
    clone = layer_round_trip(layer, x)
    assert float(clone.lambda_) == pytest.approx(0.7)


def test_gradient_is_reversed_and_scaled():
    layer = GradientReversal(1.0)
    x = tf.constant([[1.0, -2.0, 3.0]])
    weights = tf.constant([[0.5, 2.0, -1.0]])
    for coefficient in (0.0, 0.25, 1.0):
        layer.lambda_.assign(coefficient)  # settable per step without rebuilding
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x) * weights)
        np.testing.assert_allclose(tape.gradient(y, x), -coefficient * weights)
