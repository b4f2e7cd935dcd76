"""InfoNCE / NT-Xent: the one contrastive loss of SimCLR, MoCo and MoChi.

Every row of the loss is one anchor (a query embedding) scored against a set
of candidates: one positive and many negatives. The loss takes the cosine
similarities of each anchor to its candidates and the column of its positive,
divides the similarities by the temperature and applies softmax cross-entropy:

    loss_i = -log( exp(s_ip / t) / sum_j exp(s_ij / t) )

The methods differ only in how they lay out the candidates:

- SimCLR (NT-Xent): the candidates of a view are all 2N views of the global
  batch except itself (masked out); the positive is the other view of the
  same image (`nt_xent_similarities`).
- MoCo: column 0 is the query's own key, the other columns the K keys of the
  queue (`moco_similarities`, positive index 0).
- MoChi: MoCo's columns plus the synthetic hard negatives, appended.

`gather_across_replicas` builds SimCLR's global candidate set under
`tf.distribute`. Logits are computed in float32 whatever the compute dtype
(fp16 overflows at t = 0.07).

References:
    Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive
    Coding", 2018 (InfoNCE).
    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive
    Learning of Visual Representations", ICML 2020 (NT-Xent).
    He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR 2020.
"""

import keras
import tensorflow as tf

from vislearn.config import ConfigError

# Added to the similarity of excluded candidates (an anchor with itself):
# far below any cosine similarity, yet finite so no NaN reaches the gradient.
EXCLUDED = -1e4


def check_temperature(temperature, where="temperature"):
    temperature = float(temperature)
    if not temperature > 0:
        raise ConfigError(f"{where}: expected a temperature > 0, received {temperature}")
    return temperature


@keras.saving.register_keras_serializable(package="vislearn")
class InfoNCE(keras.losses.Loss):
    """Softmax cross-entropy over temperature-scaled similarities.

    Args:
        temperature: t > 0 (SimCLR 0.1-0.5, MoCo v1 0.07, MoCo v2 0.2).

    Call arguments:
        y_true: int tensor (batch,): the column of each row's positive.
        y_pred: float tensor (batch, candidates): cosine similarities of each
            anchor to its candidates (excluded candidates pushed far down,
            see `EXCLUDED`).

    Returns:
        The mean loss over anchors (scaled for tf.distribute as every Keras loss).
    """

    def __init__(self, temperature=0.1, name="info_nce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = check_temperature(temperature)

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.float32) / self.temperature
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y_true, tf.int32), logits=logits)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def gather_across_replicas(values):
    """Concatenate `values` (a tensor (batch, ...) or a nest of them) of every
    replica along axis 0, in replica order; the identity outside a
    multi-replica replica context.

    The gradient reaching the gathered tensor is summed over replicas and
    each replica keeps the slice of its own rows (TensorFlow's all-gather
    gradient): every replica's loss that used these rows as negatives
    contributes to their gradient, so summing the replicas' parameter
    gradients (as Keras does) gives exactly the gradient of the loss over
    the global batch on one device.

    Returns:
        (gathered values, offset of this replica's rows in them).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values, 0
    gathered = context.all_gather(values, axis=0)
    # Replicas hold equal shards (batches are dropped to a multiple of the replica count).
    rows = tf.shape(tf.nest.flatten(values)[0])[0]
    offset = tf.cast(context.replica_id_in_sync_group, tf.int32) * rows
    return gathered, offset


def nt_xent_similarities(views_a, views_b, candidates_a=None, candidates_b=None, offset=0):
    """NT-Xent's similarity rows and positive columns for the 2N local views.

    Args:
        views_a, views_b: (n, dim) embeddings of the two views of n local images.
        candidates_a, candidates_b: (N, dim) embeddings of the two views of the
            N images of the global batch (default: the local ones, N = n).
        offset: index of this replica's first image among the N.

    Returns:
        (positive column (2n,), similarities (2n, 2N)): rows are the local views
        a then b; columns are the global views a then b; each row's own
        column is excluded.
    """
    if candidates_a is None:
        candidates_a, candidates_b = views_a, views_b
    anchors = tf.math.l2_normalize(tf.cast(tf.concat([views_a, views_b], 0), tf.float32), axis=-1)
    candidates = tf.math.l2_normalize(tf.cast(tf.concat([candidates_a, candidates_b], 0), tf.float32), axis=-1)
    n, total = tf.shape(views_a)[0], tf.shape(candidates_a)[0]
    local = tf.range(n) + offset                                   # the local images' global indices
    own = tf.concat([local, local + total], 0)                     # each row's own column
    positive = tf.concat([local + total, local], 0)                # the other view of the same image
    similarities = tf.matmul(anchors, candidates, transpose_b=True)
    similarities += EXCLUDED * tf.one_hot(own, 2 * total)
    return positive, similarities


def moco_similarities(queries, keys, queue, extra_negatives=None):
    """MoCo's similarity rows: column 0 the positive key, then the queue
    (then, for MoChi, each query's own synthetic negatives).

    Args:
        queries, keys: (n, dim) embeddings (L2-normalised here).
        queue: (K, dim) L2-normalised negative keys.
        extra_negatives: optional (n, m, dim) per-query negatives.

    Returns:
        (positive column (n,) all 0, similarities (n, 1 + K [+ m])).
    """
    queries = tf.math.l2_normalize(tf.cast(queries, tf.float32), axis=-1)
    keys = tf.math.l2_normalize(tf.cast(keys, tf.float32), axis=-1)
    columns = [tf.reduce_sum(queries * keys, axis=-1, keepdims=True),
               tf.matmul(queries, tf.cast(queue, tf.float32), transpose_b=True)]
    if extra_negatives is not None:
        columns.append(tf.einsum("nd,nmd->nm", queries, tf.cast(extra_negatives, tf.float32)))
    return tf.zeros([tf.shape(queries)[0]], tf.int32), tf.concat(columns, axis=1)
