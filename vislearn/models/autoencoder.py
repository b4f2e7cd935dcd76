"""Convolutional deep-bottleneck autoencoder, plain or denoising.

The encoder (a vislearn backbone) maps an image to a feature vector, a linear
bottleneck squeezes it to `code_size` numbers, and a transposed-convolution
decoder reconstructs the image from the code alone. With `corruption`
set, the *input* is corrupted (masking noise: a random fraction of pixels set
to 0; or additive Gaussian noise) while the target stays the clean image, so
the code must capture the image's structure rather than copy it: the
denoising autoencoder. The representation evaluated is the encoder's output.

References:
    Hinton, Salakhutdinov, "Reducing the Dimensionality of Data with Neural
    Networks", Science 2006.
    Vincent, Larochelle, Bengio, Manzagol, "Extracting and Composing Robust
    Features with Denoising Autoencoders", ICML 2008; Vincent et al., "Stacked
    Denoising Autoencoders", JMLR 2010.
"""

import math

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import build_backbone
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean

CORRUPTIONS = (None, "masking", "gaussian")
LOSSES = ("bce", "mse")


def build_decoder(code_size, image_shape, width, stages=3, name="decoder"):
    """code -> dense -> (h/2^s, w/2^s, 4*width) -> `stages` stride-2 transposed
    convolutions halving the width -> sigmoid image of `image_shape`."""
    height, wide, channels = image_shape
    start_h, start_w = math.ceil(height / 2**stages), math.ceil(wide / 2**stages)
    inputs = keras.Input((code_size,), name="code")
    x = layers.Dense(start_h * start_w * width * 2**(stages - 1), activation="relu", name="fc")(inputs)
    x = layers.Reshape((start_h, start_w, width * 2**(stages - 1)), name="unflatten")(x)
    for stage in reversed(range(stages)):
        x = layers.Conv2DTranspose(width * 2**stage, 3, strides=2, padding="same", activation="relu",
                                   name=f"up{stage}")(x)
    if (start_h * 2**stages, start_w * 2**stages) != (height, wide):
        x = layers.Resizing(height, wide, name="resize")(x)
    outputs = layers.Conv2D(channels, 3, padding="same", activation="sigmoid", name="pixels")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="vislearn")
class Autoencoder(keras.Model):
    """Convolutional (denoising) autoencoder.

    Args:
        image_shape: (height, width, channels) of the input images.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone: the encoder.
        code_size: width of the linear bottleneck.
        decoder_width: channels of the decoder's last transposed convolution
            (doubling per stage towards the code).
        corruption: None (plain autoencoder), `"masking"` (each pixel zeroed
            with probability `corruption_level`, Vincent et al.'s masking
            noise) or `"gaussian"` (additive noise of std `corruption_level`,
            clipped to [0, 1]).
        corruption_level: masking fraction or noise std.
        reconstruction_loss: `"bce"` (per-pixel cross-entropy, as in the
            papers for [0, 1] inputs) or `"mse"`.

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        The reconstructed images, same shape.

    Training data:
        Batches of images (no labels).
    """

    def __init__(self, image_shape=(32, 32, 3), backbone="small_cnn", code_size=64, decoder_width=16,
                 corruption=None, corruption_level=0.3, reconstruction_loss="bce", **kwargs):
        super().__init__(**kwargs)
        if corruption not in CORRUPTIONS:
            raise ValueError(f"model.corruption: expected one of {CORRUPTIONS}, received {corruption!r}")
        if reconstruction_loss not in LOSSES:
            raise ValueError(f"model.reconstruction_loss: expected one of {LOSSES}, received {reconstruction_loss!r}")
        if corruption == "masking" and not 0.0 <= corruption_level < 1.0:
            raise ValueError(f"model.corruption_level: a masking fraction must be in [0, 1), received {corruption_level}")
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.code_size = int(code_size)
        self.decoder_width = int(decoder_width)
        self.corruption = corruption
        self.corruption_level = float(corruption_level)
        self.reconstruction_loss = reconstruction_loss

        self.encoder = build_backbone(backbone, self.image_shape)
        self.bottleneck = layers.Dense(self.code_size, name="bottleneck")
        self.bottleneck.build(self.encoder.output_shape)
        self.decoder = build_decoder(self.code_size, self.image_shape, self.decoder_width)

        self.loss_fn = (keras.losses.BinaryCrossentropy() if reconstruction_loss == "bce"
                        else keras.losses.MeanSquaredError())
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mse_tracker = keras.metrics.Mean(name="mse")

    def encode(self, images, training=False):
        """The bottleneck code of each image."""
        return self.bottleneck(self.encoder(images, training=training))

    def call(self, images, training=False):
        return self.decoder(self.encode(images, training=training), training=training)

    def corrupt(self, images):
        """The input corruption of the denoising autoencoder (identity when off)."""
        if self.corruption == "masking":
            shape = tf.concat([tf.shape(images)[:-1], [1]], axis=0)  # the same pixel in every channel
            keep = tf.cast(tf.random.uniform(shape) >= self.corruption_level, images.dtype)
            return images * keep
        if self.corruption == "gaussian":
            noise = tf.random.normal(tf.shape(images), stddev=self.corruption_level, dtype=images.dtype)
            return tf.clip_by_value(images + noise, 0.0, 1.0)
        return images

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.mse_tracker]

    def _update(self, loss, images, reconstructions):
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.mse_tracker.update_state(tf.reduce_mean(tf.square(images - reconstructions)))
        return step_logs(self.metrics)

    def train_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        noisy = self.corrupt(images)
        with tf.GradientTape() as tape:
            reconstructions = self(noisy, training=True)
            loss = self.loss_fn(images, reconstructions)  # the clean image is the target
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._update(loss, images, reconstructions)

    def test_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        reconstructions = self(images, training=False)
        return self._update(self.loss_fn(images, reconstructions), images, reconstructions)

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), backbone=self.backbone_spec,
                      code_size=self.code_size, decoder_width=self.decoder_width,
                      corruption=self.corruption, corruption_level=self.corruption_level,
                      reconstruction_loss=self.reconstruction_loss)
        return config
