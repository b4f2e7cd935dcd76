"""RotNet: learning features by predicting image rotations.

Every image of a batch is rotated by 0, 90, 180 and 270 degrees inside the
training step; the four copies go through the encoder together and a small
head classifies which rotation each copy received. Recognising the rotation
of an object needs to know what the object is and where its parts are, so
the encoder learns semantic features without labels.

Reference:
    Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by
    Predicting Image Rotations", ICLR 2018.
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import build_backbone, spatial_encoder
from vislearn.data.views import check_crop_scale, random_resized_crops
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean

ROTATIONS = 4
HEAD_INPUTS = ("pooled", "feature_map")


def rotate_batch(images):
    """(batch, h, w, c) square images -> (4*batch, h, w, c) rotated by
    0/90/180/270 degrees (counter-clockwise), and their rotation labels 0..3."""
    rotated = [tf.image.rot90(images, k) for k in range(ROTATIONS)]
    labels = tf.repeat(tf.range(ROTATIONS, dtype=tf.int64), tf.shape(images)[0])
    return tf.concat(rotated, axis=0), labels


@keras.saving.register_keras_serializable(package="vislearn")
class RotNet(keras.Model):
    """Rotation-prediction pretext model.

    Args:
        image_shape: (height, width, channels); height must equal width.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone: the encoder.
        head_units: hidden widths of the rotation classifier.
        crop_scale: optional (min, max) area fraction of a random resized
            crop (no flip, no colour change) taken of every image before it
            is rotated, as the paper's random crops; None trains on the
            images as given. On digits without it the rotation task is
            solved from memorised images (rotation accuracy 0.999) and the
            features drift away from the classes (kNN 0.90 -> 0.79 over 30
            epochs); with [0.5, 1] they do not (0.95).
        head_input: "pooled" (the encoder's output) or "feature_map" (the
            flattened map before the encoder's pooling, as the paper reads
            its head from a conv block). On digits feature_map probed no
            better than random init (seed 0), so the recipe keeps pooled.

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        Rotation logits (batch, 4) for the images as given.

    Training data:
        Batches of images (no labels); each step sees 4x the batch.
    """

    def __init__(self, image_shape=(32, 32, 3), backbone="small_cnn", head_units=(128,), crop_scale=None,
                 head_input="pooled", **kwargs):
        super().__init__(**kwargs)
        if image_shape[0] != image_shape[1]:
            raise ValueError(f"model.image_shape: rotation needs square images, received {list(image_shape)}")
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.head_units = tuple(head_units)
        self.crop_scale = None if crop_scale is None else check_crop_scale(crop_scale, "model.crop_scale")

        if head_input not in HEAD_INPUTS:
            raise ValueError(f"model.head_input: expected one of {list(HEAD_INPUTS)}, received {head_input!r}")
        self.head_input = head_input
        self.encoder = build_backbone(backbone, self.image_shape)
        self.feature_map = (spatial_encoder(self.encoder, "model.head_input: feature_map")
                            if head_input == "feature_map" else None)
        self.head = keras.Sequential(
            ([layers.Flatten(name="head_flatten")] if head_input == "feature_map" else [])
            + [layers.Dense(u, activation="relu", name=f"head_fc{i}") for i, u in enumerate(self.head_units)]
            + [layers.Dense(ROTATIONS, name="head_rotation")], name="rotation_head")
        self.head.build((self.encoder if self.feature_map is None else self.feature_map).output_shape)

        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="rotation_accuracy")

    def call(self, images, training=False):
        features = self.encoder if self.feature_map is None else self.feature_map
        return self.head(features(images, training=training), training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_metric]

    def train_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        if self.crop_scale is not None:
            images = random_resized_crops(images, self.crop_scale)
        rotated, labels = rotate_batch(images)
        with tf.GradientTape() as tape:
            logits = self(rotated, training=True)
            loss = self.loss_fn(labels, logits)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(labels, logits)
        return step_logs(self.metrics)

    def test_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        rotated, labels = rotate_batch(images)
        logits = self(rotated, training=False)
        self.loss_tracker.update_state(per_replica_mean(self.loss_fn(labels, logits)))
        self.accuracy_metric.update_state(labels, logits)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), backbone=self.backbone_spec,
                      head_units=list(self.head_units), head_input=self.head_input,
                      crop_scale=None if self.crop_scale is None else list(self.crop_scale))
        return config
