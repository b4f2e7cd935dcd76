"""Embedded TF-Serving-compatible server: gRPC and REST on the same models.

`vislearn serve` runs this where the `tensorflow_model_server` binary is not
available. It speaks TF Serving's APIs so the same clients work on both:

- gRPC `tensorflow.serving.PredictionService` (Predict, GetModelMetadata,
  Classify; Regress and MultiInference answer UNIMPLEMENTED),
  `tensorflow.serving.ModelService` (GetModelStatus,
  HandleReloadConfigRequest) and `grpc.health.v1.Health`.
- REST: `GET /v1/models/{name}[/versions/{v}|/labels/{l}][/metadata]`,
  `POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict|:classify`,
  and Prometheus metrics at `/monitoring/prometheus/metrics`.

Example:

```python
from vislearn.serving.server import Server

with Server(models=["digits=exports/digits"], port=0, rest_port=0) as server:
    print(server.port, server.rest_port)   # the ports it bound
```
"""

import json
import logging
import re
import threading
import time
import urllib.parse
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from vislearn.config import ConfigError
from vislearn.serving import tensors
from vislearn.serving.batching import DEFAULT_METRICS_PATH
from vislearn.serving.config import check_model_config, config_from_flags, read_model_config
from vislearn.serving.errors import CODE_NUMBER, ServingError, invalid
from vislearn.serving.metrics import Metrics
from vislearn.serving.models import CLASSIFY_METHOD, DEFAULT_SIGNATURE, ModelManager

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def _spec_version(spec):
    """(version or None, label or None) of a ModelSpec."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


class Core:
    """What gRPC and REST share: the model manager, metrics and request logic."""

    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    def predict(self, name, version, label, signature, inputs, output_filter=()):
        with self.manager.handle(name, version, label) as servable:
            key, outputs = servable.run(signature, inputs, output_filter)
            return servable.version, key, outputs

    def input_dtypes(self, name, version, label, signature):
        with self.manager.handle(name, version, label) as servable:
            return servable.input_dtypes(signature)

    def metadata(self, name, version, label):
        with self.manager.handle(name, version, label) as servable:
            return servable.version, servable.signature_defs

    def classify(self, name, version, label, signature, examples):
        """Run a classify-method signature on serialized tf.Examples."""
        with self.manager.handle(name, version, label) as servable:
            key = signature or DEFAULT_SIGNATURE
            if key not in servable.signature_defs:
                raise invalid(f"No signature was found with the name: {key}")
            signature_def = servable.signature_defs[key]
            if signature_def.method_name != CLASSIFY_METHOD:
                raise invalid(f"Expected classification signature method_name to be {CLASSIFY_METHOD}. "
                              f"Was: {signature_def.method_name}")
            if len(signature_def.inputs) != 1:
                raise invalid("Expected one input Tensor.")
            if not {"classes", "scores"} & set(signature_def.outputs):
                raise invalid('Expected classification signature outputs to contain at least one of "classes" '
                              'or "scores".')
            if not examples:
                raise invalid("Invalid argument: Input is empty.")
            array = np.empty(len(examples), dtype=object)
            array[:] = examples
            input_name = next(iter(signature_def.inputs))
            _, outputs = servable.run(key, {input_name: array})
            classes, scores = outputs.get("classes"), outputs.get("scores")
            for tensor, what in ((classes, "classes"), (scores, "scores")):
                if tensor is not None and (tensor.ndim != 2 or tensor.shape[0] != len(examples)):
                    raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(tensor.shape)} "
                                  f"for {what}")
            result = classification_pb2.ClassificationResult()
            count = (classes if classes is not None else scores).shape[1]
            for row in range(len(examples)):
                classifications = result.classifications.add()
                for column in range(count):
                    item = classifications.classes.add()
                    if classes is not None:
                        value = classes[row, column]
                        item.label = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                    if scores is not None:
                        item.score = float(scores[row, column])
            return servable.version, key, result

    def status(self, name, version, label):
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, state, code, message in self.manager.status(name, version, label):
            status = response.model_version_status.add(version=number)
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            status.status.error_code = CODE_NUMBER[code]
            status.status.error_message = message
        return response

    def timed(self, name, api, entrypoint, fn):
        start = time.perf_counter()
        status = "OK"
        try:
            return fn()
        except ServingError as error:
            status = error.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.metrics.request(name or "", api, entrypoint, status, time.perf_counter() - start)


def _guard(fn):
    """Every failure becomes a gRPC status; nothing a client sends escapes as a crash."""

    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except ServingError as error:
            context.abort(error.code, error.message)
        except ConfigError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:  # log it; the client gets INTERNAL, the server stays up
            log.exception("internal error in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    wrapper.__name__ = fn.__name__
    return wrapper


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService over the shared Core."""

    def __init__(self, core):
        self.core = core

    @_guard
    def Predict(self, request, context):  # noqa: N802  (gRPC method name)
        spec = request.model_spec
        version, label = _spec_version(spec)

        def run():
            inputs = {name: tensors.from_tensor_proto(proto, name) for name, proto in request.inputs.items()}
            served, key, outputs = self.core.predict(spec.name, version, label, spec.signature_name, inputs,
                                                     request.output_filter)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = served
            response.model_spec.signature_name = key
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tensors.to_tensor_proto(value))
            return response

        return self.core.timed(spec.name, "predict", "GRPC", run)

    @_guard
    def GetModelMetadata(self, request, context):  # noqa: N802
        spec = request.model_spec
        version, label = _spec_version(spec)
        if not request.metadata_field:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise invalid(f"Metadata field {field} is not supported")

        def run():
            served, signature_defs = self.core.metadata(spec.name, version, label)
            return metadata_response(spec.name, served, signature_defs)

        return self.core.timed(spec.name, "get_model_metadata", "GRPC", run)

    @_guard
    def Classify(self, request, context):  # noqa: N802
        spec = request.model_spec
        version, label = _spec_version(spec)

        def run():
            examples = examples_of(request.input)
            served, key, result = self.core.classify(spec.name, version, label, spec.signature_name, examples)
            response = classification_pb2.ClassificationResponse(result=result)
            response.model_spec.name = spec.name
            response.model_spec.version.value = served
            response.model_spec.signature_name = key
            return response

        return self.core.timed(spec.name, "classify", "GRPC", run)


