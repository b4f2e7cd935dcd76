"""Serving benchmark: gRPC overhead, dynamic batching throughput, soak.

Prints measured figures for the three claims of the serving issue:

1. gRPC Predict overhead over an in-process call of the same SavedModel
   signature (p50, batch 1); target <= 3 ms.
2. Throughput with dynamic batching on vs off at N concurrent clients
   (default 32); target >= 2x. Both servers run with the same TF thread
   pools (intra-op 1, inter-op = CPU count; batching with num_batch_threads =
   CPU count, TF Serving's default). Next to requests per second it prints
   the CPU time per request (server process + load client): on cores shared
   with other work the wall-clock ratio drifts, the CPU ratio does not, and
   on dedicated cores it is the throughput ratio. It also prints what the
   graph itself gains from batching in this process (ms per image at batch
   1, 8 and max_batch_size): no batcher can beat that ratio.
3. Soak: N concurrent clients for --soak-seconds (default 60): failed
   requests (target 0), p50/p99 latency, server RSS growth (target < 10%).

The server is `vislearn serve` in its own process on 127.0.0.1 (as it would
run), the load comes from an asyncio gRPC client with N requests in flight,
and every request is one encoded image through `serving_default`, the path
real clients take.

By default the model is the detection model: an (untrained) anchor-free YOLO
at the bundled `yolo_af_shapes` recipe's size (160x160 input, in-graph decode,
resize and NMS), exported in a temp dir, queried with a 224x224 shapes-on-photos
JPEG; throughput does not depend on the weights. `--kind classifier` measures
a tiny CNN classifier instead (28x28 PNG); `--model NAME=PATH` any export base.

    python benchmarks/serving.py                       # detector, full run (~3 min)
    python benchmarks/serving.py --kind classifier     # the tiny classifier
    python benchmarks/serving.py --model det=exports/yolo_af_shapes --soak-seconds 60
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


def make_photo(size=224, seed=0):
    """One shapes-on-photos JPEG, the kind of image the detector serves in the demo."""
    from PIL import Image

    from vislearn.data.make import photo_collection
    from vislearn.data.shapes import make_shapes_image

    pixels, _ = make_shapes_image(photo_collection(), size, np.random.default_rng(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_detector(base):
    """An untrained anchor-free YOLO at the `yolo_af_shapes` recipe's size, exported at BASE/detector/1."""
    import keras

    from vislearn.data.shapes import SHAPE_CLASSES
    from vislearn.export import export_detector
    from vislearn.models.yolo_anchor_free import YoloAnchorFree
    from vislearn.recipes import load_recipe

    recipe, _ = load_recipe("yolo_af_shapes")
    shape = (*recipe["data"]["image_size"], 3)
    keras.utils.set_random_seed(0)
    model = YoloAnchorFree(num_classes=len(SHAPE_CLASSES), image_shape=shape,
                           **{k: v for k, v in recipe["model"].items() if k != "name"})
    model.build((None, *shape))
    export_detector(model, Path(base) / "detector" / "1", shape, SHAPE_CLASSES,
                    **{k: v for k, v in recipe["export"].items() if k != "name"})
    return "detector", Path(base) / "detector"


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


def _outputs_of(path):
    from vislearn.serving.models import read_signature_defs

    return set(read_signature_defs(latest_version(path))["serving_default"].outputs)


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


def in_process_batch_scaling(path, image, sizes=(1, 8, 32), rounds=15):
    """Milliseconds per image of serving_default in this process at each batch
    size (median over rounds, sizes interleaved): the most any batcher can gain
    is the batch-1 cost over the large-batch cost."""
    import tensorflow as tf

    function = tf.saved_model.load(str(latest_version(path))).signatures["serving_default"]
    name = next(iter(function.structured_input_signature[1]))
    batches = {size: tf.constant([image] * size) for size in sizes}
    for batch in batches.values():
        function(**{name: batch})
    times = {size: [] for size in sizes}
    for _ in range(rounds):
        for size, batch in batches.items():
            start = time.perf_counter()
            {k: v.numpy() for k, v in function(**{name: batch}).items()}
            times[size].append((time.perf_counter() - start) / size)
    return {size: 1e3 * float(np.median(t)) for size, t in times.items()}


