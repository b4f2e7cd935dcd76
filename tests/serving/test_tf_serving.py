"""The same compatibility checks against a real `tensorflow_model_server`, when one is on PATH."""

import shutil
import socket
import subprocess
import time

import grpc
import pytest

from vislearn.serving.client import Client

BINARY = shutil.which("tensorflow_model_server")
pytestmark = pytest.mark.skipif(
    BINARY is None, reason="tensorflow_model_server is not on PATH (TF Serving ships only as a Docker image "
                           "and through Google's apt repository); the embedded-server tests cover the same API")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def real_server(base, tmp_path_factory):
    from vislearn.serving.config import build_model_config, write_model_config

    config = write_model_config(build_model_config(base), tmp_path_factory.mktemp("tfs") / "models.config")
    port, rest = _free_port(), _free_port()
    process = subprocess.Popen([BINARY, f"--port={port}", f"--rest_api_port={rest}", f"--model_config_file={config}",
                                "--file_system_poll_wait_seconds=1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, timeout=5) as client:
            for _ in range(120):
                try:
                    if client.status("classifier")[0]["state"] == "AVAILABLE":
                        break
                except grpc.RpcError:
                    time.sleep(0.5)
        yield target
    finally:
        process.terminate()
        process.wait(30)


def test_client_against_real_tf_serving(real_server, image, make_png):
    with Client(real_server, models={"classify": "classifier", "detect": "multi", "embed": "multi"}) as client:
        assert client.classify([image])[0]["label"] in ("zero", "one", "two")
        assert [len(found) for found in client.detect([make_png()])] == [2]
        assert client.embed_texts(["a cat"]).shape == (1, 4)
        assert len(client.lookup("a cat", k=2)) == 2
        assert client.status("classifier")[0]["state"] == "AVAILABLE"
        assert "serving_default" in client.metadata("classifier")


def test_error_codes_match_real_tf_serving(real_server, image):
    with Client(real_server) as client:
        for kwargs, code in [({"model": "nope"}, grpc.StatusCode.NOT_FOUND),
                             ({"model": "classifier", "version": 7}, grpc.StatusCode.NOT_FOUND),
                             ({"model": "classifier", "label": "canary"}, grpc.StatusCode.INVALID_ARGUMENT),
                             ({"model": "classifier", "signature": "nope"}, grpc.StatusCode.FAILED_PRECONDITION)]:
            with pytest.raises(grpc.RpcError) as error:
                client.predict(inputs={"images": [image]}, **kwargs)
            assert error.value.code() == code, kwargs
        with pytest.raises(grpc.RpcError) as error:
            client.predict("classifier", {"images": [b"not an image"]})
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