def examples_of(input_proto):
    """Serialized tf.Examples of an `Input`, context features merged in (as TF Serving)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples]
    if kind == "example_list_with_context":
        listed = input_proto.example_list_with_context
        merged = []
        for example in listed.examples:
            copy = type(example)()
            copy.CopyFrom(listed.context)
            copy.MergeFrom(example)
            merged.append(copy.SerializeToString())
        return merged
    raise invalid("Input is empty.")


def metadata_response(name, version, signature_defs):
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, value in signature_defs.items():
        signature_map.signature_def[key].CopyFrom(value)
    response.metadata["signature_def"].Pack(signature_map)
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: status and config reload."""

    def __init__(self, core):
        self.core = core

    @_guard
    def GetModelStatus(self, request, context):  # noqa: N802
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        spec = request.model_spec
        version, label = _spec_version(spec)
        return self.core.timed(spec.name, "get_model_status", "GRPC",
                               lambda: self.core.status(spec.name, version, label))

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        response = model_management_pb2.ReloadConfigResponse()
        try:
            check_model_config(request.config, "ReloadConfigRequest.config")
            self.core.manager.apply_config(request.config, wait=True)
        except ConfigError as error:
            response.status.error_code = CODE_NUMBER[grpc.StatusCode.INVALID_ARGUMENT]
            response.status.error_message = str(error)
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(error))
            return response
        response.status.error_code = 0
        return response


# --- REST ----------------------------------------------------------------------------

