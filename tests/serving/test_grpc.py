"""The official tensorflow-serving-api stubs against the embedded server."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from vislearn.serving.client import Client


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.target)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel), health_pb2_grpc.HealthStub(channel))
    channel.close()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, models={"classify": "classifier", "detect": "multi", "embed": "multi"}) as c:
        yield c


def test_predict_classifier(stubs, image):
    predict, _, _ = stubs
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "classifier"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([image, image]))
    response = predict.Predict(request, timeout=10)
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    assert tf.make_ndarray(response.outputs["labels"])[0].decode() in ("zero", "one", "two")


def test_predict_named_signature_and_output_filter(stubs):
    predict, _, _ = stubs
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "classifier"
    request.model_spec.signature_name = "predict_images"
    request.model_spec.version.value = 1
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 28, 28, 3), np.float32)))
    request.output_filter.append("classes")
    response = predict.Predict(request, timeout=10)
    assert list(response.outputs) == ["classes"]


def test_metadata_and_status(stubs):
    predict, models, _ = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "multi"
    response = predict.GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "embed_image", "embed_text", "lookup_text", "lookup_image", "classify"} <= set(
        signatures.signature_def)
    assert signatures.signature_def["classify"].method_name == "tensorflow/serving/classify"
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "classifier"}))
    assert [(s.version, s.state, s.status.error_code) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)]


def test_health(stubs):
    _, _, health = stubs
    for service in ("", "tensorflow.serving.PredictionService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_classify_api(stubs):
    predict, _, _ = stubs
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "multi"
    request.model_spec.signature_name = "classify"
    for values in ([0.0, 2.0], [3.0, 0.0]):
        example = request.input.example_list.examples.add()
        example.features.feature["x"].float_list.value.extend(values)
    response = predict.Classify(request, timeout=10)
    best = [max(c.classes, key=lambda item: item.score).label for c in response.result.classifications]
    assert best == ["pos", "neg"]
    # A predict-method signature cannot serve Classify (TF Serving: INVALID_ARGUMENT).
    request.model_spec.signature_name = ""
    with pytest.raises(grpc.RpcError) as error:
        predict.Classify(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_regress_is_unimplemented(stubs):
    predict, _, _ = stubs
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "classifier"
    with pytest.raises(grpc.RpcError) as error:
        predict.Regress(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_classify_accepts_every_image_kind(client, image, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    path.write_bytes(image)
    kinds = [str(path), path, image, Image.open(path), np.asarray(Image.open(path)),
             np.asarray(Image.open(path)).astype(np.float32) / 255.0]
    results = client.classify(kinds)
    assert len(results) == len(kinds)
    first = results[0]
    assert set(first) == {"probabilities", "score", "class", "label"}
    for result in results[1:]:  # the same pixels whatever the container
        np.testing.assert_allclose(result["probabilities"], first["probabilities"], atol=1e-5)


def test_client_detect(client, make_png):
    dark, bright = make_png((10, 10, 10)), make_png((250, 250, 250))
    results = client.detect([dark, bright], score_threshold=0.0)
    assert [len(found) for found in results] == [2, 2]  # padded third row dropped (num_detections)
    assert results[0][0] == {"box": pytest.approx([0.1, 0.1, 0.5, 0.5]), "score": pytest.approx(0.9), "class": 1}
    assert results[1][1]["score"] > results[0][1]["score"]
    assert [len(found) for found in client.detect([dark], score_threshold=0.5)] == [1]


def test_client_embed_and_lookup(client, make_png):
    images = client.embed_images([make_png((255, 0, 0)), make_png((0, 0, 255))])
    texts = client.embed_texts(["a cat", "a much longer caption"])
    assert images.shape == (2, 4) and texts.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(images, axis=-1), 1.0, rtol=1e-5)
    found = client.lookup("a black cat", k=3)
    assert len(found) == 3 and set(found[0]) == {"indices", "scores", "captions"}
    assert found[0]["scores"] >= found[1]["scores"] >= found[2]["scores"]
    assert isinstance(found[0]["captions"], str)
    assert len(client.lookup(make_png((0, 255, 0)), k=2)) == 2


def test_client_status_and_metadata(client):
    assert client.status("classifier") == [{"version": 1, "state": "AVAILABLE", "error_code": 0,
                                            "error_message": ""}]
    metadata = client.metadata("classifier")
    assert metadata["serving_default"]["inputs"] == {"images": ("string", [-1])}
    assert metadata["serving_default"]["outputs"]["probabilities"] == ("float32", [-1, 3])
