"""Gradient reversal layer (Ganin & Lempitsky, 2015)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="vislearn")
class GradientReversal(keras.layers.Layer):
    """Identity in the forward pass, multiplies the gradient by `-lambda_` backwards.

    Placed between a feature extractor and a domain classifier, it makes the
    extractor *maximise* the domain loss the classifier minimises, so one
    optimizer step trains both sides of the minimax game.

    Args:
        lambda_: float, initial coefficient of the reversed gradient. It is
            stored in a non-trainable variable so a training step can change it
            (`layer.lambda_.assign(v)`) without retracing.

    Call arguments:
        inputs: any tensor.

    Returns:
        `inputs`, unchanged.

    Reference:
        Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016.
    """

    def __init__(self, lambda_=1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_lambda = float(lambda_)
        self.lambda_ = self.add_weight(
            name="lambda",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_lambda),
            trainable=False,
            dtype="float32",
        )
        self.built = True  # no shape-dependent state; lets Keras see the model as built

    def call(self, inputs):
        coefficient = tf.cast(self.lambda_, inputs.dtype)

        @tf.custom_gradient
        def reverse(x):
            def grad(upstream):
                return -coefficient * upstream

            return tf.identity(x), grad

        return reverse(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["lambda_"] = self.initial_lambda
        return config
