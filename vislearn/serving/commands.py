"""Click commands: `vislearn serve`, `vislearn query ...`, `vislearn serving config`.

Registered on the main group in `vislearn/cli.py`. Heavy modules (TensorFlow,
gRPC) are imported inside the commands so `vislearn --help` stays fast.
"""

import json
import logging
import signal
from pathlib import Path

import click

log = logging.getLogger(__name__)


def user_errors(fn):
    """`vislearn.cli.user_errors`, looked up at call time (cli.py imports this module)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vislearn.cli import user_errors as wrap

        return wrap(fn)(*args, **kwargs)

    return wrapper


def _grpc_errors(fn):
    """A failed RPC is one `error:` line (exit 2) naming the status code, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import grpc

        from vislearn.cli import UserError

        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            details = error.details() if hasattr(error, "details") else str(error)
            raise UserError(f"{code.name if code else 'RPC failed'}: {details}") from None
        except (ValueError, TypeError) as error:
            raise UserError(str(error).splitlines()[0]) from None

    return wrapper


@click.command("serve")
@click.option("--model-config", "model_config", type=click.Path(dir_okay=False),
              help="models.config (TF Serving's ModelServerConfig text format).")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH",
              help="Serve the versions under PATH as NAME (instead of --model-config).")
@click.option("--port", default=8500, show_default=True, type=int, help="gRPC port.")
@click.option("--rest-port", default=8501, show_default=True, type=int, help="REST port (0: pick a free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--enable-batching", is_flag=True, help="Merge concurrent requests into batches.")
@click.option("--batching-parameters", "batching_file", type=click.Path(dir_okay=False),
              help="TF Serving batching_parameters.txt (implies --enable-batching).")
@click.option("--monitoring-config", "monitoring_file", type=click.Path(dir_okay=False),
              help="TF Serving monitoring_config.txt (default: Prometheus at /monitoring/prometheus/metrics).")
@click.option("--poll-seconds", default=1.0, show_default=True, type=float,
              help="How often base paths are checked for new versions (0: never).")
@click.option("--max-message-mb", default=64, show_default=True, type=float,
              help="Largest gRPC message / REST body accepted.")
@click.option("--intra-op-threads", default=0, show_default=True, type=int, help="TF intra-op threads (0: TF's).")
@click.option("--inter-op-threads", default=0, show_default=True, type=int, help="TF inter-op threads (0: TF's).")
@click.option("--drain-seconds", default=10.0, show_default=True, type=float,
              help="On SIGTERM/SIGINT, time given to in-flight requests.")
@user_errors
def serve_command(model_config, models, port, rest_port, host, enable_batching, batching_file, monitoring_file,
                  poll_seconds, max_message_mb, intra_op_threads, inter_op_threads, drain_seconds):
    """Serve SavedModels over TF Serving's gRPC and REST APIs."""
    from vislearn.config import ConfigError
    from vislearn.serving.batching import (DEFAULT_METRICS_PATH, BatchingOptions, read_batching_parameters,
                                           read_monitoring_config)
    from vislearn.serving.server import Server

    if bool(model_config) == bool(models):
        raise ConfigError("give --model-config FILE or --model NAME=PATH (one or more), not both or neither")
    batching = None
    if batching_file:
        batching = read_batching_parameters(batching_file)
    elif enable_batching:
        batching = BatchingOptions()
    monitoring = read_monitoring_config(monitoring_file) if monitoring_file else (True, DEFAULT_METRICS_PATH)
    server = Server(model_config=model_config, models=models, port=port, rest_port=rest_port, host=host,
                    batching=batching, monitoring=monitoring, poll_seconds=poll_seconds,
                    max_message_bytes=int(max_message_mb * 1024 * 1024),
                    intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)

    def drain(signum, frame):
        # Stop from a helper thread: the handler must return for the main thread to go on waiting.
        import threading

        log.info("signal %d: draining (up to %.0fs)", signum, drain_seconds)
        threading.Thread(target=server.stop, args=(drain_seconds,), daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    server.start()
    click.echo(json.dumps({"grpc": f"{host}:{server.port}",
                           "rest": f"{host}:{server.rest_port}" if server.rest_port else None,
                           "models": server.manager.model_names()}), err=False)
    while not server.wait(0.5):
        pass
    # stop() ran in the helper thread; wait for it to finish draining.
    server.stop(drain_seconds)
    click.echo("stopped", err=True)


@click.group("query")
def query_group():
    """Client side of serving: ask a TF Serving (or `vislearn serve`) server."""


def _server_option(fn):
    fn = click.option("--server", required=True, metavar="HOST:PORT", help="gRPC address of the server.")(fn)
    fn = click.option("--timeout", default=30.0, show_default=True, type=float, help="Seconds per call.")(fn)
    return fn


def _version_options(fn):
    fn = click.option("--version", type=int, help="Model version (default: latest).")(fn)
    fn = click.option("--label", help="Model version label (e.g. stable).")(fn)
    return fn


def _client(server, timeout):
    from vislearn.serving.client import Client

    return Client(server, timeout=timeout)


def _check_images(images):
    from vislearn.config import ConfigError

    for image in images:
        if not Path(image).is_file():
            raise ConfigError(f"{image}: image file not found")


@query_group.command("classify")
@click.argument("images", nargs=-1, required=True)
@_server_option
@click.option("--model", default="classifier", show_default=True)
@_version_options
@user_errors
@_grpc_errors
def query_classify(images, server, timeout, model, version, label):
    """Classify IMAGE files; one JSON line per image."""
    _check_images(images)
    with _client(server, timeout) as client:
        for path, result in zip(images, client.classify(list(images), model=model, version=version, label=label)):
            result = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items()}
            click.echo(json.dumps({"image": path, **result}))


