"""Dynamic batching: merging along dimension 0, padding, limits, and the server path."""

import threading
import time

import grpc
import numpy as np
import pytest

from vislearn.serving.batching import BatchingOptions, BatchQueue
from vislearn.serving.errors import ServingError


def _queue(**options):
    calls = []

    def run(inputs):
        calls.append(len(inputs["x"]))
        time.sleep(0.01)  # long enough for concurrent requests to pile up
        return {"y": inputs["x"] * 2, "n": np.full(len(inputs["x"]), len(inputs["x"]))}

    return BatchQueue(run, BatchingOptions(**options)), calls


def _concurrently(fn, count):
    results, errors = [None] * count, []

    def work(i):
        try:
            results[i] = fn(i)
        except Exception as error:  # collected and asserted by the caller
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results, errors


def test_concurrent_requests_merge_and_split_back():
    queue, calls = _queue(max_batch_size=16, batch_timeout_micros=20000, num_batch_threads=1)
    results, errors = _concurrently(lambda i: queue.submit({"x": np.array([[i, i]], np.float32)}), 16)
    queue.close()
    assert not errors
    for i, result in enumerate(results):  # each caller gets exactly its own rows back
        np.testing.assert_array_equal(result["y"], [[2 * i, 2 * i]])
    assert sum(calls) == 16 and len(calls) < 16 and max(calls) > 1


def test_allowed_batch_sizes_pad_and_limits():
    queue, calls = _queue(max_batch_size=8, batch_timeout_micros=0, num_batch_threads=1, allowed_batch_sizes=[4, 8])
    result = queue.submit({"x": np.ones((3, 2), np.float32)})
    assert calls == [4] and result["y"].shape == (3, 2) and list(result["n"]) == [4, 4, 4]
    with pytest.raises(ServingError) as error:
        queue.submit({"x": np.ones((9, 2), np.float32)})
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 9 is larger than maximum input batch size 8" in error.value.message
    with pytest.raises(ServingError, match="at least one dimension"):
        queue.submit({"x": np.float32(1.0)})
    with pytest.raises(ServingError, match="equal 0th-dimension size"):
        queue.submit({"x": np.ones((2, 1)), "z": np.ones((3, 1))})
    queue.close()


def test_queue_full_is_unavailable():
    gate = threading.Event()

    def run(inputs):
        gate.wait(10)
        return {"y": inputs["x"]}

    queue = BatchQueue(run, BatchingOptions(max_batch_size=2, batch_timeout_micros=0, num_batch_threads=1,
                                            max_enqueued_batches=1))
    first = threading.Thread(target=queue.submit, args=({"x": np.ones((2, 1))},))
    first.start()
    time.sleep(0.2)  # the first batch is running (blocked); the queue holds one more batch
    second = threading.Thread(target=queue.submit, args=({"x": np.ones((2, 1))},))
    second.start()
    time.sleep(0.2)
    with pytest.raises(ServingError) as error:
        queue.submit({"x": np.ones((1, 1))})
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "queue" in error.value.message
    gate.set()
    first.join(10)
    second.join(10)
    queue.close()


def test_a_bad_request_does_not_fail_its_batch_mates():
    def run(inputs):
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"]}

    queue = BatchQueue(run, BatchingOptions(max_batch_size=8, batch_timeout_micros=50000, num_batch_threads=1))
    results, errors = _concurrently(lambda i: queue.submit({"x": np.array([[-1.0 if i == 0 else 1.0]])}), 4)
    queue.close()
    assert len(errors) == 1 and sum(r is not None for r in results) == 3


def test_server_batches_concurrent_grpc_requests(base, image):
    from vislearn.serving.client import Client
    from vislearn.serving.metrics import BATCH_SIZE
    from vislearn.serving.server import Server

    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=30000, num_batch_threads=1)
    with Server(models=[f"classifier={base / 'classifier'}"], port=0, rest_port=None, batching=options,
                poll_seconds=0) as server, Client(server.target) as client:
        reference = client.classify([image], model="classifier")[0]["probabilities"]
        results, errors = _concurrently(lambda i: client.classify([image], model="classifier"), 8)
        assert not errors
        for result in results:
            np.testing.assert_allclose(result[0]["probabilities"], reference, atol=1e-6)
        text = server.metrics.render()
        batches = [line for line in text.splitlines() if line.startswith(BATCH_SIZE + "_count")]
        rows = [line for line in text.splitlines() if line.startswith(BATCH_SIZE + "_sum")]
        assert batches and rows
        assert float(rows[0].split()[-1]) == 9 and int(batches[0].split()[-1]) < 9  # merged


def test_first_call_of_a_signature_runs_alone(base, image, monkeypatch):
    # Concurrent first calls would each make TF instantiate the graph again.
    from vislearn.serving.models import Servable

    servable = Servable("classifier", 1, base / "classifier" / "1")
    events, running, peak, lock = [], [0], [0], threading.Lock()
    real = servable._call_function

    def counted(key, inputs):
        with lock:
            events.append("start")
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)
            return real(key, inputs)
        finally:
            with lock:
                events.append("end")
                running[0] -= 1

    monkeypatch.setattr(servable, "_call_function", counted)
    batch = np.array([image], dtype=object)
    results, errors = _concurrently(lambda i: servable._call("serving_default", {"images": batch}), 4)
    assert not errors and all(r is not None for r in results)
    assert events[:2] == ["start", "end"] and "serving_default" in servable._warm  # the first ran alone
    peak[0] = 0
    results, errors = _concurrently(lambda i: servable._call("serving_default", {"images": batch}), 4)
    assert not errors and peak[0] > 1  # once warm, calls overlap again
    servable.close()
