"""Exemplar CNN: every seed patch is its own surrogate class.

N seed images ("exemplars") are drawn once from the unlabelled set and
numbered 0..N-1 (the data pipeline does this: `train_targets="exemplars"`).
Each training step applies a composition of strong random transformations
to every seed (crop/translation, scale, rotation, contrast, colour) and
trains the encoder with an N-way classifier to recognise which seed each
transformed copy came from. Features that survive every transformation of
a patch but still tell patches apart are what a recognition task needs.

Reference:
    Dosovitskiy, Springenberg, Riedmiller, Brox, "Discriminative Unsupervised
    Feature Learning with Convolutional Neural Networks", NeurIPS 2014
    (and TPAMI 2016, "... with Exemplar Convolutional Neural Networks").
"""

import math

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import build_backbone
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean


def _uniform(batch, low, high):
    return tf.random.uniform([batch], low, high)


@keras.saving.register_keras_serializable(package="vislearn")
class ExemplarCNN(keras.Model):
    """Exemplar-CNN surrogate-class model.

    Args:
        num_exemplars: N, the number of seed patches = surrogate classes.
        image_shape: (height, width, channels) of the seed patches.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone: the encoder.
        head_units: hidden widths of the N-way classifier.
        dropout: dropout before the classifier (the paper uses dropout).
        translation: max shift as a fraction of the patch side (paper: 0.2).
        scale: (min, max) scale factor (paper: 0.7 to 1.4).
        rotation: max rotation in degrees (paper: 20).
        contrast: (min, max) factor scaling each pixel's deviation from the
            patch mean (stand-in for the paper's principal-component scaling).
        power: (min, max) exponent applied to saturation and value in HSV
            (paper: 0.25 to 4; milder by default for small images).
        hue: max shift added to the hue (paper: 0.1).

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        Surrogate-class logits (batch, num_exemplars).

    Training data:
        `(seed image, exemplar index)` batches.
    """

    def __init__(self, num_exemplars=1000, image_shape=(32, 32, 3), backbone="small_cnn", head_units=(128,),
                 dropout=0.0, translation=0.2, scale=(0.7, 1.4), rotation=20.0, contrast=(0.5, 2.0),
                 power=(0.5, 2.0), hue=0.1, **kwargs):
        super().__init__(**kwargs)
        if int(num_exemplars) < 2:
            raise ValueError(f"model.num_exemplars: expected at least 2, received {num_exemplars}")
        self.num_exemplars = int(num_exemplars)
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.head_units = tuple(head_units)
        self.dropout = float(dropout)
        self.translation = float(translation)
        self.scale = tuple(float(s) for s in scale)
        self.rotation = float(rotation)
        self.contrast = tuple(float(c) for c in contrast)
        self.power = tuple(float(p) for p in power)
        self.hue = float(hue)

        self.encoder = build_backbone(backbone, self.image_shape)
        head = [layers.Dense(u, activation="relu", name=f"head_fc{i}") for i, u in enumerate(self.head_units)]
        if self.dropout:
            head.append(layers.Dropout(self.dropout, name="head_dropout"))
        self.head = keras.Sequential(head + [layers.Dense(self.num_exemplars, name="head_exemplar")],
                                     name="exemplar_head")
        self.head.build(self.encoder.output_shape)

        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="exemplar_accuracy")

    def call(self, images, training=False):
        return self.head(self.encoder(images, training=training), training=training)

    def transform(self, images):
        """One strong random transformation per image: an affine warp
        (translation, scale, rotation), then contrast and HSV colour changes."""
        batch = tf.shape(images)[0]
        height, width = self.image_shape[0], self.image_shape[1]
        # Affine: the output pixel (x, y) samples the input at A (x - c) + c + t.
        angle = _uniform(batch, -1.0, 1.0) * self.rotation * math.pi / 180.0
        zoom = 1.0 / _uniform(batch, *self.scale)          # > 1 samples a wider area: smaller content
        tx = _uniform(batch, -1.0, 1.0) * self.translation * width
        ty = _uniform(batch, -1.0, 1.0) * self.translation * height
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        cos, sin = tf.cos(angle) * zoom, tf.sin(angle) * zoom
        zeros = tf.zeros_like(cos)
        matrix = tf.stack([cos, -sin, cx - cos * cx + sin * cy + tx,
                           sin, cos, cy - sin * cx - cos * cy + ty, zeros, zeros], axis=1)
        x = keras.ops.image.affine_transform(images, matrix, interpolation="bilinear", fill_mode="constant")

        # Contrast: scale each pixel's deviation from the patch mean.
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = tf.clip_by_value((x - mean) * _uniform(batch, *self.contrast)[:, None, None, None] + mean, 0.0, 1.0)

        # Colour: saturation and value raised to a power, hue shifted.
        if self.image_shape[-1] == 3:
            hsv = tf.image.rgb_to_hsv(x)
            log_low, log_high = math.log(self.power[0]), math.log(self.power[1])
            powers = tf.exp(tf.random.uniform([batch, 1, 1, 2], log_low, log_high))
            sv = tf.pow(tf.maximum(hsv[..., 1:], 1e-6), powers)
            h = tf.math.floormod(hsv[..., :1] + _uniform(batch, -self.hue, self.hue)[:, None, None, None], 1.0)
            x = tf.image.hsv_to_rgb(tf.concat([h, sv], axis=-1))
        return tf.clip_by_value(x, 0.0, 1.0)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_metric]

    def train_step(self, data):
        seeds, exemplar_ids = data[0], data[1]
        transformed = self.transform(seeds)
        with tf.GradientTape() as tape:
            logits = self(transformed, training=True)
            loss = self.loss_fn(exemplar_ids, logits)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(exemplar_ids, logits)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        config.update(num_exemplars=self.num_exemplars, image_shape=list(self.image_shape),
                      backbone=self.backbone_spec, head_units=list(self.head_units), dropout=self.dropout,
                      translation=self.translation, scale=list(self.scale), rotation=self.rotation,
                      contrast=list(self.contrast), power=list(self.power), hue=self.hue)
        return config
