"""Losses shared by several methods, and distribution helpers for losses."""

import tensorflow as tf


def per_replica_mean(loss):
    """Undo the 1/num_replicas factor Keras losses apply under tf.distribute.

    A `keras.losses.Loss` divides its local-batch mean by the replica count so
    that summing gradients across replicas yields the global mean. Metrics
    that track the loss want the plain local mean back.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * tf.cast(replicas, loss.dtype) if replicas > 1 else loss