class ServerProcess:
    """`vislearn serve` in a child process; ports read from its first stdout line."""

    def __init__(self, name, path, threads, batching_file=None, inter_op_threads=None):
        inter = threads if inter_op_threads is None else inter_op_threads
        command = [sys.executable, "-m", "vislearn.cli", "serve", "--model", f"{name}={path}", "--port", "0",
                   "--rest-port", "0", "--poll-seconds", "0", "--intra-op-threads", str(threads),
                   "--inter-op-threads", str(inter)]
        if batching_file:
            command += ["--batching-parameters", str(batching_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start: {' '.join(command)}")
        self.target = json.loads(line)["grpc"]
        self.rest = json.loads(line)["rest"]

    def mean_batch_size(self):
        """Mean rows per batch from the server's Prometheus metrics (None without batching)."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.rest}/monitoring/prometheus/metrics", timeout=10) as reply:
            text = reply.read().decode()
        totals = {}
        for line in text.splitlines():
            for part in ("sum", "count"):
                if line.startswith(f":tensorflow:serving:batching_session:processed_batch_size_{part}"):
                    totals[part] = totals.get(part, 0.0) + float(line.rsplit(" ", 1)[1])
        return totals["sum"] / totals["count"] if totals.get("count") else None

    def rss_bytes(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self):
        """User + system CPU time the server has used (to report CPU per request)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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
    parser.add_argument("--kind", choices=("detector", "classifier"), default="detector",
                        help="model made in a temp dir when --model is not given (default: detector)")
    parser.add_argument("--model", metavar="NAME=PATH", help="export base to serve instead of a made model")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the query image (default 224 for a detector, 28 for a classifier)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each throughput window (default 15)")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="soak duration (default 60)")
    parser.add_argument("--calls", type=int, default=300, help="sequential calls for the overhead p50")
    parser.add_argument("--threads", type=int, default=1,
                        help="TF intra-op threads, both sides (default 1; 0: TF's default)")
    parser.add_argument("--inter-op-threads", type=int, default=os.cpu_count() or 1,
                        help="TF inter-op threads, both sides (default: CPU count, as TF Serving); they run "
                             "concurrent requests (batching off) and concurrent batches (batching on)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-micros", type=int, default=5000)
    parser.add_argument("--num-batch-threads", type=int, default=os.cpu_count() or 1,
                        help="batches run at the same time (default: CPU count, TF Serving's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)

    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    # Same TF thread pools here (the in-process reference) as in the server.
    try:
        if args.threads:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        if args.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    except RuntimeError:  # TF already running in this process (e.g. under pytest)
        pass
    workdir = tempfile.TemporaryDirectory(prefix="vislearn-bench-")
    if args.model:
        name, _, path = args.model.partition("=")
        path = Path(path)
    else:
        name, path = (make_detector if args.kind == "detector" else make_classifier)(workdir.name)
    detector = "detection_boxes" in _outputs_of(path)
    image = make_photo(args.image_size or 224) if detector else make_image((args.image_size or 28,) * 2)
    reference_p50, input_name = in_process_p50(path, image, args.calls, args.threads)
    per_image_ms = in_process_batch_scaling(path, image, sizes=(1, 8, args.max_batch_size))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto([image]))

    batching_file = Path(workdir.name) / "batching_parameters.txt"
    batching_file.write_text(f"max_batch_size {{ value: {args.max_batch_size} }}\n"
                             f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                             f"num_batch_threads {{ value: {args.num_batch_threads} }}\n"
                             f"max_enqueued_batches {{ value: 1000 }}\n")
    results = {"model": name, "path": str(path), "clients": args.clients, "threads": args.threads,
               "inter_op_threads": args.inter_op_threads, "num_batch_threads": args.num_batch_threads,
               "in_process_ms_per_image": per_image_ms,
               "graph_batching_ceiling": per_image_ms[1] / per_image_ms[args.max_batch_size]}

    def throughput(server, key):
        """One load window; also CPU per request (server process + this client), which shared cores do not skew."""
        run_load(server.target, request, args.clients, 2.0)  # warm up (thread pools, allocator)
        client_cpu, server_cpu = time.process_time(), server.cpu_seconds()
        latencies, failures, elapsed = run_load(server.target, request, args.clients, args.seconds)
        done = max(len(latencies), 1)
        results.update({f"{key}_rps": len(latencies) / elapsed, f"{key}_failures": len(failures),
                        f"{key}_server_cpu_ms": 1e3 * (server.cpu_seconds() - server_cpu) / done,
                        f"{key}_client_cpu_ms": 1e3 * (time.process_time() - client_cpu) / done})

    server = ServerProcess(name, path, args.threads, inter_op_threads=args.inter_op_threads)
    try:
        grpc_p50 = sequential_p50(server.target, request, args.calls)
        results.update(in_process_p50_ms=reference_p50 * 1e3, grpc_p50_ms=grpc_p50 * 1e3,
                       grpc_overhead_p50_ms=(grpc_p50 - reference_p50) * 1e3)
        throughput(server, "batching_off")
    finally:
        server.stop()

    server = ServerProcess(name, path, args.threads, batching_file, inter_op_threads=args.inter_op_threads)
    try:
        throughput(server, "batching_on")
        results["mean_batch_size"] = server.mean_batch_size()  # proof that requests were merged
        results["batching_speedup"] = results["batching_on_rps"] / max(results["batching_off_rps"], 1e-9)
        cpu = {key: results[f"{key}_server_cpu_ms"] + results[f"{key}_client_cpu_ms"]
               for key in ("batching_off", "batching_on")}
        results["batching_cpu_speedup"] = cpu["batching_off"] / max(cpu["batching_on"], 1e-9)

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
    print(f"model {name} ({path}), {args.clients} concurrent clients, TF intra-op threads {args.threads}, "
          f"inter-op threads {args.inter_op_threads}, num_batch_threads {args.num_batch_threads}")
    print(f"in-process serving_default p50     {results['in_process_p50_ms']:7.2f} ms")
    print("in-process ms per image by batch    " + ", ".join(
        f"{size}: {ms:.2f}" for size, ms in results["in_process_ms_per_image"].items())
          + f"  (ceiling for any batcher: {results['graph_batching_ceiling']:.2f} x)")
    print(f"gRPC Predict p50 (batch 1)          {results['grpc_p50_ms']:7.2f} ms")
    print(f"gRPC overhead p50                   {results['grpc_overhead_p50_ms']:7.2f} ms   "
          f"(target <= 3 ms: {ok[results['grpc_overhead_p50_ms'] <= 3]})")
    for key in ("batching_off", "batching_on"):
        print(f"throughput, {key.replace('_', ' '):24s}{results[f'{key}_rps']:7.1f} req/s  (CPU per request: "
              f"server {results[f'{key}_server_cpu_ms']:.2f} ms + client {results[f'{key}_client_cpu_ms']:.2f} ms)")
    print(f"mean batch size (batching on)       {results['mean_batch_size'] or 0:7.1f} rows")
    print(f"batching speedup                    {results['batching_speedup']:7.2f} x    "
          f"(target >= 2x: {ok[results['batching_speedup'] >= 2]})")
    print(f"batching speedup in CPU per request {results['batching_cpu_speedup']:7.2f} x    "
          f"(the throughput ratio on dedicated cores)")
    print(f"soak {results['soak_seconds']:.0f} s: {results['soak_requests']} requests, "
          f"{results['soak_failed']} failed (target 0: {ok[results['soak_failed'] == 0]}), "
          f"p50 {results['soak_p50_ms']:.1f} ms, p99 {results['soak_p99_ms']:.1f} ms")
    print(f"server RSS {results['rss_start_mb']:.0f} MB -> {results['rss_end_mb']:.0f} MB "
          f"({results['rss_growth_pct']:+.1f}%, target < 10%: {ok[results['rss_growth_pct'] < 10]})")
    return results


if __name__ == "__main__":
    main()
