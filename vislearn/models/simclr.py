"""SimCLR: contrast two augmented views of every image against the global batch.

Each training step draws two random views of every image (random resized
crop + flip, colour jitter, grayscale, optional blur: `vislearn.data.views`),
encodes each view, maps them through an MLP projection head and minimises
NT-Xent: each view must pick out the other view of its image among the
2N - 1 other views of the batch. Under tf.distribute the projections of
every replica are all-gathered, so each view is contrasted with the whole
global batch and the gradient equals the one-device gradient
(`gather_across_replicas`).

The features the encoder learns are read before the projection head (the
paper's finding: the head absorbs the augmentation invariances). Optionally
an online linear probe is trained on those features, with their gradient
stopped and its own optimizer, to follow representation quality during
training (as in the keras.io SimCLR example); it needs labelled batches.

Reference:
    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive
    Learning of Visual Representations", ICML 2020.
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import BN_MOMENTUM, build_backbone
from vislearn.config import ConfigError
from vislearn.data.views import (check_affine, check_crop_scale, check_elastic, check_probability,
                                 check_stroke_jitter, simclr_augment)
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean
from vislearn.losses.contrastive import InfoNCE, check_temperature, gather_across_replicas, nt_xent_similarities


def projection_head(units, input_dim, batch_norm=False, name="projection_head"):
    """MLP head: Dense-(BN)-ReLU for every hidden width, then a linear output."""
    stack = []
    for i, width in enumerate(units[:-1]):
        stack.append(layers.Dense(width, use_bias=not batch_norm, name=f"{name}_fc{i}"))
        if batch_norm:
            stack.append(layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn{i}"))
        stack.append(layers.ReLU(name=f"{name}_relu{i}"))
    stack.append(layers.Dense(units[-1], name=f"{name}_out"))
    head = keras.Sequential(stack, name=name)
    head.build((None, input_dim))
    return head


@keras.saving.register_keras_serializable(package="vislearn")
class SimCLR(keras.Model):
    """SimCLR contrastive model.

    Args:
        image_shape: (height, width, 3).
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone: the encoder.
        projection_units: widths of the projection head; the last is the
            embedding the loss sees (paper: 2048 -> 128).
        head_batch_norm: batch norm in the head's hidden layers (paper: yes).
        temperature: NT-Xent temperature t > 0 (paper: 0.1; 0.5 for CIFAR).
        strength: colour jitter strength s (1.0 ImageNet, 0.5 CIFAR).
        blur: Gaussian blur in the views (ImageNet: yes, CIFAR: no).
        crop_scale: (min, max) area fraction of the random crops.
        flip: probability of the horizontal flip (paper: 0.5).
        affine: None (paper), or the ranges of a random rotation, zoom, shear
            and shift after the crop (`vislearn.data.views.random_affine`):
            the digits recipe's views, in place of a flip that makes a 2 no
            digit and of crops small enough to turn an 8 into a 0.
        stroke_jitter: None (paper), or the window of a grey-scale dilation
            or erosion that thickens or thins the strokes of two views in
            three after the affine step (`vislearn.data.views.random_stroke_width`).
        elastic: None (paper), or `{shift, sigma}` of a random elastic
            distortion after that (`vislearn.data.views.random_elastic`,
            in pixels): the digits recipe bends the strokes as handwriting does.
        global_batch_size: the global batch (recipes fill it in from the data);
            checked to hold at least 2 images, i.e. some negatives.
        online_probe: train a linear classifier on stop-gradient features
            (needs `(image, label)` batches and `num_classes`).
        num_classes: classes of the online probe.
        probe_learning_rate: Adam learning rate of the probe's own optimizer.

    Call arguments:
        images: float tensor (batch, height, width, 3) in [0, 1].

    Returns:
        Projections (batch, projection_units[-1]).

    Training data:
        Batches of images, or `(image, label)` batches with `online_probe`.
    """

    def __init__(self, image_shape=(32, 32, 3), backbone="small_cnn", projection_units=(256, 128),
                 head_batch_norm=False, temperature=0.5, strength=0.5, blur=False, crop_scale=(0.08, 1.0),
                 flip=0.5, affine=None, stroke_jitter=None, elastic=None, global_batch_size=None,
                 online_probe=False, num_classes=None, probe_learning_rate=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.temperature = check_temperature(temperature, "model.temperature")
        if global_batch_size is not None and int(global_batch_size) < 2:
            raise ConfigError(f"model.global_batch_size: a global batch of {global_batch_size} image(s) gives "
                              "SimCLR no negatives; expected at least 2")
        if online_probe and not num_classes:
            raise ConfigError(f"model.num_classes: the online probe needs the number of classes, "
                              f"received {num_classes!r}")
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.projection_units = tuple(int(u) for u in projection_units)
        self.head_batch_norm = bool(head_batch_norm)
        self.strength = float(strength)
        self.blur = bool(blur)
        self.crop_scale = check_crop_scale(crop_scale, "model.crop_scale")
        self.flip = check_probability(flip, "model.flip")
        self.affine = check_affine(affine, "model.affine")
        self.stroke_jitter = check_stroke_jitter(stroke_jitter, "model.stroke_jitter")
        self.elastic = check_elastic(elastic, "model.elastic")
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.online_probe = bool(online_probe)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.probe_learning_rate = float(probe_learning_rate)

        self.encoder = build_backbone(backbone, self.image_shape)
        self.projector = projection_head(self.projection_units, self.encoder.output_shape[-1],
                                         self.head_batch_norm)
        self.loss_fn = InfoNCE(self.temperature)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="contrastive_accuracy")
        self.probe = self.probe_optimizer = None
        if self.online_probe:
            self.probe = layers.Dense(self.num_classes, name="online_probe")
            self.probe.build(self.encoder.output_shape)
            self.probe_optimizer = keras.optimizers.Adam(self.probe_learning_rate)
            self.probe_loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            self.probe_accuracy = keras.metrics.SparseCategoricalAccuracy(name="probe_accuracy")

    def call(self, images, training=False):
        return self.projector(self.encoder(images, training=training), training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__
        if self.probe_optimizer is not None and not self.probe_optimizer.built:
            with self.distribute_strategy.scope():
                self.probe_optimizer.build(self.probe.trainable_variables)

    @property
    def metrics(self):
        extra = [self.probe_accuracy] if self.online_probe else []
        return [self.loss_tracker, self.accuracy_metric, *extra]

    def augment(self, images):
        return simclr_augment(images, strength=self.strength, blur=self.blur, crop_scale=self.crop_scale,
                              flip=self.flip, affine=self.affine,
                              stroke_jitter=self.stroke_jitter, elastic=self.elastic)

    def contrastive_loss(self, views_a, views_b, training=True):
        """NT-Xent of the local views against the global batch.

        Returns:
            (loss, positive columns, similarities, encoder features of views_a).
        """
        # One pass per view, as the keras.io example and lightly do: batch-norm
        # statistics come from each view's batch, and on a CPU two passes of
        # N images ran faster than one of 2N (120 against 139 ms at N = 128).
        features_a = self.encoder(views_a, training=training)
        features_b = self.encoder(views_b, training=training)
        local_a = tf.cast(self.projector(features_a, training=training), tf.float32)
        local_b = tf.cast(self.projector(features_b, training=training), tf.float32)
        (global_a, global_b), offset = gather_across_replicas((local_a, local_b))
        positive, similarities = nt_xent_similarities(local_a, local_b, global_a, global_b, offset)
        return self.loss_fn(positive, similarities), positive, similarities, features_a

    def _check_batch(self, images):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        local = images.shape[0]
        if local is not None and local * replicas < 2:
            raise ConfigError(f"SimCLR: a global batch of {local * replicas} image(s) has no negatives; "
                              "use data.batch_size >= 2")

    def train_step(self, data):
        images, labels = (data[0], data[1]) if isinstance(data, (tuple, list)) else (data, None)
        self._check_batch(images)
        views_a, views_b = self.augment(images), self.augment(images)
        with tf.GradientTape() as tape:
            loss, positive, similarities, features = self.contrastive_loss(views_a, views_b)
            scaled_loss = self.optimizer.scale_loss(loss)
        trainable = self.encoder.trainable_variables + self.projector.trainable_variables
        gradients = tape.gradient(scaled_loss, trainable)
        self.optimizer.apply(gradients, trainable)
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(positive, similarities)

        if self.online_probe and labels is not None:
            # Detached features: the probe follows the encoder, never shapes it.
            features = tf.stop_gradient(features)
            with tf.GradientTape() as tape:
                logits = self.probe(features, training=True)
                probe_loss = self.probe_loss_fn(labels, logits)
            self.probe_optimizer.apply(tape.gradient(probe_loss, self.probe.trainable_variables),
                                       self.probe.trainable_variables)
            self.probe_accuracy.update_state(labels, logits)
        return step_logs(self.metrics)

    def test_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        loss, positive, similarities, _ = self.contrastive_loss(self.augment(images), self.augment(images),
                                                                training=False)
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(positive, similarities)
        return step_logs(self.metrics[:2])

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), backbone=self.backbone_spec,
                      projection_units=list(self.projection_units), head_batch_norm=self.head_batch_norm,
                      temperature=self.temperature, strength=self.strength, blur=self.blur,
                      crop_scale=list(self.crop_scale), flip=self.flip, affine=self.affine,
                      stroke_jitter=self.stroke_jitter, elastic=self.elastic,
                      global_batch_size=self.global_batch_size,
                      online_probe=self.online_probe, num_classes=self.num_classes,
                      probe_learning_rate=self.probe_learning_rate)
        return config
