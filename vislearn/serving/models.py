"""Loaded model versions and their life cycle, as TF Serving manages them.

`ModelManager` follows a `ModelServerConfig`: it polls every model's
`base_path` for numeric version folders, loads the versions its version
policy aspires to (`latest { num_versions: N }` (default N=1), `all`,
`specific { versions: ... }`), and unloads retired ones only after their
replacement is AVAILABLE and their in-flight requests have finished, so a
rollout fails no request. Version states are TF Serving's (START, LOADING,
AVAILABLE, UNLOADING, END) and so are the errors a lookup gives.
"""

import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from vislearn.serving.config import versions_on_disk
from vislearn.serving.errors import ServingError, from_tf_error, invalid, not_found

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_METHOD = "tensorflow/serving/classify"
MAX_LOAD_ATTEMPTS = 5


def read_signature_defs(path):
    """The SignatureDef map of a SavedModel's serving MetaGraphDef."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    for graph in saved.meta_graphs:
        if "serve" in graph.meta_info_def.tags:
            return dict(graph.signature_def)
    return dict(saved.meta_graphs[0].signature_def) if saved.meta_graphs else {}


class Servable:
    """One loaded model version: its signatures, callable on numpy inputs.

    Args:
        name: model name.
        version: version number.
        path: the version folder (a SavedModel).
        batching: `BatchingOptions` to batch requests, or None.
        metrics: `Metrics` or None.
    """

    def __init__(self, name, version, path, batching=None, metrics=None):
        import tensorflow as tf

        self.name, self.version, self.path = name, int(version), Path(path)
        self.signature_defs = read_signature_defs(path)
        self._loaded = tf.saved_model.load(str(path))
        self._functions = dict(self._loaded.signatures)
        self._input_specs = {k: dict(f.structured_input_signature[1]) for k, f in self._functions.items()}
        self._batching = batching
        self._metrics = metrics
        self._queues = {}
        self._lock = threading.Lock()
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._warm = set()  # signatures whose function TF has instantiated (see `_call`)
        self._warming = threading.Lock()

    # -- reference counting: an unload waits for requests that hold this version --
    def acquire(self):
        with self._lock:
            self._active += 1

    def release(self):
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout=60.0):
        with self._lock:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def close(self):
        for queue in list(self._queues.values()):
            queue.close()
        self._queues.clear()

    # -- signatures --
    def signature_def(self, signature):
        key = signature or DEFAULT_SIGNATURE
        if key not in self.signature_defs or key not in self._functions:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.')
        return key, self.signature_defs[key]

    def input_dtypes(self, signature):
        """{input name: tf.DType} of a signature (REST needs them to read JSON)."""
        key = signature or DEFAULT_SIGNATURE
        if key not in self._input_specs:
            raise invalid(f'Serving signature name: "{key}" not found in signature def')
        return {name: spec.dtype for name, spec in sorted(self._input_specs[key].items())}

    def check_inputs(self, key, inputs):
        """TF Serving's input checks: names, dtypes, shapes; plus no empty batch."""
        specs = self._input_specs[key]
        if set(inputs) != set(specs):
            sent, wanted = sorted(inputs), sorted(specs)
            if len(sent) != len(wanted):
                raise invalid(f"input size does not match signature: {len(sent)}!={len(wanted)} "
                              f"len({{{','.join(sent)}}}) != len({{{','.join(wanted)}}}). "
                              f"Sent extra: {{{','.join(sorted(set(sent) - set(wanted)))}}}. "
                              f"Missing but required: {{{','.join(sorted(set(wanted) - set(sent)))}}}.")
            extra = sorted(set(sent) - set(wanted))[0]
            raise invalid(f"input tensor alias not found in signature: {extra}. "
                          f"Inputs expected to be in the set {{{','.join(wanted)}}}.")
        for index, name in enumerate(sorted(specs)):
            spec, array = specs[name], inputs[name]
            if not _dtype_matches(array, spec.dtype):
                raise invalid(f"Expects arg[{index}] ({name}) to be {spec.dtype.name} but "
                              f"{_array_dtype_name(array)} is provided")
            if not spec.shape.is_compatible_with(array.shape):
                raise invalid(f"input {name!r}: shape {list(array.shape)} is not compatible with the "
                              f"signature's {spec.shape.as_list() if spec.shape.rank is not None else '?'}")
            if array.ndim and array.shape[0] == 0 and (spec.shape.rank is None or spec.shape[0] is None):
                raise invalid(f"input {name!r}: empty batch (0th dimension is 0)")

    def run(self, signature, inputs, output_filter=()):
        """Run a signature on numpy inputs.

        Args:
            signature: signature name ("" means serving_default).
            inputs: {input name: np.ndarray}.
            output_filter: output names to return (default all).

        Returns:
            (resolved signature name, {output name: np.ndarray}).
        """
        key, signature_def = self.signature_def(signature)
        self.check_inputs(key, inputs)
        wanted = list(output_filter)
        for alias in wanted:
            if alias not in signature_def.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                              f"the set {{{','.join(sorted(signature_def.outputs))}}}.")
        if len(set(wanted)) != len(wanted):
            raise invalid(f"duplicate output tensor alias: {next(a for a in wanted if wanted.count(a) > 1)}")
        inputs = {n: _to_spec_dtype(a, self._input_specs[key][n].dtype) for n, a in inputs.items()}
        if self._batching is not None and all(a.ndim >= 1 for a in inputs.values()):
            outputs = self._queue(key).submit(inputs)
        else:
            # Scalar inputs (say a lookup's `k`) cannot be merged along dimension 0;
            # such calls run on their own instead of failing as TF Serving's would.
            outputs = self._call(key, inputs)
        if wanted:
            outputs = {alias: outputs[alias] for alias in wanted}
        return key, outputs

    def _queue(self, key):
        with self._lock:
            queue = self._queues.get(key)
            if queue is None:
                from vislearn.serving.batching import BatchQueue

                def on_batch(rows, padded):
                    if self._metrics is not None:
                        from vislearn.serving.metrics import BATCH_SIZE, PADDING_SIZE

                        self._metrics.observe(BATCH_SIZE, rows, model_name=self.name)
                        self._metrics.observe(PADDING_SIZE, padded - rows, model_name=self.name)

                queue = self._queues[key] = BatchQueue(lambda x: self._call(key, x), self._batching, on_batch,
                                                       name=f"{self.name}-{self.version}-{key}")
            return queue

    def _call(self, key, inputs):
        if key in self._warm:
            return self._call_function(key, inputs)
        # TF instantiates (optimises) a signature's graph on its first call, and
        # concurrent first calls each do it again: 32 clients hitting a fresh
        # detector took 94 s instead of 1.5 s. So the first call runs alone.
        with self._warming:
            if key not in self._warm:
                try:
                    outputs = self._call_function(key, inputs)
                except ServingError as error:
                    if getattr(error, "instantiated", False):  # not when the inputs never reached TF
                        self._warm.add(key)
                    raise
                self._warm.add(key)
                return outputs
        return self._call_function(key, inputs)

    def _call_function(self, key, inputs):
        import tensorflow as tf

        try:
            result = self._functions[key](**{n: tf.constant(a) for n, a in inputs.items()})
        except (tf.errors.OpError,) as error:
            failure = _clean_tf_error(error)
            failure.instantiated = True  # it failed while running: the graph exists
            raise failure from None
        except (TypeError, ValueError) as error:
            raise invalid(str(error).strip().splitlines()[0]) from None
        return {name: tensor.numpy() for name, tensor in result.items()}


