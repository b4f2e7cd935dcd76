"""MoCo v1/v2: momentum contrast with a queue of negatives; MoChi hard negative mixing.

Two random views of every image go through two encoders: the query encoder
(trained by gradient) and the key encoder, an exponential moving average of
the query encoder (k <- m k + (1 - m) q, updated in the step, no gradient).
Each query must pick out its own key among the K keys of a queue filled by
previous batches; the queue decouples the number of negatives from the batch
size, and the slowly moving key encoder keeps the queued keys consistent.

Every step, visibly in `train_step`: momentum update of the key encoder;
keys of the second views; InfoNCE of the queries against [own key, queue
(, MoChi negatives)]; gradient step of the query encoder; the keys of the
global batch (all-gathered across replicas) replace the oldest queue entries.

Versions: v1 has a linear projection to the embedding and t = 0.07; v2 an MLP
head, t = 0.2 and Gaussian blur in the views (its cosine learning-rate
schedule is the recipe's `optimizer.schedule: {name: cosine}`).

Batch-norm leakage. With BN, a query and its positive key normalised with
statistics of the same images let the model find its key through the batch
statistics instead of the image content. MoCo shuffles the key batch across
GPUs so that every key is normalised in a different sub-batch than its query.
vislearn does the equivalent inside each replica (so it also works on one
device): queries are normalised in `bn_groups` contiguous groups, keys in
`bn_groups` groups of a random permutation of the batch (then unpermuted), so
a key's BN group shares only about 1/`bn_groups` of its images with its
query's group, as with MoCo's shuffle over `bn_groups` GPUs. `bn_groups: 1`
turns it off.

MoChi. Per query, the N (`mochi_hardest`) queue keys most similar to it are
its hardest negatives; `mochi_mix` synthetic negatives mix two of them
(a n_i + (1 - a) n_j, a ~ U(0, 1)) and `mochi_query_mix` mix the query with
one of them (b q + (1 - b) n_j, b ~ U(0, 0.5)); all are L2-normalised and
appended to the query's logits with their gradient stopped, from step
`mochi_start_step` on (before, they are excluded from the softmax).

References:
    He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR 2020.
    Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive
    Learning", 2020 (MoCo v2).
    Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus, "Hard Negative Mixing
    for Contrastive Learning", NeurIPS 2020 (MoChi).
"""

import keras
import tensorflow as tf

from vislearn.backbones import build_backbone
from vislearn.config import ConfigError
from vislearn.data.views import (check_affine, check_crop_scale, check_elastic, check_probability,
                                 check_stroke_jitter, draw_seed, simclr_augment, split_seed)
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean
from vislearn.losses.contrastive import (EXCLUDED, InfoNCE, check_temperature, gather_across_replicas,
                                         moco_similarities)
from vislearn.models.simclr import projection_head

VERSIONS = (1, 2)


def momentum_update(pairs, momentum):
    """k <- m k + (1 - m) q for every (query variable, key variable) pair."""
    for query, key in pairs:
        key.assign(momentum * key + (1.0 - momentum) * query)


def enqueue(queue, pointer, keys):
    """Write `keys` (B, dim) over the oldest B entries of `queue` (K, dim),
    starting at `pointer`, and advance it by B modulo K (K % B == 0, so a
    batch never wraps around the end)."""
    batch = tf.shape(keys)[0]
    rows = pointer + tf.range(batch)
    queue.assign(tf.tensor_scatter_nd_update(queue, rows[:, None], tf.cast(keys, queue.dtype)))
    pointer.assign((pointer + batch) % queue.shape[0])


