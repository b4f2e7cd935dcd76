"""TF Serving's REST API on the embedded server, with a plain HTTP client."""

import base64
import json
import urllib.request

import numpy as np
import pytest


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read().decode()


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def root(server):
    return f"http://127.0.0.1:{server.rest_port}"


def test_status_and_metadata(root):
    status, text = _get(f"{root}/v1/models/classifier")
    assert status == 200
    assert json.loads(text) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert json.loads(_get(f"{root}/v1/models/classifier/versions/1")[1])["model_version_status"][0]["version"] == "1"
    metadata = json.loads(_get(f"{root}/v1/models/classifier/metadata")[1])
    assert metadata["model_spec"]["name"] == "classifier" and metadata["model_spec"]["version"] == "1"
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["images"]["dtype"] == "DT_STRING"
    assert signature["method_name"] == "tensorflow/serving/predict"


def test_predict_row_and_columnar(root, image):
    b64 = {"b64": base64.b64encode(image).decode()}
    rows = _post(f"{root}/v1/models/classifier:predict", {"instances": [b64, b64]})
    assert len(rows["predictions"]) == 2
    assert set(rows["predictions"][0]) == {"probabilities", "classes", "labels"}
    assert rows["predictions"][0]["labels"] in ("zero", "one", "two")
    columns = _post(f"{root}/v1/models/classifier/versions/1:predict", {"inputs": [b64]})
    assert np.asarray(columns["outputs"]["probabilities"]).shape == (1, 3)
    np.testing.assert_allclose(columns["outputs"]["probabilities"][0], rows["predictions"][0]["probabilities"])


def test_predict_float_signature_and_single_output(root):
    pixels = np.full((1, 28, 28, 3), 0.5).tolist()
    reply = _post(f"{root}/v1/models/classifier:predict", {"signature_name": "predict_images", "instances": pixels})
    assert len(reply["predictions"]) == 1
    # Floats come back in float32's shortest form, as TF Serving writes them.
    assert all(len(repr(v)) < 12 for v in reply["predictions"][0]["probabilities"])


def test_named_instances_multi_input_signature(root):
    reply = _post(f"{root}/v1/models/multi:predict",
                  {"signature_name": "lookup_text", "inputs": {"text": ["a black cat"], "k": 2}})
    assert np.asarray(reply["outputs"]["indices"]).shape == (1, 2)
    assert isinstance(reply["outputs"]["captions"][0][0], str)


def test_classify_rest(root):
    reply = _post(f"{root}/v1/models/multi:classify",
                  {"signature_name": "classify", "examples": [{"x": [0.0, 2.0]}, {"x": [3.0, 0.0]}]})
    best = [max(item, key=lambda pair: pair[1])[0] for item in reply["results"]]
    assert best == ["pos", "neg"]


def test_prometheus_metrics(root, image):
    b64 = {"b64": base64.b64encode(image).decode()}
    _post(f"{root}/v1/models/classifier:predict", {"instances": [b64]})
    status, text = _get(f"{root}/monitoring/prometheus/metrics")
    assert status == 200
    assert ':tensorflow:serving:request_count{API="predict",entrypoint="REST",model_name="classifier",status="OK"}' \
        in text
    assert ":tensorflow:serving:request_latency_bucket{" in text
