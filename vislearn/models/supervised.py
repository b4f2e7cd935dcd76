"""Supervised baseline: the same encoder trained with labels.

The upper reference row of the self-supervised table: a linear softmax
classifier on the encoder, trained end to end with cross-entropy on the
labelled training split. Its encoder is then evaluated with the same frozen
protocol (linear probe, kNN) as every pretext method.

Reference:
    the "supervised" rows of Zhang, Isola, Efros, "Colorful Image
    Colorization", ECCV 2016 and Gidaris et al., ICLR 2018.
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import build_backbone
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean


@keras.saving.register_keras_serializable(package="vislearn")
class Supervised(keras.Model):
    """Encoder + softmax classifier trained with labels.

    Args:
        num_classes: number of label classes.
        image_shape: (height, width, channels) of the input images.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone: the encoder.
        dropout: dropout rate before the classifier.

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        Class probabilities (batch, num_classes).

    Training data:
        `(image, label)` batches.
    """

    def __init__(self, num_classes=10, image_shape=(32, 32, 3), backbone="small_cnn", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.dropout = float(dropout)

        self.encoder = build_backbone(backbone, self.image_shape)
        self.head = keras.Sequential(
            ([layers.Dropout(self.dropout, name="head_dropout")] if self.dropout else [])
            + [layers.Dense(self.num_classes, activation="softmax", name="head_classes")], name="classifier")
        self.head.build(self.encoder.output_shape)

        self.loss_fn = keras.losses.SparseCategoricalCrossentropy()
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, images, training=False):
        return self.head(self.encoder(images, training=training), training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_metric]

    def train_step(self, data):
        images, labels = data[0], data[1]
        with tf.GradientTape() as tape:
            probabilities = self(images, training=True)
            loss = self.loss_fn(labels, probabilities)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(labels, probabilities)
        return step_logs(self.metrics)

    def test_step(self, data):
        images, labels = data[0], data[1]
        probabilities = self(images, training=False)
        self.loss_tracker.update_state(per_replica_mean(self.loss_fn(labels, probabilities)))
        self.accuracy_metric.update_state(labels, probabilities)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, image_shape=list(self.image_shape),
                      backbone=self.backbone_spec, dropout=self.dropout)
        return config