_PREDICT_PATH = re.compile(r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:"
                           r"(classify|regress|predict)")
_STATUS_PATH = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
                          r"(?:/(metadata))?")


def _json_message(message):
    return json_format.MessageToJson(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, indent=1)


def _example_from_json(value):
    """A REST `examples` item (JSON object) -> serialized tf.Example (TF Serving's rules)."""
    import tensorflow as tf

    if not isinstance(value, dict):
        raise invalid(f"Example must be JSON object but got JSON {tensors._json_type(value)}")
    features = {}
    for name, content in value.items():
        items = content if isinstance(content, list) else [content]
        kinds = set()
        for item in items:
            if isinstance(item, bool) or (isinstance(item, int) and not isinstance(item, bool)):
                kinds.add("int64")
            elif isinstance(item, float):
                kinds.add("float")
            elif isinstance(item, str) or tensors.is_b64(item):
                kinds.add("bytes")
            else:
                raise invalid(f"Feature: {name} has element with unexpected JSON type: {tensors._json_type(item)}")
        if len(kinds) > 1:
            raise invalid(f"Unexpected element type in feature: {name} expecting type: {sorted(kinds)[0]}")
        kind = kinds.pop() if kinds else "float"
        if kind == "int64":
            features[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(i) for i in items]))
        elif kind == "float":
            features[name] = tf.train.Feature(float_list=tf.train.FloatList(value=items))
        else:
            data = [tensors._scalar(i, tf.string) for i in items]
            features[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
    return tf.train.Example(features=tf.train.Features(feature=features))


class RestHandler(BaseHTTPRequestHandler):
    """TF Serving's REST API (see `model_servers/http_rest_api_handler.cc`)."""

    server_version = "vislearn-serving"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  (stdlib signature)
        log.debug("rest: " + format, *args)

    def do_GET(self):  # noqa: N802
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PUT(self):  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self):  # noqa: N802
        self._handle("DELETE")

    def _reply(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method):
        state = self.server.state
        path = urllib.parse.urlsplit(self.path).path
        try:
            body = self._read_body(state.max_message_bytes)
            if state.metrics_enabled and path == state.metrics_path and method == "GET":
                self._reply(200, state.core.metrics.render(), "text/plain; version=0.0.4")
                return
            if not re.fullmatch(r"(?i)/v1/.*", path):
                self._reply(404, json.dumps({"error": f"Not found: {method} {path}"}))
                return
            self._reply(200, self._route(method, path, body))
        except ServingError as error:
            self._reply(error.http_status, json.dumps({"error": error.message}))
        except Exception as error:  # never let a request kill the handler thread silently
            log.exception("internal error on %s %s", method, path)
            self._reply(500, json.dumps({"error": f"{type(error).__name__}: {error}"}))

    def _read_body(self, limit):
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            length = int(length)
        except ValueError:
            raise invalid(f"Bad Content-Length: {length!r}") from None
        if length > limit:
            # Read (and drop) the body so the connection stays usable, then refuse.
            remaining = length
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"Received message larger than max ({length} vs. {limit})")
        return self.rfile.read(length)

    def _route(self, method, path, body):
        core = self.server.state.core
        if method == "POST":
            match = _PREDICT_PATH.fullmatch(path)
            if match:
                name, version, label, verb = match.groups()
                name = urllib.parse.unquote(name)
                label = urllib.parse.unquote(label) if label else None
                version = int(version) if version else None
                if version is not None and label:
                    raise invalid(f"Both model version ({version}) and model version label ({label}) "
                                  "cannot be supplied.")
                if verb.lower() == "predict":
                    return core.timed(name, "predict", "REST", lambda: self._predict(name, version, label, body))
                if verb.lower() == "classify":
                    return core.timed(name, "classify", "REST", lambda: self._classify(name, version, label, body))
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not implemented by vislearn serve")
        elif method == "GET":
            match = _STATUS_PATH.fullmatch(path)
            if match:
                name, version, label, metadata = match.groups()
                if not name:
                    raise invalid("Missing model name in request.")
                name = urllib.parse.unquote(name)
                label = urllib.parse.unquote(label) if label else None
                version = int(version) if version else None
                if metadata:
                    served, signature_defs = core.metadata(name, version, label)
                    response = metadata_response(name, served, signature_defs)
                    signature_map = get_model_metadata_pb2.SignatureDefMap()
                    response.metadata["signature_def"].Unpack(signature_map)
                    return ('{\n"model_spec":' + _json_message(response.model_spec) + ',\n"metadata": {'
                            '"signature_def": ' + _json_message(signature_map) + "}\n}\n")
                return _json_message(core.status(name, version, label))
        raise invalid(f"Malformed request: {method} {path}")

    def _predict(self, name, version, label, body):
        core = self.server.state.core
        signature, inputs, form = tensors.parse_predict_json(
            body, lambda sig: core.input_dtypes(name, version, label, sig))
        _, _, outputs = core.predict(name, version, label, signature, inputs)
        return tensors.outputs_to_json(outputs, form)

    def _classify(self, name, version, label, body):
        core = self.server.state.core
        doc = tensors.parse_json_object(body)
        signature = doc.get("signature_name", "")
        if not isinstance(signature, str):
            raise invalid("'signature_name' key must be a string value.")
        examples = doc.get("examples")
        if examples is None:
            raise invalid("When method is classify, key 'examples' is expected and was not found")
        if not isinstance(examples, list):
            raise invalid("Expecting 'examples' value to be an list/array")
        if not examples:
            raise invalid("'examples' value is an empty array")
        context = _example_from_json(doc["context"]) if "context" in doc else None
        serialized = []
        for item in examples:
            example = _example_from_json(item)
            if context is not None:
                merged = type(context)()
                merged.CopyFrom(context)
                merged.MergeFrom(example)
                example = merged
            serialized.append(example.SerializeToString())
        _, _, result = core.classify(name, version, label, signature, serialized)
        results = [[[c.label, float(np.float32(c.score).astype(str))] for c in item.classes]
                   for item in result.classifications]
        return json.dumps({"results": results})