def mochi_negatives(queries, queue, hardest, mix, query_mix, seed=None):
    """MoChi's synthetic hard negatives of every query.

    Args:
        queries: (n, dim) query embeddings.
        queue: (K, dim) L2-normalised keys.
        hardest: N, the number of most similar queue keys mixed.
        mix: s, negatives mixing two of the N.
        query_mix: s', negatives mixing the query with one of the N.
        seed: int tensor [2] for the stateless draws; None draws one.

    Returns:
        (n, s + s', dim) L2-normalised synthetic negatives, gradient stopped.
    """
    queries = tf.math.l2_normalize(tf.stop_gradient(tf.cast(queries, tf.float32)), axis=-1)
    queue = tf.cast(queue, tf.float32)
    _, nearest = tf.math.top_k(tf.matmul(queries, queue, transpose_b=True), k=hardest)
    hard = tf.gather(queue, nearest)                                             # (n, N, dim)
    n = tf.shape(queries)[0]
    seeds = split_seed(draw_seed(seed), 4)
    pairs = tf.random.stateless_uniform([n, mix, 2], seeds[0], 0, hardest, dtype=tf.int32)
    alpha = tf.random.stateless_uniform([n, mix, 1], seeds[1])
    mixed = (alpha * tf.gather(hard, pairs[..., 0], batch_dims=1)
             + (1.0 - alpha) * tf.gather(hard, pairs[..., 1], batch_dims=1))
    partners = tf.random.stateless_uniform([n, query_mix], seeds[2], 0, hardest, dtype=tf.int32)
    beta = tf.random.stateless_uniform([n, query_mix, 1], seeds[3], 0.0, 0.5)
    with_query = beta * queries[:, None, :] + (1.0 - beta) * tf.gather(hard, partners, batch_dims=1)
    return tf.stop_gradient(tf.math.l2_normalize(tf.concat([mixed, with_query], axis=1), axis=-1))


def _unit_rows(shape, dtype=None):
    """Queue initialiser: random directions, as MoCo starts its queue."""
    return tf.math.l2_normalize(tf.random.normal(shape, dtype=dtype or "float32"), axis=-1)


