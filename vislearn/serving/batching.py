"""Dynamic batching with TF Serving's parameters.

Concurrent requests to the same model version and signature wait in one
queue; a batch thread merges them along dimension 0, runs the signature once
and splits the outputs back. The knobs and their meaning are TF Serving's
(`BatchingParameters` in `session_bundle_config.proto`, read from the same
`batching_parameters.txt` that `--batching_parameters_file` takes):

- `max_batch_size`: most rows in one batch; a larger request is refused
  (INVALID_ARGUMENT "Task size N is larger than maximum input batch size M").
- `batch_timeout_micros`: how long the oldest queued request waits for others.
- `num_batch_threads`: batches that run at the same time.
- `max_enqueued_batches`: queue bound; beyond it requests are refused with
  UNAVAILABLE ("The batch scheduling queue ... is full"), as in TF Serving.
- `allowed_batch_sizes`: a formed batch is padded (with copies of its first
  row) up to the next allowed size, so a model sees few distinct shapes.
"""

import collections
import math
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf import message_factory
from google.protobuf import wrappers_pb2  # noqa: F401  (registers wrappers.proto in the default pool)

from vislearn.config import ConfigError
from vislearn.serving.errors import ServingError, from_tf_error, invalid


def _build_messages():
    # tensorflow-serving-api does not ship session_bundle_config.proto or
    # monitoring_config.proto, so the two messages are declared here with TF
    # Serving's field names; text_format then accepts exactly TF Serving's files.
    proto = descriptor_pb2.FileDescriptorProto(
        name="vislearn/serving/tf_serving_configs.proto", package="vislearn.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    F = descriptor_pb2.FieldDescriptorProto
    batching = proto.message_type.add(name="BatchingParameters")
    for number, (name, kind) in enumerate([
            ("max_batch_size", ".google.protobuf.Int64Value"),
            ("batch_timeout_micros", ".google.protobuf.Int64Value"),
            ("max_enqueued_batches", ".google.protobuf.Int64Value"),
            ("num_batch_threads", ".google.protobuf.Int64Value"),
            ("thread_pool_name", ".google.protobuf.StringValue")], start=1):
        batching.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=kind)
    batching.field.add(name="allowed_batch_sizes", number=6, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    batching.field.add(name="pad_variable_length_inputs", number=7, label=F.LABEL_OPTIONAL, type=F.TYPE_BOOL)
    batching.field.add(name="enable_large_batch_splitting", number=8, label=F.LABEL_OPTIONAL,
                       type=F.TYPE_MESSAGE, type_name=".google.protobuf.BoolValue")
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_BOOL)
    prometheus.field.add(name="path", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                         type_name=".vislearn.serving.PrometheusConfig")
    pool = descriptor_pool.Default()
    try:
        file = pool.FindFileByName(proto.name)
    except KeyError:
        file = pool.Add(proto) and pool.FindFileByName(proto.name)
    return (message_factory.GetMessageClass(file.message_types_by_name["BatchingParameters"]),
            message_factory.GetMessageClass(file.message_types_by_name["MonitoringConfig"]))


BatchingParametersProto, MonitoringConfigProto = _build_messages()

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"


