"""DANN: domain-adversarial training of neural networks.

One optimizer step trains three parts at once: a feature extractor, a label
classifier on labelled *source* images, and a domain classifier that tells
source features from *target* features. The domain classifier sits behind a
`GradientReversal` layer, so the same gradient step that makes it better at
telling the domains apart pushes the extractor towards features it cannot tell
apart. Labels of the target domain are never used (except by the
`train_on_target` oracle baseline, whose data pipeline feeds them in as source).

Reference:
    Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand,
    Lempitsky, "Domain-Adversarial Training of Neural Networks", JMLR 2016.
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import build_backbone
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.layers import GradientReversal
from vislearn.losses import per_replica_mean

MODES = ("dann", "source_only", "train_on_target")


def grl_lambda(progress, gamma=10.0):
    """The paper's GRL coefficient schedule: 2 / (1 + exp(-gamma * p)) - 1.

    It rises from 0 at the start (when the domain classifier's signal is noise)
    to ~1 at the end of training.
    """
    return 2.0 / (1.0 + tf.exp(-gamma * progress)) - 1.0


def dense_stack(units, name, final_units=None, final_activation=None, dropout=0.0):
    stack = keras.Sequential(name=name)
    for i, width in enumerate(units):
        stack.add(layers.Dense(width, activation="relu", name=f"{name}_fc{i}"))
        if dropout:
            stack.add(layers.Dropout(dropout, name=f"{name}_dropout{i}"))
    if final_units is not None:
        stack.add(layers.Dense(final_units, activation=final_activation, name=f"{name}_out"))
    return stack


@keras.saving.register_keras_serializable(package="vislearn")
class DANN(keras.Model):
    """Domain-adversarial classifier.

    Args:
        num_classes: int, number of label classes.
        image_shape: (height, width, channels) of the input images.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone
            (default: the paper's MNIST extractor).
        label_units: hidden widths of the label classifier (paper: 100, 100).
        domain_units: hidden widths of the domain classifier (paper: 100).
        dropout: dropout rate after each hidden layer of the label classifier.
        mode: `"dann"` (adversarial), `"source_only"` (GRL coefficient held at
            0: the domain classifier still learns, so its accuracy measures how
            separable the domains are, but the features get no domain signal),
            or `"train_on_target"` (same as source_only; the data pipeline
            supplies labelled target images, the oracle of the paper's table).
        gamma: steepness of the GRL coefficient schedule (paper: 10).
        lambda_max: value the GRL coefficient rises to (paper: 1); larger
            values push the features harder towards domain confusion.
        total_steps: training steps over which progress p goes from 0 to 1;
            `vislearn fit` fills it in from the recipe.
        domain_loss_weight: weight of the domain loss in the total loss.

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        Class probabilities, shape (batch, num_classes).

    Training data:
        A dict with `source_image`, `source_label` and `target_image`.
    Evaluation data:
        `(images, labels)`.
    """

    def __init__(
        self,
        num_classes=10,
        image_shape=(28, 28, 3),
        backbone="dann_mnist",
        label_units=(100, 100),
        domain_units=(100,),
        dropout=0.0,
        mode="dann",
        gamma=10.0,
        lambda_max=1.0,
        total_steps=1000,
        domain_loss_weight=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"model.mode: expected one of {MODES}, received {mode!r}")
        if int(total_steps) <= 0:
            raise ValueError(f"model.total_steps: expected a positive integer, received {total_steps!r}")
        self.num_classes = int(num_classes)
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.label_units = tuple(label_units)
        self.domain_units = tuple(domain_units)
        self.dropout = float(dropout)
        self.mode = mode
        self.gamma = float(gamma)
        self.lambda_max = float(lambda_max)
        self.total_steps = int(total_steps)
        self.domain_loss_weight = float(domain_loss_weight)

        self.feature_extractor = build_backbone(backbone, self.image_shape)
        self.label_classifier = dense_stack(
            self.label_units, "label_classifier", self.num_classes, "softmax", self.dropout)
        self.gradient_reversal = GradientReversal(0.0, name="gradient_reversal")
        self.domain_classifier = dense_stack(self.domain_units, "domain_classifier", 1)
        # Build the heads now: the train step calls them on slices of a batch.
        self.label_classifier.build(self.feature_extractor.output_shape)
        self.domain_classifier.build(self.feature_extractor.output_shape)
        self.built = True

        self.label_loss_fn = keras.losses.SparseCategoricalCrossentropy()
        self.domain_loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.label_loss_tracker = keras.metrics.Mean(name="label_loss")
        self.domain_loss_tracker = keras.metrics.Mean(name="domain_loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.domain_accuracy_metric = keras.metrics.BinaryAccuracy(name="domain_accuracy", threshold=0.0)
        self.lambda_tracker = keras.metrics.Mean(name="lambda")

    def call(self, images, training=False):
        return self.label_classifier(self.feature_extractor(images, training=training), training=training)

    def domain_logits(self, images, training=False):
        """Domain classifier logit per image (> 0 means "target")."""
        features = self.feature_extractor(images, training=training)
        return self.domain_classifier(features, training=training)[:, 0]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.label_loss_tracker, self.domain_loss_tracker,
                self.accuracy_metric, self.domain_accuracy_metric, self.lambda_tracker]

    def train_step(self, data):
        source_images = data["source_image"]
        source_labels = data["source_label"]
        target_images = data["target_image"]

        # GRL coefficient from training progress, set before the forward pass.
        progress = tf.minimum(tf.cast(self.optimizer.iterations, "float32") / self.total_steps, 1.0)
        if self.mode == "dann":
            coefficient = self.lambda_max * grl_lambda(progress, self.gamma)
        else:
            coefficient = tf.constant(0.0)
        self.gradient_reversal.lambda_.assign(coefficient)

        n_source = tf.shape(source_images)[0]
        both = tf.concat([source_images, target_images], axis=0)
        domain_labels = tf.concat(
            [tf.zeros([n_source, 1]), tf.ones([tf.shape(target_images)[0], 1])], axis=0)
        with tf.GradientTape() as tape:
            features = self.feature_extractor(both, training=True)
            class_probs = self.label_classifier(features[:n_source], training=True)
            label_loss = self.label_loss_fn(source_labels, class_probs)
            domain_logits = self.domain_classifier(self.gradient_reversal(features), training=True)
            domain_loss = self.domain_loss_fn(domain_labels, domain_logits)
            # Under tf.distribute a Keras loss is already divided by the replica
            # count, so the all-reduced (summed) gradients are the global mean.
            loss = label_loss + self.domain_loss_weight * domain_loss
            scaled_loss = self.optimizer.scale_loss(loss)  # mixed-precision scaling
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)

        self.loss_tracker.update_state(per_replica_mean(loss))
        self.label_loss_tracker.update_state(per_replica_mean(label_loss))
        self.domain_loss_tracker.update_state(per_replica_mean(domain_loss))
        self.accuracy_metric.update_state(source_labels, class_probs)
        self.domain_accuracy_metric.update_state(domain_labels, domain_logits)
        self.lambda_tracker.update_state(coefficient)
        return step_logs(self.metrics)

    def test_step(self, data):
        images, labels = data[0], data[1]
        class_probs = self(images, training=False)
        label_loss = per_replica_mean(self.label_loss_fn(labels, class_probs))
        self.loss_tracker.update_state(label_loss)
        self.label_loss_tracker.update_state(label_loss)
        self.accuracy_metric.update_state(labels, class_probs)
        return step_logs([self.loss_tracker, self.accuracy_metric])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            image_shape=list(self.image_shape),
            backbone=self.backbone_spec,
            label_units=list(self.label_units),
            domain_units=list(self.domain_units),
            dropout=self.dropout,
            mode=self.mode,
            gamma=self.gamma,
            lambda_max=self.lambda_max,
            total_steps=self.total_steps,
            domain_loss_weight=self.domain_loss_weight,
        )
        return config

