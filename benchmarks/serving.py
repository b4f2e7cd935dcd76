"""Serving benchmark: gRPC overhead, dynamic batching throughput, soak.

Prints measured figures for the three claims of the serving issue:

1. gRPC Predict overhead over an in-process call of the same SavedModel
   signature (p50, batch 1); target <= 3 ms.
2. Throughput with dynamic batching on vs off at N concurrent clients
   (default 32); target >= 2x.
3. Soak: N concurrent clients for --soak-seconds (default 60): failed
   requests (target 0), p50/p99 latency, server RSS growth (target < 10%).

The server is `vislearn serve` in its own process on 127.0.0.1 (as it would
run), the load comes from an asyncio gRPC client with N requests in flight,
and every request is one encoded PNG through `serving_default`, the path real
clients take. Without --model a tiny classifier export is made in a temp dir;
point --model NAME=PATH at any export base (e.g. a detector) to measure it.

    python benchmarks/serving.py                       # full run (~2.5 min)
    python benchmarks/serving.py --model det=exports/detector --soak-seconds 60
    python benchmarks/serving.py --seconds 2 --soak-seconds 5 --json   # quick
"""

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_image(size=(28, 28), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_classifier(base):
    """A small CNN classifier export at BASE/classifier/1 (the default model)."""
    import keras

    from vislearn.export import export_classifier

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])
    export_classifier(model, Path(base) / "classifier" / "1", (28, 28, 3), [str(i) for i in range(10)])
    return "classifier", Path(base) / "classifier"


def latest_version(path):
    versions = sorted(int(p.name) for p in Path(path).iterdir() if p.name.isdigit())
    return Path(path) / str(versions[-1])


def in_process_p50(path, image, calls, threads):
    """p50 of calling serving_default in this process (the reference for the overhead)."""
    import tensorflow as tf

    function = tf.saved_model.load(str(latest_version(path))).signatures["serving_default"]
    name = next(iter(function.structured_input_signature[1]))
    batch = tf.constant([image])
    for _ in range(20):
        function(**{name: batch})
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        {k: v.numpy() for k, v in function(**{name: batch}).items()}
        times.append(time.perf_counter() - start)
    return float(np.median(times)), name