class _RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _RestState:
    def __init__(self, core, max_message_bytes, metrics_enabled, metrics_path):
        self.core = core
        self.max_message_bytes = max_message_bytes
        self.metrics_enabled = metrics_enabled
        self.metrics_path = metrics_path


def set_tf_threads(intra_op=0, inter_op=0):
    """Size TF's thread pools; only possible before TF's runtime starts."""
    if not (intra_op or inter_op):
        return
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:  # TF already initialised in this process: keep its pools
        log.warning("TensorFlow is already initialised; thread pool sizes unchanged")


class Server:
    """The embedded TF-Serving-compatible server.

    Args:
        model_config: a `ModelServerConfig`, or the path of a `models.config`.
        models: `NAME=PATH` strings (instead of `model_config`).
        port: gRPC port (0 picks a free one; see `.port`).
        rest_port: REST port (0 picks a free one; None disables REST).
        host: address to bind (default loopback only).
        batching: `BatchingOptions` to enable dynamic batching, or None.
        monitoring: (enabled, path) for Prometheus metrics on the REST port.
        poll_seconds: base-path poll interval (0: no polling).
        max_message_bytes: largest gRPC message / REST body accepted.
        grpc_threads: gRPC worker threads (concurrent requests in flight).
        intra_op_threads, inter_op_threads: TensorFlow thread pools (TF
            Serving's `--tensorflow_intra_op_parallelism` /
            `--tensorflow_inter_op_parallelism`); 0 keeps TF's default. Small
            models on few cores serve faster with 1 each.
    """

    def __init__(self, model_config=None, models=(), port=8500, rest_port=8501, host="127.0.0.1", batching=None,
                 monitoring=(True, DEFAULT_METRICS_PATH), poll_seconds=1.0,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, grpc_threads=64,
                 intra_op_threads=0, inter_op_threads=0):
        if (model_config is None) == (not models):
            raise ConfigError("give either a model config file (--model-config) or --model NAME=PATH, not both "
                              "or neither")
        if model_config is None:
            model_config = config_from_flags(models)
        elif not isinstance(model_config, model_server_config_pb2.ModelServerConfig):
            model_config = read_model_config(model_config)
        self.config = model_config
        self.host = host
        self._ports = (port, rest_port)
        self.batching = batching
        self.monitoring = monitoring
        self.poll_seconds = poll_seconds
        self.max_message_bytes = int(max_message_bytes)
        self.grpc_threads = grpc_threads
        self.threads = (int(intra_op_threads), int(inter_op_threads))
        self.metrics = Metrics()
        self.manager = None
        self.port = None
        self.rest_port = None
        self._grpc = None
        self._rest = None
        self._rest_thread = None
        self._health = None
        self._stopped = threading.Event()  # stop() has begun
        self._done = threading.Event()  # stop() has finished draining

    def start(self, wait_for_load=True, timeout=300.0):
        """Load the models (waiting unless told not to) and open the ports."""
        set_tf_threads(*self.threads)
        self.manager = ModelManager(self.config, self.batching, self.metrics, self.poll_seconds)
        if wait_for_load:
            self.manager.wait_until_loaded(timeout)
            failed = [(n, s) for n in self.manager.model_names() for s in self._safe_status(n)
                      if s[1] == "END" and s[2] != grpc.StatusCode.OK]
            if failed:
                name, (version, _, _, message) = failed[0]
                log.warning("model %s version %s failed to load: %s", name, version, message)
        self.manager.start_polling()
        core = Core(self.manager, self.metrics)
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.grpc_threads,
                                                            thread_name_prefix="grpc"), options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), self._grpc)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        grpc_port, rest_port = self._ports
        self.port = self._grpc.add_insecure_port(f"{self.host}:{grpc_port}")
        if self.port == 0:
            raise ConfigError(f"--port {grpc_port}: cannot bind {self.host}:{grpc_port} (in use?)")
        self._grpc.start()
        if rest_port is not None:
            try:
                self._rest = _RestServer((self.host, rest_port), RestHandler)
            except OSError as error:
                self._grpc.stop(0)
                raise ConfigError(f"--rest-port {rest_port}: cannot bind {self.host}:{rest_port} ({error.strerror})") \
                    from None
            enabled, path = self.monitoring
            self._rest.state = _RestState(core, self.max_message_bytes, enabled, path)
            self.rest_port = self._rest.server_address[1]
            self._rest_thread = threading.Thread(target=self._rest.serve_forever, kwargs={"poll_interval": 0.2},
                                                 name="rest", daemon=True)
            self._rest_thread.start()
        for service in ("", *SERVICES):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on gRPC %s:%d%s", ", ".join(self.manager.model_names()), self.host, self.port,
                 f" and REST {self.host}:{self.rest_port}" if self.rest_port else "")
        return self

    def _safe_status(self, name):
        try:
            return self.manager.status(name)
        except ServingError:
            return []

    def stop(self, grace=5.0):
        """Drain: refuse new requests, finish in-flight ones (up to `grace` s), unload."""
        if self._stopped.is_set():
            self._done.wait(grace + 30)  # a second caller waits for the first one's drain
            return
        self._stopped.set()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            self._rest.shutdown()
            self._rest.server_close()
        if done is not None:
            done.wait(grace + 1)
        if self.manager is not None:
            self.manager.close()
        self._done.set()

    def wait(self, timeout=None):
        """Block until `stop()` has drained; True once stopped."""
        return self._done.wait(timeout)

    @property
    def target(self):
        return f"{self.host}:{self.port}"

    def __enter__(self):
        return self.start() if self._grpc is None else self

    def __exit__(self, *exc):
        self.stop(grace=1.0)
        return False
