"""Versions come and go under load; policies, labels, config reload; SIGTERM drains."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import tensorflow as tf
from click.testing import CliRunner
from tensorflow_serving.apis import model_management_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from vislearn.serving.client import Client
from vislearn.serving.config import parse_model_config
from vislearn.serving.server import Server


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _states(client, model):
    return {item["version"]: item["state"] for item in client.status(model)}


def test_hot_reload_under_load_fails_no_request(tmp_path, model_store, publisher, image):
    from vislearn.serving.batching import BatchingOptions

    publisher(model_store["classifier"], tmp_path / "classifier" / "1")
    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=2000, num_batch_threads=1)
    with Server(models=[f"classifier={tmp_path / 'classifier'}"], port=0, rest_port=None, batching=options,
                poll_seconds=0.2) as server, Client(server.target) as client:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "classifier"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto([image]))
        stop, failures, versions = threading.Event(), [], []

        def load():
            with grpc.insecure_channel(server.target) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                for _ in range(2000):  # bounded
                    if stop.is_set():
                        return
                    try:
                        versions.append(stub.Predict(request, timeout=10).model_spec.version.value)
                    except grpc.RpcError as error:
                        failures.append(error.code())

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        assert _wait_for(lambda: len(versions) > 20)
        publisher(model_store["classifier_2"], tmp_path / "classifier" / "2")
        assert _wait_for(lambda: _states(client, "classifier") == {2: "AVAILABLE", 1: "END"})
        count = len(versions)
        assert _wait_for(lambda: len(versions) > count + 20)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert failures == []
        assert versions[0] == 1 and versions[-1] == 2
        assert client.status("classifier", version=2)[0]["state"] == "AVAILABLE"


def test_policies_labels_and_reload_config(tmp_path, model_store, publisher, image):
    publisher(model_store["classifier"], tmp_path / "classifier" / "1")
    publisher(model_store["classifier_2"], tmp_path / "classifier" / "2")
    text = f'''model_config_list {{ config {{
        name: "classifier" base_path: "{tmp_path / 'classifier'}" model_platform: "tensorflow"
        model_version_policy {{ all {{ }} }}
        version_labels {{ key: "stable" value: 1 }} version_labels {{ key: "canary" value: 2 }} }} }}'''
    config_file = tmp_path / "models.config"
    config_file.write_text(text)
    with Server(config_file, port=0, rest_port=None, poll_seconds=0) as server, Client(server.target) as client:
        assert _states(client, "classifier") == {1: "AVAILABLE", 2: "AVAILABLE"}
        served = {}
        for label in ("stable", "canary"):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "classifier"
            request.model_spec.version_label = label
            request.inputs["images"].CopyFrom(tf.make_tensor_proto([image]))
            with grpc.insecure_channel(server.target) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                served[label] = stub.Predict(request, timeout=10).model_spec.version.value
        assert served == {"stable": 1, "canary": 2}
        assert client.status("classifier", label="canary")[0]["version"] == 2
        assert client.classify([image], model="classifier", version=1)

        # Reload: only version 1 (specific policy), plus a second model.
        new = parse_model_config(text.replace("all { }", "specific { versions: 1 }").replace(
            'version_labels { key: "canary" value: 2 }', ""))
        new.model_config_list.config.add(name="multi", base_path=str(model_store["multi"].parent),
                                         model_platform="tensorflow")
        with grpc.insecure_channel(server.target) as channel:
            from tensorflow_serving.apis import model_service_pb2_grpc

            models = model_service_pb2_grpc.ModelServiceStub(channel)
            reply = models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=new), timeout=60)
            assert reply.status.error_code == 0
            assert _wait_for(lambda: _states(client, "classifier") == {2: "END", 1: "AVAILABLE"})
            assert _states(client, "multi") == {1: "AVAILABLE"}
            bad = model_server_config_pb2.ModelServerConfig()
            bad.model_config_list.config.add(name="x")
            with pytest.raises(grpc.RpcError) as error:
                models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=bad), timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "base_path" in error.value.details()


def test_unavailable_while_loading(model_store, image):
    server = Server(models=[f"multi={model_store['multi'].parent}"], port=0, rest_port=None, poll_seconds=0)
    server.start(wait_for_load=False)
    try:
        with Client(server.target) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.predict("multi", {"images": [image]})
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _wait_for(lambda: _states(client, "multi") == {1: "AVAILABLE"})
            assert client.predict("multi", {"images": [image]})["num_detections"].tolist() == [2.0]
    finally:
        server.stop(1)


def _free_start(args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "vislearn.cli", "serve", *args, "--port", "0",
                                "--rest-port", "0", "--intra-op-threads", "1", "--inter-op-threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return process, json.loads(line)


@pytest.mark.slow
def test_cli_serve_query_and_sigterm_drain(base, image, tmp_path):
    process, ports = _free_start(["--model", f"classifier={base / 'classifier'}", "--model",
                                  f"multi={base / 'multi'}", "--enable-batching"])
    try:
        target = ports["grpc"]
        picture = tmp_path / "red.png"
        picture.write_bytes(image)
        runner = CliRunner()
        from vislearn.cli import main

        result = runner.invoke(main, ["query", "classify", str(picture), "--server", target])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.splitlines()[0])["label"] in ("zero", "one", "two")
        result = runner.invoke(main, ["query", "detect", str(picture), "--server", target, "--model", "multi",
                                      "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "out" / "red_detections.png").is_file()
        result = runner.invoke(main, ["query", "embed", "a cat", "--text", "--server", target, "--model", "multi"])
        assert result.exit_code == 0 and len(json.loads(result.output)["embedding"]) == 4
        result = runner.invoke(main, ["query", "lookup", "a cat", "-k", "2", "--server", target, "--model", "multi"])
        assert result.exit_code == 0 and len(result.output.splitlines()) == 2
        result = runner.invoke(main, ["query", "classify", str(picture), "--server", target, "--model", "nope"])
        assert result.exit_code == 2 and result.output.startswith("error: NOT_FOUND")

        # SIGTERM with requests in flight: they finish, the process exits 0.
        failures, done = [], []

        def load():
            with Client(target) as client:
                for _ in range(30):
                    try:
                        client.classify([image], model="classifier")
                        done.append(1)
                    except grpc.RpcError as error:
                        failures.append(error.code())
                        return

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        assert _wait_for(lambda: len(done) > 8)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        for thread in threads:
            thread.join(30)
        # After the drain starts, new calls are refused by gRPC (UNAVAILABLE, or CANCELLED
        # for a call that raced the listener closing); nothing fails before SIGTERM.
        assert set(failures) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert len(done) > 8
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