@query_group.command("detect")
@click.argument("images", nargs=-1, required=True)
@_server_option
@click.option("--model", default="detector", show_default=True)
@_version_options
@click.option("--score-threshold", default=0.3, show_default=True, type=float)
@click.option("--out", type=click.Path(file_okay=False), help="Write annotated PNGs (boxes with labels) here.")
@user_errors
@_grpc_errors
def query_detect(images, server, timeout, model, version, label, score_threshold, out):
    """Detect objects in IMAGE files; one JSON line per image."""
    _check_images(images)
    with _client(server, timeout) as client:
        results = client.detect(list(images), model=model, version=version, label=label,
                                score_threshold=score_threshold)
    for path, found in zip(images, results):
        line = {"image": path, "detections": found}
        if out:
            line["annotated"] = str(draw_detections(path, found, out))
        click.echo(json.dumps(line))


def draw_detections(path, detections, out):
    """Draw boxes (normalised [ymin, xmin, ymax, xmax]) with labels; returns the PNG path."""
    from PIL import Image, ImageDraw

    image = Image.open(path).convert("RGB")
    draw = ImageDraw.Draw(image)
    width, height = image.size
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    for item in detections:
        ymin, xmin, ymax, xmax = item["box"]
        box = [xmin * width, ymin * height, xmax * width, ymax * height]
        colour = colours[item["class"] % len(colours)]
        draw.rectangle(box, outline=colour, width=2)
        text = f"{item.get('label', item['class'])} {item['score']:.2f}"
        left, top = box[0], max(0, box[1] - 11)
        draw.rectangle([left, top, left + 6 * len(text) + 2, top + 11], fill=colour)
        draw.text((left + 1, top), text, fill="white")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (Path(path).stem + "_detections.png")
    image.save(target)
    return target


@query_group.command("embed")
@click.argument("items", nargs=-1, required=True)
@_server_option
@click.option("--model", default="embedder", show_default=True)
@_version_options
@click.option("--text", "as_text", is_flag=True, help="ITEMS are texts (default: image files).")
@user_errors
@_grpc_errors
def query_embed(items, server, timeout, model, version, label, as_text):
    """Embed image files (or texts with --text); one JSON line per item."""
    if not as_text:
        _check_images(items)
    with _client(server, timeout) as client:
        if as_text:
            vectors = client.embed_texts(list(items), model=model, version=version, label=label)
        else:
            vectors = client.embed_images(list(items), model=model, version=version, label=label)
    for item, vector in zip(items, vectors):
        click.echo(json.dumps({"item": item, "embedding": [round(float(v), 6) for v in vector]}))


@query_group.command("lookup")
@click.argument("query")
@_server_option
@click.option("--model", default="embedder", show_default=True)
@click.option("-k", "k", default=5, show_default=True, type=int, help="Neighbours to return.")
@user_errors
@_grpc_errors
def query_lookup(query, server, timeout, model, k):
    """Nearest neighbours of QUERY (a text, or an image file path)."""
    if k < 1:
        from vislearn.config import ConfigError

        raise ConfigError(f"-k: expected a positive integer, received {k}")
    with _client(server, timeout) as client:
        for item in client.lookup(query, k=k, model=model):
            click.echo(json.dumps(item, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


@query_group.command("status")
@click.argument("model")
@_server_option
@_version_options
@user_errors
@_grpc_errors
def query_status(model, server, timeout, version, label):
    """Version states of MODEL (GetModelStatus)."""
    with _client(server, timeout) as client:
        for item in client.status(model, version=version, label=label):
            click.echo(json.dumps(item))


@click.group("serving")
def serving_group():
    """Deployment helpers for TF Serving."""


@serving_group.command("config")
@click.option("--base", required=True, type=click.Path(file_okay=False), help="Export base (BASE/NAME/VERSION).")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write (default BASE/models.config; - for stdout).")
@click.option("--policy", default="latest", show_default=True,
              help="Version policy: latest, latest:N, all or specific:V[,V...].")
@click.option("--label", "labels", multiple=True, metavar="[MODEL:]LABEL=VERSION", help="Version label.")
@click.option("--base-path", help="BASE as the server sees it (e.g. /models in the Docker image).")
@user_errors
def serving_config_command(base, out, policy, labels, base_path):
    """Write a models.config for every model exported under BASE."""
    from vislearn.serving.config import build_model_config, format_model_config, write_model_config

    config = build_model_config(base, policy=policy, labels=labels, base_path=base_path)
    if out == "-":
        click.echo(format_model_config(config), nl=False)
        return
    path = write_model_config(config, out or Path(base) / "models.config")
    click.echo(str(path))