class BatchingOptions:
    """Resolved batching parameters (TF Serving's defaults where unset).

    Args:
        max_batch_size: most rows per batch (TF Serving default 1000).
        batch_timeout_micros: wait for more requests at most this long (0).
        num_batch_threads: batches run in parallel (default: CPU count).
        max_enqueued_batches: queue bound in batches (10).
        allowed_batch_sizes: increasing sizes, the last equal to
            `max_batch_size`; batches are padded up to one of them.
    """

    def __init__(self, max_batch_size=1000, batch_timeout_micros=0, num_batch_threads=None,
                 max_enqueued_batches=10, allowed_batch_sizes=(), source="batching parameters"):
        self.max_batch_size = int(max_batch_size)
        self.batch_timeout_micros = int(batch_timeout_micros)
        self.num_batch_threads = int(num_batch_threads or os.cpu_count() or 1)
        self.max_enqueued_batches = int(max_enqueued_batches)
        self.allowed_batch_sizes = [int(s) for s in allowed_batch_sizes]
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name}: expected >= 1, received {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ConfigError(f"{source}: batch_timeout_micros: expected >= 0, received {self.batch_timeout_micros}")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ConfigError(f"{source}: allowed_batch_sizes: entries must be positive and increasing, "
                                  f"received {sizes}")
            if sizes[-1] != self.max_batch_size:
                raise ConfigError(f"{source}: allowed_batch_sizes: the last entry must equal max_batch_size "
                                  f"({self.max_batch_size}), received {sizes}")

    @classmethod
    def from_proto(cls, proto, source="batching parameters"):
        def value(name, default):
            return getattr(proto, name).value if proto.HasField(name) else default

        return cls(max_batch_size=value("max_batch_size", 1000),
                   batch_timeout_micros=value("batch_timeout_micros", 0),
                   num_batch_threads=value("num_batch_threads", None),
                   max_enqueued_batches=value("max_enqueued_batches", 10),
                   allowed_batch_sizes=list(proto.allowed_batch_sizes), source=source)

    def padded_size(self, size):
        for allowed in self.allowed_batch_sizes:
            if allowed >= size:
                return allowed
        return size

    def __repr__(self):
        return (f"BatchingOptions(max_batch_size={self.max_batch_size}, batch_timeout_micros="
                f"{self.batch_timeout_micros}, num_batch_threads={self.num_batch_threads}, max_enqueued_batches="
                f"{self.max_enqueued_batches}, allowed_batch_sizes={self.allowed_batch_sizes})")


def _parse_text(path, message, what):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return text_format.Parse(path.read_text(), message)
    except text_format.ParseError as error:
        line = error.GetLine()
        text = str(error).splitlines()[0].split(" : ", 1)[-1]
        raise ConfigError(f"{path}:{line}: {text}" if line else f"{path}: {text}") from None


def read_batching_parameters(path):
    """Read a TF Serving `batching_parameters.txt` into `BatchingOptions`."""
    proto = _parse_text(path, BatchingParametersProto(), "batching parameters")
    return BatchingOptions.from_proto(proto, source=str(path))


def read_monitoring_config(path):
    """Read a TF Serving `monitoring_config.txt`; returns (enabled, path)."""
    proto = _parse_text(path, MonitoringConfigProto(), "monitoring config")
    config = proto.prometheus_config
    metrics_path = config.path or DEFAULT_METRICS_PATH
    if not metrics_path.startswith("/"):
        raise ConfigError(f"{path}: prometheus_config.path: expected an absolute URL path, received {metrics_path!r}")
    return bool(config.enable), metrics_path


def batch_size_of(inputs):
    """Rows in a request; the TF Serving errors for inputs that cannot batch."""
    sizes = set()
    for array in inputs.values():
        if array.ndim == 0:
            raise invalid("Batching Run() input tensors must have at least one dimension")
        sizes.add(array.shape[0])
    if len(sizes) > 1:
        raise invalid("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop() if sizes else 0


class _Task:
    __slots__ = ("inputs", "size", "key", "enqueued", "done", "result", "error")

    def __init__(self, inputs, size):
        self.inputs = inputs
        self.size = size
        # Only requests whose tensors agree beyond dimension 0 can be merged.
        self.key = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result = None
        self.error = None


class BatchQueue:
    """One batching queue: merges concurrent calls of `run` along dimension 0.

    Args:
        run: function `{name: np.ndarray} -> {name: np.ndarray}`; every output
            must have the batch as dimension 0.
        options: `BatchingOptions`.
        on_batch: optional callback `(batch_size, padded_size)` for metrics.
        name: thread name prefix (for debugging).

    Call arguments (`submit`):
        inputs: `{name: np.ndarray}` with equal dimension 0.

    Returns:
        `{name: np.ndarray}`, this request's rows of every output.
    """

    def __init__(self, run, options, on_batch=None, name="batch"):
        self._run = run
        self.options = options
        self._on_batch = on_batch
        self._tasks = collections.deque()
        self._queued_rows = 0
        self._cv = threading.Condition()
        self._forming = False
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs, timeout=None):
        size = batch_size_of(inputs)
        limit = self.options.max_batch_size
        if size > limit:
            raise invalid(f"Task size {size} is larger than maximum input batch size {limit}")
        task = _Task(inputs, size)
        with self._cv:
            if self._closed:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "Model version is unloading; retry")
            batches = math.ceil((self._queued_rows + size) / limit)
            if batches > self.options.max_enqueued_batches:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   "The batch scheduling queue to which this task was submitted is full")
            self._tasks.append(task)
            self._queued_rows += size
            self._cv.notify_all()
        if not task.done.wait(timeout):
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Batched request timed out")
        if task.error is not None:
            raise task.error
        return task.result

    def close(self):
        """Stop accepting; queued tasks still run (drain), then threads exit."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    def _take(self):
        """Wait for a batch to form (full or timed out); None when closed and empty."""
        with self._cv:
            while (self._forming or not self._tasks) and not (self._closed and not self._tasks):
                self._cv.wait()
            if not self._tasks:
                return None
            self._forming = True
            try:
                limit = self.options.max_batch_size
                timeout = self.options.batch_timeout_micros / 1e6
                while not self._closed:
                    head = self._tasks[0]
                    rows = sum(t.size for t in self._tasks if t.key == head.key)
                    left = head.enqueued + timeout - time.monotonic()
                    if rows >= limit or left <= 0:
                        break
                    self._cv.wait(left)
                head = self._tasks[0]
                batch, rows, keep = [], 0, collections.deque()
                for task in self._tasks:
                    if task.key == head.key and rows + task.size <= limit:
                        batch.append(task)
                        rows += task.size
                    else:
                        keep.append(task)
                self._tasks = keep
                self._queued_rows -= rows
                return batch
            finally:
                self._forming = False
                self._cv.notify_all()

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch):
        try:
            self._run_merged(batch)
        except Exception as error:  # the server must answer every waiting request
            if len(batch) > 1:
                # One bad request (say, an undecodable image) must not fail the
                # others merged with it: rerun each on its own to isolate it.
                for task in batch:
                    self._execute([task])
                return
            failure = error if isinstance(error, ServingError) else (
                from_tf_error(error) if hasattr(error, "error_code")
                else ServingError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"))
            batch[0].error = failure
        finally:
            for task in batch:
                task.done.set()

    def _run_merged(self, batch):
        rows = sum(t.size for t in batch)
        padded = self.options.padded_size(rows)
        merged = {}
        for name in batch[0].inputs:
            parts = [t.inputs[name] for t in batch]
            if padded > rows:
                parts.append(np.repeat(parts[0][:1], padded - rows, axis=0))
            merged[name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        outputs = self._run(merged)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != padded:
                raise ServingError(grpc.StatusCode.INTERNAL,
                                   f"Batched output tensor {name!r} has 0th dimension "
                                   f"{value.shape[0] if value.ndim else 'none (scalar)'}, "
                                   f"expected the batch size {padded}")
        if self._on_batch is not None:
            self._on_batch(rows, padded)
        start = 0
        for task in batch:
            task.result = {n: v[start:start + task.size] for n, v in outputs.items()}
            start += task.size
