"""Choosing a tf.distribute strategy by name (`--strategy`, `distribute.strategy`)."""

import json
import os

import tensorflow as tf

from vislearn.config import ConfigError

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")


def use_logical_cpus(count):
    """Split the host CPU into `count` logical devices (must run before TF
    initialises its devices); lets MirroredStrategy run on a CPU-only machine."""
    cpus = tf.config.list_physical_devices("CPU")
    if len(tf.config.get_logical_device_configuration(cpus[0]) or ()) == count:
        return  # already split (several fits in one process)
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


def _tf_config():
    try:
        return json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"TF_CONFIG: not valid JSON ({error})") from None


def worker_count():
    cluster = _tf_config().get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def is_chief():
    """True unless TF_CONFIG names this process a non-chief worker."""
    config = _tf_config()
    task = config.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    if not kind or kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})


def _tpu_configured():
    return bool(os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")
                or os.path.exists("/dev/accel0"))


def resolve_strategy_name(name):
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown strategy {name!r}; expected one of {list(STRATEGIES)}")
    if name != "auto":
        return name
    if _tpu_configured():
        return "tpu"
    if worker_count() > 1:
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def make_strategy(name="auto"):
    """Build the strategy: `auto` picks TPU when one is configured, multi-worker
    when TF_CONFIG names several workers, mirrored with several GPUs, else default.

    `VISLEARN_LOGICAL_CPUS=N` splits the CPU into N devices first (for trying
    `mirrored` on a machine without GPUs)."""
    resolved = resolve_strategy_name(name)
    logical = int(os.environ.get("VISLEARN_LOGICAL_CPUS", "0") or 0)
    if logical > 1 and resolved == "mirrored":
        use_logical_cpus(logical)
    if resolved == "default":
        return tf.distribute.get_strategy()
    if resolved == "one_device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if resolved == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        # Reduce on one device: the default collective all-reduce reuses its
        # instance keys in every new strategy, so a second fit in the same
        # process aborted with "Shape mismatch in the collective instance 100".
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    if resolved == "multi_worker":
        if worker_count() < 1:
            raise ConfigError("--strategy multi_worker: TF_CONFIG names no workers")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def step_logs(metrics):
    """`{name: result}` of a train/test step's metrics, ready for Keras to reduce.

    Under MultiWorkerMirroredStrategy Keras 3 reduces step outputs across
    workers with `strategy.reduce("MEAN", value, axis=0)`, which needs an axis
    to reduce over; scalars get a length-1 axis there (and only there, so the
    logs stay scalars everywhere else).
    """
    logs = {metric.name: metric.result() for metric in metrics}
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def build_optimizer_state(model):
    """What a model built in its constructor needs from Keras' pre-fit build.

    Before `fit` under a strategy, Keras calls the model on one (replica-
    averaged) data batch to build it; that fails for dict batches under
    multi-worker training, so vislearn's models override
    `_maybe_symbolic_build` with this instead. The optimizer's slots must
    still be created here, under the strategy's scope: created later inside
    the distributed step they break it.
    """
    if model.optimizer is not None and not model.optimizer.built:
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)