@keras.saving.register_keras_serializable(package="vislearn")
class MoCo(keras.Model):
    """MoCo v1/v2 with optional MoChi hard negative mixing.

    Args:
        image_shape: (height, width, 3).
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone: the encoder.
        version: 1 (linear head, t = 0.07) or 2 (MLP head, t = 0.2, blur).
        embedding_dim: dimension of the contrasted embeddings (paper: 128).
        hidden_units: width of v2's MLP head (paper: 2048).
        head_batch_norm: batch norm in v2's hidden head layer (not in the paper;
            it centres the features of small encoders whose ReLU outputs all
            point the same way, as SimCLR's head does).
        queue_size: K, the number of queued negative keys; a multiple of the global batch.
        momentum: m of the key encoder's moving average (paper: 0.999).
        temperature: t > 0; null takes the version's.
        strength: colour jitter strength s of the views (0.5: MoCo's 0.4 jitter).
        blur: Gaussian blur in the views; null takes the version's (v2: yes).
        crop_scale: (min, max) area fraction of the random crops (MoCo: 0.2-1).
        flip: probability of the horizontal flip (MoCo: 0.5).
        affine: None (MoCo), or the ranges of a random rotation, zoom, shear
            and shift after the crop (`vislearn.data.views.random_affine`),
            as the digits recipes use in place of the flip.
        stroke_jitter: None (MoCo), or the window of the stroke-width step
            after the affine step (`vislearn.data.views.random_stroke_width`).
        elastic: None (MoCo), or `{shift, sigma}` of a random elastic
            distortion after that (`vislearn.data.views.random_elastic`).
        bn_groups: BN groups per replica for the shuffled-BN equivalent (see above).
        global_batch_size: the global batch (recipes fill it in from the data),
            checked against `queue_size` at construction.
        mochi_hardest: N hardest negatives per query (0: plain MoCo).
        mochi_mix: s synthetic negatives mixing pairs of the N.
        mochi_query_mix: s' synthetic negatives mixing the query with one of the N.
        mochi_start_step: optimizer step from which the synthetic negatives count.

    Call arguments:
        images: float tensor (batch, height, width, 3) in [0, 1].

    Returns:
        L2-normalised query embeddings (batch, embedding_dim).

    Training data:
        Batches of images (no labels).
    """

    def __init__(self, image_shape=(32, 32, 3), backbone="small_cnn", version=2, embedding_dim=128,
                 hidden_units=512, head_batch_norm=False, queue_size=4096, momentum=0.999, temperature=None,
                 strength=0.5, blur=None, crop_scale=(0.2, 1.0), flip=0.5, affine=None, stroke_jitter=None,
                 elastic=None, bn_groups=2, global_batch_size=None, mochi_hardest=0, mochi_mix=0, mochi_query_mix=0,
                 mochi_start_step=0, **kwargs):
        super().__init__(**kwargs)
        if version not in VERSIONS:
            raise ConfigError(f"model.version: expected one of {list(VERSIONS)}, received {version!r}")
        self.version = int(version)
        self.temperature = check_temperature(
            {1: 0.07, 2: 0.2}[self.version] if temperature is None else temperature, "model.temperature")
        self.queue_size = int(queue_size)
        if self.queue_size < 1:
            raise ConfigError(f"model.queue_size: expected a positive number of keys, received {queue_size}")
        if not 0 <= float(momentum) <= 1:
            raise ConfigError(f"model.momentum: expected a value in [0, 1], received {momentum}")
        if global_batch_size is not None:
            self._check_queue(int(global_batch_size))
        if int(bn_groups) < 1:
            raise ConfigError(f"model.bn_groups: expected at least 1, received {bn_groups}")
        mochi = (int(mochi_hardest), int(mochi_mix), int(mochi_query_mix))
        if (mochi[1] or mochi[2]) and not 0 < mochi[0] <= self.queue_size:
            raise ConfigError(f"model.mochi_hardest: {mochi_hardest} hardest negatives requested from a queue of "
                              f"{self.queue_size} keys; expected 1 to {self.queue_size}")
        self.image_shape = tuple(image_shape)
        self.backbone_spec = backbone
        self.embedding_dim = int(embedding_dim)
        self.hidden_units = int(hidden_units)
        self.head_batch_norm = bool(head_batch_norm)
        self.momentum = float(momentum)
        self.strength = float(strength)
        self.blur = self.version == 2 if blur is None else bool(blur)
        self.crop_scale = check_crop_scale(crop_scale, "model.crop_scale")
        self.flip = check_probability(flip, "model.flip")
        self.affine = check_affine(affine, "model.affine")
        self.stroke_jitter = check_stroke_jitter(stroke_jitter, "model.stroke_jitter")
        self.elastic = check_elastic(elastic, "model.elastic")
        self.bn_groups = int(bn_groups)
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.mochi_hardest, self.mochi_mix, self.mochi_query_mix = mochi
        self.mochi_start_step = int(mochi_start_step)

        units = (self.embedding_dim,) if self.version == 1 else (self.hidden_units, self.embedding_dim)
        self.encoder = build_backbone(backbone, self.image_shape)
        self.projector = projection_head(units, self.encoder.output_shape[-1], self.head_batch_norm)
        # The key encoder starts as a copy and only ever follows the query encoder.
        self.key_encoder = build_backbone(backbone, self.image_shape)
        self.key_projector = projection_head(units, self.encoder.output_shape[-1], self.head_batch_norm,
                                             name="key_projection_head")
        self.key_encoder.set_weights(self.encoder.get_weights())
        self.key_projector.set_weights(self.projector.get_weights())
        # Frozen variable by variable, not layer by layer: a non-trainable BatchNormalization
        # layer normalises with its moving statistics, and keys must be normalised like queries.
        for variable in self.key_encoder.weights + self.key_projector.weights:
            variable.trainable = False

        self.queue = self.add_weight(shape=(self.queue_size, self.embedding_dim), initializer=_unit_rows,
                                     trainable=False, name="queue")
        self.queue_pointer = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                             name="queue_pointer")
        self.loss_fn = InfoNCE(self.temperature)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="contrastive_accuracy")

    def _check_queue(self, global_batch):
        if global_batch < 1 or self.queue_size % global_batch:
            raise ConfigError(f"model.queue_size: {self.queue_size} is not a multiple of the global batch "
                              f"{global_batch} (keys enter the queue one global batch at a time)")

    def call(self, images, training=False):
        return tf.math.l2_normalize(self.projector(self.encoder(images, training=training), training=training), -1)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_metric]

    def momentum_pairs(self):
        """(query variable, key variable) of every trained weight, matched by position."""
        pairs = []
        for query_net, key_net in ((self.encoder, self.key_encoder), (self.projector, self.key_projector)):
            pairs += [(q, k) for q, k in zip(query_net.weights, key_net.weights) if q.trainable]
        return pairs

    def _embed(self, encoder, projector, images, shuffle):
        """Embeddings with BN statistics per group (shuffled groups for keys)."""
        batch = images.shape[0]
        if batch is not None and batch % self.bn_groups:
            raise ConfigError(f"model.bn_groups: the per-replica batch of {batch} does not split into "
                              f"{self.bn_groups} BN groups")
        order = tf.random.shuffle(tf.range(tf.shape(images)[0])) if shuffle else None
        x = images if order is None else tf.gather(images, order)
        embeddings = tf.concat([projector(encoder(group, training=True), training=True)
                                for group in tf.split(x, self.bn_groups)], axis=0)
        if order is not None:
            embeddings = tf.gather(embeddings, tf.argsort(order))
        return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)

    def augment(self, images):
        return simclr_augment(images, strength=self.strength, blur=self.blur, crop_scale=self.crop_scale,
                              flip=self.flip, affine=self.affine,
                              stroke_jitter=self.stroke_jitter, elastic=self.elastic)

    def _contrast(self, queries, keys):
        """InfoNCE of the queries against [own key, queue (, MoChi negatives)]."""
        extra = None
        if self.mochi_hardest and (self.mochi_mix or self.mochi_query_mix):
            extra = mochi_negatives(queries, self.queue, self.mochi_hardest, self.mochi_mix, self.mochi_query_mix)
        positive, similarities = moco_similarities(queries, keys, self.queue, extra)
        if extra is not None:
            # Before mochi_start_step the synthetic columns are pushed out of the softmax.
            started = tf.cast(self.optimizer.iterations >= self.mochi_start_step, tf.float32)
            width = self.mochi_mix + self.mochi_query_mix
            mask = tf.concat([tf.zeros([1 + self.queue_size]), tf.ones([width])], 0)
            similarities += EXCLUDED * (1.0 - started) * mask
        return self.loss_fn(positive, similarities), positive, similarities

    def train_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if images.shape[0] is not None:
            self._check_queue(images.shape[0] * replicas)
        views_q, views_k = self.augment(images), self.augment(images)

        momentum_update(self.momentum_pairs(), self.momentum)
        keys = tf.stop_gradient(self._embed(self.key_encoder, self.key_projector, views_k, shuffle=True))
        with tf.GradientTape() as tape:
            queries = self._embed(self.encoder, self.projector, views_q, shuffle=False)
            loss, positive, similarities = self._contrast(queries, keys)
            scaled_loss = self.optimizer.scale_loss(loss)
        trainable = self.encoder.trainable_variables + self.projector.trainable_variables
        self.optimizer.apply(tape.gradient(scaled_loss, trainable), trainable)
        enqueue(self.queue, self.queue_pointer, gather_across_replicas(keys)[0])

        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(positive, similarities)
        return step_logs(self.metrics)

    def test_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        keys = self.key_projector(self.key_encoder(self.augment(images), training=False), training=False)
        queries = self(self.augment(images), training=False)
        loss, positive, similarities = self._contrast(queries, tf.math.l2_normalize(keys, -1))
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.accuracy_metric.update_state(positive, similarities)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), backbone=self.backbone_spec, version=self.version,
                      embedding_dim=self.embedding_dim, hidden_units=self.hidden_units,
                      head_batch_norm=self.head_batch_norm,
                      queue_size=self.queue_size, momentum=self.momentum, temperature=self.temperature,
                      strength=self.strength, blur=self.blur, crop_scale=list(self.crop_scale),
                      flip=self.flip, affine=self.affine, stroke_jitter=self.stroke_jitter,
                      elastic=self.elastic, bn_groups=self.bn_groups,
                      global_batch_size=self.global_batch_size,
                      mochi_hardest=self.mochi_hardest, mochi_mix=self.mochi_mix,
                      mochi_query_mix=self.mochi_query_mix, mochi_start_step=self.mochi_start_step)
        return config