def _dtype_matches(array, dtype):
    import tensorflow as tf

    if dtype == tf.string:
        return array.dtype == object or array.dtype.kind in "SU"
    return array.dtype != object and array.dtype.kind not in "SU" and tf.dtypes.as_dtype(array.dtype) == dtype


def _array_dtype_name(array):
    if array.dtype == object or array.dtype.kind in "SU":
        return "string"
    import tensorflow as tf

    return tf.dtypes.as_dtype(array.dtype).name


def _to_spec_dtype(array, dtype):
    import tensorflow as tf

    if dtype == tf.string and array.dtype.kind in "SU":
        out = np.empty(array.shape, dtype=object)
        out.reshape(-1)[:] = [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1)]
        return out
    return array


def _clean_tf_error(error):
    """TF's runtime message without the graph trace lines (one line for clients)."""
    failure = from_tf_error(error)
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Detected at node", "[[", "File ", "Graph execution", "<stack traces"))
              and not line.endswith("(most recent call last):")]
    if useful:
        failure.message = useful[0]
    return failure


class _Version:
    __slots__ = ("state", "servable", "code", "message", "attempts")

    def __init__(self):
        self.state = "START"
        self.servable = None
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.attempts = 0


class _Model:
    def __init__(self, config):
        self.config = config
        self.versions = {}

    @property
    def labels(self):
        return dict(self.config.version_labels)


def aspired_versions(model_config, on_disk):
    """Versions the policy wants loaded, given the versions on disk."""
    policy = model_config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return set(on_disk)
    if kind == "specific":
        return set(policy.specific.versions) & set(on_disk)
    count = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
    return set(sorted(on_disk)[-count:])


class ModelManager:
    """Loads, serves and retires model versions per a ModelServerConfig.

    Args:
        config: `ModelServerConfig`.
        batching: `BatchingOptions` or None (batching off).
        metrics: `Metrics` or None.
        poll_seconds: how often base paths are re-read (TF Serving's
            `--file_system_poll_wait_seconds`, default 1); 0 disables polling.
        load_threads: versions loaded at the same time.
    """

    def __init__(self, config, batching=None, metrics=None, poll_seconds=1.0, load_threads=2):
        self.batching = batching
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._models = {}
        self._loader = futures.ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="load")
        self._stop = threading.Event()
        self._poller = None
        self.apply_config(config, wait=False)

    # -- configuration and polling --
    def apply_config(self, config, wait=True, timeout=120.0):
        """Switch to `config`: add new models, retire removed ones, (re)load versions."""
        with self._lock:
            wanted = {m.name: m for m in config.model_config_list.config}
            for name in list(self._models):
                if name not in wanted:
                    model = self._models.pop(name)
                    for version, entry in list(model.versions.items()):
                        self._retire(name, version, entry)
            for name, model_config in wanted.items():
                model = self._models.get(name)
                if model is None:
                    self._models[name] = _Model(model_config)
                else:
                    model.config = model_config
                    for entry in model.versions.values():
                        if entry.state == "END" and entry.code != grpc.StatusCode.OK:
                            entry.attempts = 0  # a new config retries failed loads
        self.poll()
        if wait:
            self.wait_until_loaded(timeout)

    def start_polling(self):
        if self.poll_seconds and self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="fs-poll", daemon=True)
            self._poller.start()

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # a bad file system moment must not stop future polls
                log.exception("polling model base paths failed")

    def poll(self):
        """Compare disk with what is loaded; start loads and retirements."""
        with self._lock:
            for name, model in self._models.items():
                on_disk = [v for v in versions_on_disk(model.config.base_path)
                           if (Path(model.config.base_path) / str(v) / "saved_model.pb").is_file()]
                aspired = aspired_versions(model.config, on_disk)
                for version in sorted(aspired):
                    entry = model.versions.get(version)
                    if entry is None or (entry.state == "END" and entry.code != grpc.StatusCode.OK
                                         and entry.attempts < MAX_LOAD_ATTEMPTS) or (
                            entry.state == "END" and entry.code == grpc.StatusCode.OK):
                        entry = entry or _Version()
                        model.versions[version] = entry
                        entry.state, entry.code, entry.message = "LOADING", grpc.StatusCode.OK, ""
                        entry.attempts += 1
                        path = Path(model.config.base_path) / str(version)
                        self._loader.submit(self._load, name, version, entry, path)
                # Retire versions no longer aspired, but only once an aspired one
                # serves (availability-preserving, TF Serving's default policy).
                serving = any(model.versions.get(v) is not None and model.versions[v].state == "AVAILABLE"
                              for v in aspired)
                for version, entry in list(model.versions.items()):
                    if version not in aspired and entry.state == "AVAILABLE" and (serving or not aspired):
                        self._retire(name, version, entry)
                    elif version not in aspired and entry.state == "LOADING":
                        pass  # finishes loading, then the next poll retires it

    def _load(self, name, version, entry, path):
        started = time.monotonic()
        try:
            servable = Servable(name, version, path, self.batching, self.metrics)
        except Exception as error:  # a broken export must not take the server down
            with self._lock:
                entry.state, entry.code = "END", grpc.StatusCode.UNKNOWN
                entry.message = f"Loading servable: {{name: {name} version: {version}}} failed: " + (
                    str(error).strip().splitlines() or [type(error).__name__])[0]
                self._changed.notify_all()
            log.warning("%s", entry.message)
            if self.metrics is not None:
                self.metrics.increment(":tensorflow:cc:saved_model:load_attempt_count", model_path=str(path),
                                       status="error")
            return
        with self._lock:
            entry.servable, entry.state = servable, "AVAILABLE"
            self._changed.notify_all()
        if self.metrics is not None:
            self.metrics.increment(":tensorflow:cc:saved_model:load_attempt_count", model_path=str(path), status="success")
        log.info("loaded %s version %d in %.2fs", name, version, time.monotonic() - started)
        self.poll()  # may retire the versions this one replaces

    def _retire(self, name, version, entry):
        servable = entry.servable
        entry.state = "UNLOADING"
        entry.servable = None

        def finish():
            if servable is not None:
                servable.wait_idle()  # requests already holding it complete first
                servable.close()
            with self._lock:
                entry.state, entry.code, entry.message = "END", grpc.StatusCode.OK, ""
                self._changed.notify_all()
            log.info("unloaded %s version %d", name, version)

        threading.Thread(target=finish, name=f"unload-{name}-{version}", daemon=True).start()

    def wait_until_loaded(self, timeout=120.0):
        """Block until no version is LOADING (or `timeout` seconds pass)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(e.state == "LOADING" for m in self._models.values() for e in m.versions.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self):
        self._stop.set()
        with self._lock:
            entries = [(n, v, e) for n, m in self._models.items() for v, e in m.versions.items()]
        for _, _, entry in entries:
            if entry.servable is not None:
                entry.servable.wait_idle(10)
                entry.servable.close()
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- lookups --
    def model_names(self):
        with self._lock:
            return sorted(self._models)

    def resolve_version(self, name, version=None, label=None):
        """The version number a request means (checks model and label only)."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise not_found(f"Servable not found for request: Latest({name})")
            if version is not None and label:
                raise invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
            if label:
                if label not in model.labels:
                    raise invalid(f"Unrecognized servable version label: {label}")
                return model.labels[label]
            return version

    def acquire(self, name, version=None, label=None):
        """The Servable for a request, held until `.release()` (use `handle`)."""
        version = self.resolve_version(name, version, label)
        with self._lock:
            model = self._models[name]
            if version is None:
                available = [v for v, e in model.versions.items() if e.state == "AVAILABLE"]
                if not available:
                    if any(e.state == "LOADING" for e in model.versions.values()):
                        raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                           f"Model {name} is loading; no version is available yet")
                    raise not_found(f"Servable not found for request: Latest({name})")
                entry = model.versions[max(available)]
            else:
                entry = model.versions.get(int(version))
                if entry is None or entry.state != "AVAILABLE":
                    if entry is not None and entry.state == "LOADING":
                        raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                           f"Version {version} of model {name} is loading; retry")
                    raise not_found(f"Servable not found for request: Specific({name}, {version})")
            servable = entry.servable
            servable.acquire()
            return servable

    def handle(self, name, version=None, label=None):
        return _Handle(self, name, version, label)

    def status(self, name, version=None, label=None):
        """[(version, state, code, message)] as GetModelStatus reports them."""
        version = self.resolve_version(name, version, label)
        with self._lock:
            model = self._models[name]
            if version is not None:
                entry = model.versions.get(int(version))
                if entry is None:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(int(version), entry.state, entry.code, entry.message)]
            if not model.versions:
                raise not_found(f"Could not find any versions of model {name}")
            return [(v, e.state, e.code, e.message) for v, e in sorted(model.versions.items(), reverse=True)]


class _Handle:
    def __init__(self, manager, name, version, label):
        self._args = (manager, name, version, label)
        self.servable = None

    def __enter__(self):
        manager, name, version, label = self._args
        self.servable = manager.acquire(name, version, label)
        return self.servable

    def __exit__(self, *exc):
        self.servable.release()
        return False
