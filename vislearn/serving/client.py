"""A client for TF Serving (and `vislearn serve`) on the official gRPC stubs.

```python
from vislearn.serving import Client

client = Client("localhost:8500")
client.classify(["cat.jpg"], model="digits")      # [{"label": ..., "class": ..., "score": ..., ...}]
client.detect([pil_image], model="detector")      # [[{"box": [ymin, xmin, ymax, xmax], "score": ..., "class": ...}]]
client.embed_images([array], model="embedder")   # np.ndarray [n, d]
client.lookup("a dog on a beach", k=5, model="embedder")
client.status("digits"); client.metadata("digits")
```

Images may be file paths, encoded bytes, PIL images or numpy arrays (HWC,
uint8 or float in [0, 1]); they are sent as encoded PNG/JPEG bytes, the input
every vislearn export's `serving_default` takes. Only the official
`tensorflow-serving-api` messages are used, so the same client works against
the real `tensorflow_model_server`.
"""

import io
from pathlib import Path

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

DEFAULT_MODELS = {"detect": "detector", "classify": "classifier", "embed": "embedder"}
STATE_NAMES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}


def encode_image(image):
    """A path, bytes, PIL image or numpy array -> encoded image bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(2, "image file not found", str(path))
        return path.read_bytes()
    from PIL import Image

    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else 1.0
            array = np.clip(np.nan_to_num(array.astype(np.float32)) * scale, 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise ValueError(f"image array: expected [H, W] or [H, W, C], received shape {image.shape}")
        image = Image.fromarray(array)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"image: expected a path, bytes, PIL image or numpy array, received {type(image).__name__}")


def _strings(values):
    values = list(values)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


class Client:
    """gRPC client of a TF Serving-compatible server.

    Args:
        target: "host:port" of the gRPC endpoint.
        timeout: seconds per call.
        models: default model name per kind, overriding
            {"detect": "detector", "classify": "classifier", "embed": "embedder"}.
        max_message_bytes: largest message sent or received.
    """

    def __init__(self, target, timeout=30.0, models=None, max_message_bytes=64 * 1024 * 1024):
        self.target = target
        self.timeout = timeout
        self.models = {**DEFAULT_MODELS, **(models or {})}
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signatures = {}

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- generic calls --
    @staticmethod
    def _spec(spec, name, version=None, label=None, signature=None):
        spec.name = name
        if version is not None:
            spec.version.value = int(version)
        if label is not None:
            spec.version_label = label
        if signature:
            spec.signature_name = signature

    def predict(self, model, inputs, signature=None, version=None, label=None, output_filter=None):
        """Predict: `{input: array}` -> `{output: np.ndarray}`."""
        import tensorflow as tf

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model, version, label, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter or [])
        response = self._predict.Predict(request, timeout=self.timeout)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def status(self, model, version=None, label=None):
        """[{"version", "state", "error_code", "error_message"}] newest first."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version, label)
        response = self._models.GetModelStatus(request, timeout=self.timeout)
        return [{"version": s.version, "state": STATE_NAMES.get(s.state, str(s.state)),
                 "error_code": s.status.error_code, "error_message": s.status.error_message}
                for s in response.model_version_status]

    def metadata(self, model, version=None, label=None):
        """{signature: {"method_name", "inputs": {name: (dtype, shape)}, "outputs": {...}}}."""
        import tensorflow as tf

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, model, version, label)
        request.metadata_field.append("signature_def")
        response = self._predict.GetModelMetadata(request, timeout=self.timeout)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def describe(infos):
            return {name: (tf.dtypes.as_dtype(info.dtype).name if info.dtype else "invalid",
                           None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim])
                    for name, info in infos.items()}

        return {key: {"method_name": sig.method_name, "inputs": describe(sig.inputs), "outputs": describe(sig.outputs)}
                for key, sig in signature_map.signature_def.items()}

    def _input_names(self, model, signature):
        key = (model, signature)
        if key not in self._signatures:
            signatures = self.metadata(model)
            if signature not in signatures:
                raise ValueError(f"model {model!r} has no signature {signature!r}; it has {sorted(signatures)}")
            self._signatures[key] = sorted(signatures[signature]["inputs"])
        return self._signatures[key]

    def _image_call(self, kind, images, model, signature, **options):
        model = model or self.models[kind]
        if isinstance(images, (str, Path, bytes, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        encoded = _strings(encode_image(image) for image in images)
        names = self._input_names(model, signature)
        if len(names) != 1:
            raise ValueError(f"model {model!r} signature {signature!r} takes {names}; expected one image input")
        return self.predict(model, {names[0]: encoded}, signature=signature, **options)

    # -- task helpers --
    def classify(self, images, model=None, signature="serving_default", **options):
        """Classify images -> one dict per image: label, class, score, probabilities."""
        outputs = self._image_call("classify", images, model, signature, **options)
        probabilities = outputs.get("probabilities", outputs.get("scores"))
        count = len(next(iter(outputs.values())))
        results = []
        for i in range(count):
            item = {}
            if probabilities is not None:
                item["probabilities"] = probabilities[i]
                item["score"] = float(np.max(probabilities[i]))
            if "classes" in outputs:
                item["class"] = int(outputs["classes"][i])
            elif probabilities is not None:
                item["class"] = int(np.argmax(probabilities[i]))
            if "labels" in outputs:
                label = outputs["labels"][i]
                item["label"] = label.decode() if isinstance(label, bytes) else str(label)
            results.append(item)
        return results

    def detect(self, images, model=None, signature="serving_default", score_threshold=0.0, **options):
        """Detect -> per image a list of {"box": [ymin, xmin, ymax, xmax], "score", "class"[, "label"]}.

        Reads TF Serving's detection outputs (`detection_boxes`,
        `detection_scores`, `detection_classes`, `num_detections`); padded
        rows beyond `num_detections` are dropped.
        """
        outputs = self._image_call("detect", images, model, signature, **options)
        boxes, scores = outputs["detection_boxes"], outputs["detection_scores"]
        classes = outputs["detection_classes"]
        counts = outputs.get("num_detections", np.full(len(boxes), boxes.shape[1]))
        labels = outputs.get("detection_labels")
        results = []
        for i in range(len(boxes)):
            found = []
            for j in range(int(np.asarray(counts[i]).reshape(-1)[0])):
                if float(scores[i, j]) < score_threshold:
                    continue
                item = {"box": [float(v) for v in boxes[i, j]], "score": float(scores[i, j]),
                        "class": int(classes[i, j])}
                if labels is not None:
                    value = labels[i, j]
                    item["label"] = value.decode() if isinstance(value, bytes) else str(value)
                found.append(item)
            results.append(found)
        return results

    def _single_output(self, outputs, preferred):
        for name in preferred:
            if name in outputs:
                return outputs[name]
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        raise ValueError(f"cannot tell the embedding among outputs {sorted(outputs)}")

    def embed_images(self, images, model=None, signature="embed_image", **options):
        """Images -> embeddings, np.ndarray [n, d] (signature `embed_image`)."""
        outputs = self._image_call("embed", images, model, signature, **options)
        return self._single_output(outputs, ("embeddings", "embedding"))

    def embed_texts(self, texts, model=None, signature="embed_text", **options):
        """Texts -> embeddings, np.ndarray [n, d] (signature `embed_text`)."""
        model = model or self.models["embed"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        names = self._input_names(model, signature)
        outputs = self.predict(model, {names[0]: _strings(t.encode() for t in texts)}, signature=signature, **options)
        return self._single_output(outputs, ("embeddings", "embedding"))

    def lookup(self, query, k=5, model=None, **options):
        """Nearest neighbours of a text (`lookup_text`) or an image (`lookup_image`).

        Returns:
            A list of up to `k` dicts, one per neighbour, with one key per
            signature output (e.g. "index", "score", "text"), best first.
        """
        model = model or self.models["embed"]
        is_text = isinstance(query, str) and not Path(query).is_file()
        signature = "lookup_text" if is_text else "lookup_image"
        names = self._input_names(model, signature)
        k_names = [n for n in names if n == "k"]
        data_names = [n for n in names if n != "k"]
        if len(data_names) != 1:
            raise ValueError(f"model {model!r} signature {signature!r} takes {names}; expected one query input and k")
        value = query.encode() if is_text else encode_image(query)
        inputs = {data_names[0]: _strings([value])}
        if k_names:
            specs = self.metadata(model)[signature]["inputs"]["k"]
            inputs["k"] = np.array(int(k) if not specs[1] else [int(k)], dtype=np.dtype(specs[0]))
        outputs = self.predict(model, inputs, signature=signature, **options)
        rows = {}
        for name, value in outputs.items():
            array = np.asarray(value)
            if array.ndim >= 1 and array.shape[0] == 1 and array.ndim >= 2:
                array = array[0]  # one query: drop its batch dimension
            rows[name] = array
        count = min(len(v) for v in rows.values() if v.ndim >= 1) if rows else 0
        count = min(count, int(k))
        results = []
        for i in range(count):
            item = {}
            for name, array in rows.items():
                value = array[i] if array.ndim >= 1 else array
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                elif isinstance(value, np.generic):
                    value = value.item()
                item[name] = value
            results.append(item)
        return results
