"""Every malformed request class over gRPC and REST gets TF Serving's status; the server stays up.

Codes are TF Serving's (checked against its source): an unknown signature is
FAILED_PRECONDITION over gRPC Predict and 400 over REST; an unknown version
label is INVALID_ARGUMENT; a message over the size limit is RESOURCE_EXHAUSTED
(REST: 429). An empty batch is refused (INVALID_ARGUMENT) by vislearn serve.
"""

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

C = grpc.StatusCode


def _request(model="classifier", version=None, label=None, signature=None, inputs=None, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if signature is not None:
        request.model_spec.signature_name = signature
    for name, proto in (inputs or {}).items():
        request.inputs[name].CopyFrom(proto)
    request.output_filter.extend(output_filter)
    return request


def _bad_content():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    proto.tensor_shape.dim.add(size=1)
    proto.tensor_shape.dim.add(size=28)
    proto.tensor_content = b"\x00" * 7  # not a whole number of floats, nor 28 of them
    return proto


def grpc_cases(image):
    png = tf.make_tensor_proto([image])
    return {
        "unknown model": (_request(model="nope", inputs={"images": png}), C.NOT_FOUND),
        "unknown version": (_request(version=7, inputs={"images": png}), C.NOT_FOUND),
        "unknown version label": (_request(label="canary", inputs={"images": png}), C.INVALID_ARGUMENT),
        "wrong signature name": (_request(signature="nope", inputs={"images": png}), C.FAILED_PRECONDITION),
        "missing input": (_request(inputs={}), C.INVALID_ARGUMENT),
        "wrong input name": (_request(inputs={"pixels": png}), C.INVALID_ARGUMENT),
        "extra input": (_request(inputs={"images": png, "extra": png}), C.INVALID_ARGUMENT),
        "wrong dtype": (_request(inputs={"images": tf.make_tensor_proto(np.zeros([1], np.float32))}),
                        C.INVALID_ARGUMENT),
        "wrong shape": (_request(inputs={"images": tf.make_tensor_proto([[image]])}), C.INVALID_ARGUMENT),
        "wrong image size for float signature": (
            _request(signature="predict_images", inputs={"images": tf.make_tensor_proto(np.zeros((1, 9, 9, 3),
                                                                                                np.float32))}),
            C.INVALID_ARGUMENT),
        "empty batch": (_request(inputs={"images": tf.make_tensor_proto(np.array([], dtype=object),
                                                                        dtype=tf.string, shape=[0])}),
                        C.INVALID_ARGUMENT),
        "non-image bytes": (_request(inputs={"images": tf.make_tensor_proto([b"not an image"])}), C.INVALID_ARGUMENT),
        "malformed tensor proto": (_request(signature="predict_images", inputs={"images": _bad_content()}),
                                   C.INVALID_ARGUMENT),
        "unknown output filter": (_request(inputs={"images": png}, output_filter=["nope"]), C.INVALID_ARGUMENT),
        "oversize message": (_request(inputs={"images": tf.make_tensor_proto([b"x" * (3 * 1024 * 1024)])}),
                             C.RESOURCE_EXHAUSTED),
    }


def test_grpc_bad_requests(server, image):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        got = {}
        for case, (request, expected) in grpc_cases(image).items():
            with pytest.raises(grpc.RpcError) as error:
                predict.Predict(request, timeout=10)
            got[case] = (error.value.code(), expected)
            assert error.value.details(), case
            assert "\n" not in error.value.details(), case
        metadata = get_model_metadata_pb2.GetModelMetadataRequest()
        metadata.model_spec.name = "classifier"
        for request, expected, case in [
                (metadata, C.INVALID_ARGUMENT, "metadata without metadata_field"),
                (get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "classifier"},
                                                                metadata_field=["nope"]),
                 C.INVALID_ARGUMENT, "unsupported metadata field")]:
            with pytest.raises(grpc.RpcError) as error:
                predict.GetModelMetadata(request, timeout=10)
            got[case] = (error.value.code(), expected)
        for spec, expected, case in [({"name": "nope"}, C.NOT_FOUND, "status of unknown model"),
                                     ({"name": "classifier", "version": {"value": 9}}, C.NOT_FOUND,
                                      "status of unknown version"),
                                     ({"name": "classifier", "version_label": "x"}, C.INVALID_ARGUMENT,
                                      "status of unknown label")]:
            with pytest.raises(grpc.RpcError) as error:
                models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=spec), timeout=10)
            got[case] = (error.value.code(), expected)
        assert {case: pair[0] for case, pair in got.items()} == {case: pair[1] for case, pair in got.items()}
        # Still serving after all of that.
        response = predict.Predict(_request(inputs={"images": tf.make_tensor_proto([image])}), timeout=10)
        assert tf.make_ndarray(response.outputs["probabilities"]).shape == (1, 3)


def _post(url, body, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_rest_bad_requests(server, image):
    root = f"http://127.0.0.1:{server.rest_port}"
    url = f"{root}/v1/models/classifier:predict"
    good = {"b64": base64.b64encode(image).decode()}
    cases = {
        "unknown model": (f"{root}/v1/models/nope:predict", {"instances": [good]}, 404),
        "unknown version": (f"{root}/v1/models/classifier/versions/7:predict", {"instances": [good]}, 404),
        "unknown version label": (f"{root}/v1/models/classifier/labels/canary:predict", {"instances": [good]}, 400),
        "wrong signature name": (url, {"signature_name": "nope", "instances": [good]}, 400),
        "signature_name not a string": (url, {"signature_name": 3, "instances": [good]}, 400),
        "not JSON": (url, b"{instances: nope", 400),
        "empty body": (url, b"", 400),
        "not an object": (url, [good], 400),
        "missing instances and inputs": (url, {"signature_name": "serving_default"}, 400),
        "both instances and inputs": (url, {"instances": [good], "inputs": [good]}, 400),
        "instances not a list": (url, {"instances": good}, 400),
        "empty batch": (url, {"instances": []}, 400),
        "empty columnar batch": (url, {"inputs": []}, 400),
        "wrong dtype": (url, {"instances": [1.5]}, 400),
        "bad base64": (url, {"instances": [{"b64": "***"}]}, 400),
        "non-image bytes": (url, {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}, 400),
        "wrong input name": (url, {"instances": [{"pixels": good}]}, 400),
        "missing named input": (url, {"inputs": {"pixels": [good]}}, 400),
        "ragged float input": (f"{root}/v1/models/classifier:predict",
                               {"signature_name": "predict_images", "inputs": [[[[0.0]]], [[[0.0, 1.0]]]]}, 400),
        "oversize body": (url, b"x" * (3 * 1024 * 1024), 429),
        "classify without examples": (f"{root}/v1/models/multi:classify", {"signature_name": "classify"}, 400),
    }
    got = {}
    for case, (target, body, expected) in cases.items():
        status, reply = _post(target, body)
        got[case] = status
        assert set(reply) == {"error"} and reply["error"], case
    assert got == {case: expected for case, (_, _, expected) in cases.items()}
    for path, expected in [("/v1/models", 400), ("/v1/models/nope", 404), ("/v1/models/classifier/versions/5", 404),
                           ("/v1/models/classifier/labels/x", 400), ("/elsewhere", 404)]:
        try:
            urllib.request.urlopen(root + path, timeout=10)
            status = 200
        except urllib.error.HTTPError as error:
            status = error.code
        assert status == expected, path
    assert _post(url, {"instances": [good]}, method="PUT")[0] == 400
    status, reply = _post(url, {"instances": [good]})
    assert status == 200 and len(reply["predictions"]) == 1