class ServerProcess:
    """`vislearn serve` in a child process; ports read from its first stdout line."""

    def __init__(self, name, path, threads, batching_file=None):
        command = [sys.executable, "-m", "vislearn.cli", "serve", "--model", f"{name}={path}", "--port", "0",
                   "--rest-port", "0", "--poll-seconds", "0", "--intra-op-threads", str(threads),
                   "--inter-op-threads", str(threads)]
        if batching_file:
            command += ["--batching-parameters", str(batching_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start: {' '.join(command)}")
        self.target = json.loads(line)["grpc"]

    def rss_bytes(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _load(target, request, clients, seconds, latencies, failures, max_requests=None):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        deadline = time.perf_counter() + seconds

        async def client():
            count = 0
            while time.perf_counter() < deadline and (max_requests is None or count < max_requests):
                start = time.perf_counter()
                try:
                    await stub.Predict(request, timeout=30)
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError as error:
                    failures.append(error.code().name)
                count += 1

        await asyncio.gather(*(client() for _ in range(clients)))


def run_load(target, request, clients, seconds):
    latencies, failures = [], []
    start = time.perf_counter()
    asyncio.run(_load(target, request, clients, seconds, latencies, failures))
    elapsed = time.perf_counter() - start
    return latencies, failures, elapsed


def sequential_p50(target, request, calls):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(20):
            stub.Predict(request, timeout=30)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            stub.Predict(request, timeout=30)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="NAME=PATH", help="export base to serve (default: a tiny classifier)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each throughput window (default 15)")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="soak duration (default 60)")
    parser.add_argument("--calls", type=int, default=300, help="sequential calls for the overhead p50")
    parser.add_argument("--threads", type=int, default=1,
                        help="TF intra/inter-op threads, both sides (default 1; 0: TF's default)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-micros", type=int, default=5000)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)

    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    # Same TF thread pools here (the in-process reference) as in the server.
    if args.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        except RuntimeError:  # TF already running in this process (e.g. under pytest)
            pass
    workdir = tempfile.TemporaryDirectory(prefix="vislearn-bench-")
    if args.model:
        name, _, path = args.model.partition("=")
        path = Path(path)
    else:
        name, path = make_classifier(workdir.name)
    image = make_image()
    reference_p50, input_name = in_process_p50(path, image, args.calls, args.threads)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto([image]))

    batching_file = Path(workdir.name) / "batching_parameters.txt"
    batching_file.write_text(f"max_batch_size {{ value: {args.max_batch_size} }}\n"
                             f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                             f"num_batch_threads {{ value: 2 }}\nmax_enqueued_batches {{ value: 1000 }}\n")
    results = {"model": name, "path": str(path), "clients": args.clients, "threads": args.threads}

    server = ServerProcess(name, path, args.threads)
    try:
        grpc_p50 = sequential_p50(server.target, request, args.calls)
        results.update(in_process_p50_ms=reference_p50 * 1e3, grpc_p50_ms=grpc_p50 * 1e3,
                       grpc_overhead_p50_ms=(grpc_p50 - reference_p50) * 1e3)
        latencies, failures, elapsed = run_load(server.target, request, args.clients, args.seconds)
        results.update(batching_off_rps=len(latencies) / elapsed, batching_off_failures=len(failures))
    finally:
        server.stop()

    server = ServerProcess(name, path, args.threads, batching_file)
    try:
        run_load(server.target, request, args.clients, 2.0)  # warm up every batch size's trace
        latencies, failures, elapsed = run_load(server.target, request, args.clients, args.seconds)
        results.update(batching_on_rps=len(latencies) / elapsed, batching_on_failures=len(failures))
        results["batching_speedup"] = results["batching_on_rps"] / max(results["batching_off_rps"], 1e-9)

        rss_start = server.rss_bytes()
        latencies, failures, elapsed = run_load(server.target, request, args.clients, args.soak_seconds)
        rss_end = server.rss_bytes()
        results.update(soak_seconds=elapsed, soak_requests=len(latencies) + len(failures),
                       soak_failed=len(failures), soak_rps=len(latencies) / elapsed,
                       soak_p50_ms=float(np.percentile(latencies, 50)) * 1e3 if latencies else None,
                       soak_p99_ms=float(np.percentile(latencies, 99)) * 1e3 if latencies else None,
                       rss_start_mb=rss_start / 2**20, rss_end_mb=rss_end / 2**20,
                       rss_growth_pct=100.0 * (rss_end - rss_start) / max(rss_start, 1))
    finally:
        server.stop()
        workdir.cleanup()

    if args.json:
        print(json.dumps(results))
        return results
    ok = {True: "ok", False: "MISSED"}
    print(f"model {name} ({path}), {args.clients} concurrent clients, TF threads {args.threads}")
    print(f"in-process serving_default p50     {results['in_process_p50_ms']:7.2f} ms")
    print(f"gRPC Predict p50 (batch 1)          {results['grpc_p50_ms']:7.2f} ms")
    print(f"gRPC overhead p50                   {results['grpc_overhead_p50_ms']:7.2f} ms   "
          f"(target <= 3 ms: {ok[results['grpc_overhead_p50_ms'] <= 3]})")
    print(f"throughput, batching off            {results['batching_off_rps']:7.1f} req/s")
    print(f"throughput, batching on             {results['batching_on_rps']:7.1f} req/s")
    print(f"batching speedup                    {results['batching_speedup']:7.2f} x    "
          f"(target >= 2x: {ok[results['batching_speedup'] >= 2]})")
    print(f"soak {results['soak_seconds']:.0f} s: {results['soak_requests']} requests, "
          f"{results['soak_failed']} failed (target 0: {ok[results['soak_failed'] == 0]}), "
          f"p50 {results['soak_p50_ms']:.1f} ms, p99 {results['soak_p99_ms']:.1f} ms")
    print(f"server RSS {results['rss_start_mb']:.0f} MB -> {results['rss_end_mb']:.0f} MB "
          f"({results['rss_growth_pct']:+.1f}%, target < 10%: {ok[results['rss_growth_pct'] < 10]})")
    return results


if __name__ == "__main__":
    main()
