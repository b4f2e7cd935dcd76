"""Context prediction: where does this patch sit relative to that one?

From each image a 3x3 grid of patches is laid out with gaps between the
cells and each patch is jittered by a few pixels, so that the network cannot
solve the task from low-level cues (continuing lines, matching borders). The
centre patch and one of its 8 neighbours, chosen at random, go through the
same encoder (a siamese pair sharing weights); their features are fused late
(a per-patch fc layer, concatenation, fc) and an 8-way classifier predicts the
neighbour's position. Chromatic aberration is another shortcut (the position
of a patch in the lens can be read from its colour fringes): patches are
either projected onto the plane orthogonal to the green-magenta axis
(`"project"`) or all but one randomly chosen colour channel is replaced by
low-amplitude noise (`"drop"`).

Patches are brought to the encoder's input size, so one encoder serves both
the pretext task and the full-image evaluation: either magnified to it
(`patch_scale="resize"`) or kept at their pixel scale in the middle of a
black canvas of that size (`"native"`), which transfers better to full
images whose strokes are at the scale the patches were cut at.

The encoder only ever sees patches, so the frozen-feature protocol and
`embed_image` can read an image the way it was trained: as the 3x3 grid of
patches, each encoded alone and the nine features concatenated in grid
order (`probe_embedding="patch_grid"`, as CPC embeds an image from its
patches), instead of the whole image in one pass (`"image"`). The random
encoder it is compared with must then be read the same way
(`patch_grid_encoder`).

Reference:
    Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by
    Context Prediction", ICCV 2015.
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import build_backbone
from vislearn.config import ConfigError
from vislearn.data.views import check_crop_scale, random_resized_crops
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean

COLOUR_HANDLING = (None, "project", "drop")
PATCH_SCALES = ("resize", "native")
PROBE_EMBEDDINGS = ("image", "patch_grid")
# (row, col) of the 8 neighbours of the centre cell (1, 1); the label is the index.
NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))
# The green-magenta axis in RGB, along which chromatic aberration shifts colours.
GREEN_MAGENTA = (-1.0 / 6**0.5, 2.0 / 6**0.5, -1.0 / 6**0.5)


def grid_extent(patch_size, gap, jitter):
    """Side in pixels an image needs for the jittered 3x3 grid."""
    return 3 * patch_size + 2 * gap + 2 * jitter


def to_encoder_input(patches, image_shape, patch_scale):
    """Square patches (batch, p, p, channels) as the encoder takes them: magnified
    to `image_shape` ("resize") or centred on a black canvas of it ("native")."""
    height, width = image_shape[0], image_shape[1]
    if patch_scale == "resize":
        return tf.image.resize(patches, (height, width))
    size = patches.shape[1]
    return tf.image.pad_to_bounding_box(patches, (height - size) // 2, (width - size) // 2, height, width)


class PatchGridEmbedding(layers.Layer):
    """An image's embedding from its 3x3 grid of patches (the grid centred, no
    jitter): each patch goes through `encoder` on its own and the nine feature
    vectors are concatenated in row-major grid order: (batch, 9 * dim)."""

    def __init__(self, encoder, patch_size, gap, patch_scale="native", **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.patch_size = int(patch_size)
        self.gap = int(gap)
        self.patch_scale = patch_scale

    def call(self, images):
        image_shape = self.encoder.input_shape[1:]
        p, g = self.patch_size, self.gap
        span = 3 * p + 2 * g
        top, left = (image_shape[0] - span) // 2, (image_shape[1] - span) // 2
        cells = [images[:, top + row * (p + g):top + row * (p + g) + p, left + col * (p + g):left + col * (p + g) + p]
                 for row in range(3) for col in range(3)]
        # (batch, 9, p, p, c) -> (batch * 9, ...): one encoder pass, each image's cells kept together.
        patches = tf.reshape(tf.stack(cells, axis=1), [-1, p, p, images.shape[-1]])
        features = self.encoder(to_encoder_input(patches, image_shape, self.patch_scale), training=False)
        return tf.reshape(features, [-1, 9 * features.shape[-1]])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 9 * self.encoder.output_shape[-1])


def patch_grid_encoder(encoder, patch_size, gap, patch_scale="native"):
    """A frozen-feature model reading images as their 3x3 patch grid (see
    `PatchGridEmbedding`); `encoder` is shared, not copied."""
    inputs = keras.Input(encoder.input_shape[1:])
    outputs = PatchGridEmbedding(encoder, patch_size, gap, patch_scale, name="patch_grid")(inputs)
    return keras.Model(inputs, outputs, name="patch_grid_encoder")


@keras.saving.register_keras_serializable(package="vislearn")
class ContextPrediction(keras.Model):
    """Relative-position (context prediction) pretext model.

    Args:
        image_shape: (height, width, channels) of the images; each side must
            be at least `3 * patch_size + 2 * gap + 2 * jitter`.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone:
            the encoder both patches share.
        patch_size: side of a grid cell's patch in image pixels.
        gap: pixels between neighbouring cells.
        jitter: max random shift of each patch (pixels, each direction).
        fusion_units: width of the per-patch fc layer and of the fc layer
            after concatenation (the paper's fc6 / fc7).
        colour_handling: `"project"`, `"drop"` or None (see above).
        patch_scale: `"resize"`: each patch is resized to `image_shape`
            (the encoder sees patches magnified); `"native"`: each patch keeps
            its pixel scale, centred on a black canvas of `image_shape`, so
            the encoder learns strokes at the scale the full image shows them
            (on digits, whole-image linear probe at 3 labels per class,
            seed 0: 0.71 against 0.51 resized).
        crop_scale: optional (min, max) area fraction of a random resized
            crop of every image before the grid is laid on it; None: none.
        probe_embedding: what `probe_encoder()` (the protocol, `embed_image`)
            reads: `"image"`, the encoder on the whole image, or
            `"patch_grid"`, the encoder on each patch of the centred 3x3 grid,
            the nine features concatenated (on digits, seeds 0-2, linear
            probe at 3 labels per class: whole images 0.67, as good as a
            random encoder; the grid 0.72, see the README).

    Call arguments:
        inputs: a pair `(first_patches, second_patches)`, each a float tensor
            (batch, height, width, channels): the centre patch and a neighbour,
            resized to (or centred in) `image_shape`.

    Returns:
        Position logits (batch, 8), in the order of `NEIGHBOURS`.

    Training data:
        Batches of images (no labels).
    """

    def __init__(self, image_shape=(32, 32, 3), backbone="small_cnn", patch_size=9, gap=1, jitter=1,
                 fusion_units=128, colour_handling="project", patch_scale="resize", crop_scale=None,
                 probe_embedding="image", **kwargs):
        super().__init__(**kwargs)
        if colour_handling not in COLOUR_HANDLING:
            raise ValueError(f"model.colour_handling: expected one of {COLOUR_HANDLING}, received {colour_handling!r}")
        if min(int(patch_size), int(gap) + 1, int(jitter) + 1) < 1:
            raise ValueError(f"model.patch_size/gap/jitter: expected patch_size >= 1 and gap, jitter >= 0, "
                             f"received {patch_size}, {gap}, {jitter}")
        extent = grid_extent(int(patch_size), int(gap), int(jitter))
        if min(image_shape[0], image_shape[1]) < extent:
            raise ConfigError(
                f"model.image_shape: images of {image_shape[0]}x{image_shape[1]} are smaller than the 3x3 grid "
                f"({extent}x{extent} = 3*patch_size {patch_size} + 2*gap {gap} + 2*jitter {jitter}); "
                "use larger images (data.image_size) or a smaller patch_size/gap/jitter")
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.patch_size = int(patch_size)
        self.gap = int(gap)
        self.jitter = int(jitter)
        self.fusion_units = int(fusion_units)
        self.colour_handling = colour_handling
        if patch_scale not in PATCH_SCALES:
            raise ConfigError(f"model.patch_scale: expected one of {PATCH_SCALES}, received {patch_scale!r}")
        self.patch_scale = patch_scale
        self.crop_scale = None if crop_scale is None else check_crop_scale(crop_scale, "model.crop_scale")
        if probe_embedding not in PROBE_EMBEDDINGS:
            raise ConfigError(f"model.probe_embedding: expected one of {PROBE_EMBEDDINGS}, received {probe_embedding!r}")
        self.probe_embedding = probe_embedding

        self.encoder = build_backbone(backbone, self.image_shape)
        features = self.encoder.output_shape[-1]
        self.patch_fc = layers.Dense(self.fusion_units, activation="relu", name="patch_fc")   # fc6, shared
        self.patch_fc.build((None, features))
        self.fusion = keras.Sequential([layers.Dense(self.fusion_units, activation="relu", name="fusion_fc"),
                                        layers.Dense(len(NEIGHBOURS), name="position")], name="fusion")
        self.fusion.build((None, 2 * self.fusion_units))

        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="position_accuracy")

    def call(self, inputs, training=False):
        first, second = inputs
        both = self.encoder(tf.concat([first, second], axis=0), training=training)  # siamese: one encoder
        both = self.patch_fc(both, training=training)
        n = tf.shape(first)[0]
        return self.fusion(tf.concat([both[:n], both[n:]], axis=-1), training=training)  # late fusion

    def probe_encoder(self):
        """The frozen-feature model the protocol scores and `embed_image` exports."""
        if self.probe_embedding == "image":
            return self.encoder
        # Built on each call, not kept: an attribute would make it part of the model's weights.
        return patch_grid_encoder(self.encoder, self.patch_size, self.gap, self.patch_scale)

    def build(self, input_shape=None):
        # Every layer is built in __init__; recipes pass the image shape here.
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    def sample_pairs(self, images):
        """Cut a (centre, neighbour) patch pair from each image of a batch.

        Returns:
            (centre patches, neighbour patches, position labels in 0..7).
        """
        batch = tf.shape(images)[0]
        height, width = self.image_shape[0], self.image_shape[1]
        if self.crop_scale is not None:
            images = random_resized_crops(images, self.crop_scale)
        p, g, j = self.patch_size, self.gap, self.jitter
        span = 3 * p + 2 * g
        # The grid is placed at a random offset that leaves room for the jitter.
        origin_y = tf.random.uniform([batch], j, height - span - j + 1, dtype=tf.int32)
        origin_x = tf.random.uniform([batch], j, width - span - j + 1, dtype=tf.int32)
        labels = tf.random.uniform([batch], 0, len(NEIGHBOURS), dtype=tf.int32)
        neighbours = tf.constant(NEIGHBOURS, dtype=tf.int32)
        cells = tf.stack([tf.ones([batch, 2], tf.int32), tf.gather(neighbours, labels)])  # [2, batch, 2]

        def boxes(cell):
            jitter = tf.random.uniform([batch, 2], -j, j + 1, dtype=tf.int32)
            top = origin_y + cell[:, 0] * (p + g) + jitter[:, 0]
            left = origin_x + cell[:, 1] * (p + g) + jitter[:, 1]
            top, left = tf.cast(top, tf.float32), tf.cast(left, tf.float32)
            return tf.stack([top / (height - 1), left / (width - 1),
                             (top + p - 1) / (height - 1), (left + p - 1) / (width - 1)], axis=1)

        index = tf.range(batch)

        def cut(cell):
            if self.patch_scale == "resize":
                return tf.image.crop_and_resize(images, boxes(cell), index, (height, width))
            return to_encoder_input(tf.image.crop_and_resize(images, boxes(cell), index, (p, p)),
                                    self.image_shape, "native")

        centre, neighbour = cut(cells[0]), cut(cells[1])
        return self.handle_colour(centre), self.handle_colour(neighbour), tf.cast(labels, tf.int64)

    def handle_colour(self, patches):
        """Remove the chromatic-aberration shortcut (see the module docstring)."""
        if self.image_shape[-1] != 3 or self.colour_handling is None:
            return patches
        if self.colour_handling == "project":
            axis = tf.constant(GREEN_MAGENTA, patches.dtype)
            return patches - tf.reduce_sum(patches * axis, axis=-1, keepdims=True) * axis
        # "drop": keep one random channel; the others become noise of ~1/100 its std.
        batch = tf.shape(patches)[0]
        keep = tf.one_hot(tf.random.uniform([batch], 0, 3, dtype=tf.int32), 3, dtype=patches.dtype)[:, None, None, :]
        kept = tf.reduce_sum(patches * keep, axis=-1, keepdims=True)
        std = tf.math.reduce_std(kept, axis=[1, 2, 3], keepdims=True)
        noise = tf.random.normal(tf.shape(patches), dtype=patches.dtype) * std / 100.0
        return patches * keep + noise * (1.0 - keep)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_metric]

    def train_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        centre, neighbour, labels = self.sample_pairs(images)
        with tf.GradientTape() as tape:
            logits = self((centre, neighbour), training=True)
            loss = self.loss_fn(labels, logits)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(labels, logits)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), backbone=self.backbone_spec,
                      patch_size=self.patch_size, gap=self.gap, jitter=self.jitter,
                      fusion_units=self.fusion_units, colour_handling=self.colour_handling,
                      patch_scale=self.patch_scale, crop_scale=None if self.crop_scale is None else list(self.crop_scale),
                      probe_embedding=self.probe_embedding)
        return config
