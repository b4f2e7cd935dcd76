"""YOLO benchmarks: anchor-free train-step throughput vs keras-cv, and export latency.

1. Train-step throughput (images/s) of vislearn's anchor-free detector
   against keras-cv's YOLOV8Detector at (nearly) equal parameter count, the
   same input size, batch, optimizer and data (one fixed batch of random
   pixels with two boxes an image, so the input pipeline costs nothing).
   keras-cv's widths are chosen to match vislearn's parameter count; both
   counts are printed. Runs alternate (A, B, A, B, ...) and each model's
   best run counts (the median is printed too), so a load spike on a
   shared machine hurts both alike.
   Target: vislearn >= 1.0x keras-cv.
2. Export latency at batch 1: the exported SavedModel's `detect_images`
   signature (uint8 pixels in; resize, network, box decoding and per-class
   NMS in the graph), loaded with `tf.saved_model.load`, against the
   in-process Keras call of the same network plus NMS (`model.detect` in a
   `tf.function`). Median of interleaved calls. Target: <= 1.15x. The
   `serving_default` path (PNG bytes in, decode included) is printed too.

    python benchmarks/yolo.py                    # ~5 min on 2 cores
    python benchmarks/yolo.py --repeats 1 --calls 20            # quick
"""

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from step_timing import timed_steps  # benchmarks/ (the script's directory)

NUM_CLASSES = 4


def synthetic_batch(batch, size, seed=0):
    """Random pixels and two boxes an image, as `rel_yxyx` plus class ids."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    boxes = np.zeros((batch, 8, 4), np.float32)
    classes = np.full((batch, 8), -1, np.int32)
    boxes[:, 0] = [0.10, 0.10, 0.45, 0.40]
    boxes[:, 1] = [0.50, 0.55, 0.90, 0.95]
    classes[:, :2] = [1, 2]
    return images, boxes, classes


def vislearn_detector(size, width, depth):
    import keras

    from vislearn.models.yolo_anchor_free import YoloAnchorFree

    model = YoloAnchorFree(num_classes=NUM_CLASSES, image_shape=(size, size, 3), width_multiplier=width,
                           depth_multiplier=depth)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def keras_cv_detector(size, base_channels, depth):
    import keras
    import keras_cv

    # YOLOv8's C2f depths at strides 4..32 scaled like vislearn's (n: 1, 2, 2, 1).
    depths = [max(1, round(d * depth)) for d in (3, 6, 6, 3)]
    backbone = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=[base_channels * m for m in (1, 2, 4, 8)], stackwise_depth=depths,
        include_rescaling=False, activation="swish", input_shape=(size, size, 3))
    model = keras_cv.models.YOLOV8Detector(num_classes=NUM_CLASSES, bounding_box_format="rel_yxyx",
                                           backbone=backbone, fpn_depth=depths[-1])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), classification_loss="binary_crossentropy",
                  box_loss="ciou")
    return model


def count_params(model):
    return int(sum(np.prod(w.shape) for w in model.weights))


def throughput(args):
    import keras
    import tensorflow as tf

    images, boxes, classes = synthetic_batch(args.batch, args.image_size)
    keras.utils.set_random_seed(0)
    ours = vislearn_detector(args.image_size, args.width, args.depth)
    target = count_params(ours)
    # keras-cv's widths: the base channel count whose model is closest in size.
    candidates = {}
    for base in range(args.width_search[0], args.width_search[1] + 1, 2):
        candidates[base] = count_params(keras_cv_detector(args.image_size, base, args.depth))
    base = min(candidates, key=lambda b: abs(candidates[b] - target))
    theirs = keras_cv_detector(args.image_size, base, args.depth)
    print(f"parameters: vislearn {target:,} (width {args.width}, depth {args.depth}); keras-cv "
          f"YOLOV8Detector {count_params(theirs):,} (stackwise_channels {[base * m for m in (1, 2, 4, 8)]}); "
          f"ratio {count_params(theirs) / target:.3f}", flush=True)

    data = {
        "vislearn": tf.data.Dataset.from_tensors(
            {"image": images, "boxes": boxes, "classes": classes}).repeat(),
        # keras-cv takes pixel boxes in its bounding_box_format, -1 padding.
        "keras-cv": tf.data.Dataset.from_tensors(
            (images, {"boxes": np.where(classes[..., None] >= 0, boxes, -1).astype(np.float32),
                      "classes": classes.astype(np.float32)})).repeat(),
    }
    models = {"vislearn": ours, "keras-cv": theirs}
    for name, model in models.items():  # trace and warm up outside the timing
        model.fit(data[name], steps_per_epoch=2, epochs=1, verbose=0)
    rates = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            rates[name].append(args.steps * args.batch / timed_steps(model, data[name], args.steps))
    for name in models:
        print(f"{name:9s} train step: best {max(rates[name]):.1f}, median {statistics.median(rates[name]):.1f} "
              f"images/s (runs: {', '.join(f'{r:.1f}' for r in rates[name])})")
    ratio = max(rates["vislearn"]) / max(rates["keras-cv"])
    median_ratio = statistics.median(rates["vislearn"]) / statistics.median(rates["keras-cv"])
    print(f"throughput vislearn / keras-cv: {ratio:.2f}x best-of-{args.repeats} (target >= 1.0x), "
          f"{median_ratio:.2f}x median; input {args.image_size}, batch {args.batch}, {args.steps} steps a run",
          flush=True)
    return ours


def export_latency(model, args):
    import tensorflow as tf
    from PIL import Image

    from vislearn.export import export_detector

    size = args.image_size
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[0]).save(buffer, format="PNG")
    encoded = tf.constant([buffer.getvalue()])
    thresholds = dict(score_threshold=0.25, iou_threshold=0.45, max_detections=100)

    with tempfile.TemporaryDirectory() as tmp:
        path = export_detector(model, Path(tmp) / "1", (size, size, 3), [f"c{i}" for i in range(NUM_CLASSES)],
                               **thresholds)
        loaded = tf.saved_model.load(str(path))
        calls = {
            "keras (network + NMS, tf.function)": (
                tf.function(lambda x: model.detect(x, **thresholds)),
                tf.constant(pixels.astype(np.float32) / 255.0)),
            "export detect_images (uint8)": (loaded.signatures["detect_images"], tf.constant(pixels)),
            "export serving_default (PNG)": (loaded.signatures["serving_default"], encoded),
        }
        times = {name: [] for name in calls}
        for name, (fn, x) in calls.items():
            for _ in range(5):
                fn(x) if not name.startswith("export") else fn(images=x)
        for _ in range(args.calls):
            for name, (fn, x) in calls.items():
                start = time.perf_counter()
                out = fn(x) if not name.startswith("export") else fn(images=x)
                _ = out["num_detections"].numpy()
                times[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:38s} p50 {ms:7.2f} ms (batch 1, {args.calls} calls)")
    base = medians["keras (network + NMS, tf.function)"]
    print(f"export latency / in-process Keras + NMS: {medians['export detect_images (uint8)'] / base:.2f}x "
          f"(target <= 1.15x); with PNG decoding: {medians['export serving_default (PNG)'] / base:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=float, default=0.25, help="vislearn width multiplier (YOLOv8n: 0.25)")
    parser.add_argument("--depth", type=float, default=0.33, help="depth multiplier (YOLOv8n: 0.33)")
    parser.add_argument("--width-search", type=int, nargs=2, default=[28, 32],
                        help="keras-cv base channel counts tried to match the parameter count")
    parser.add_argument("--steps", type=int, default=5, help="train steps a timed run")
    parser.add_argument("--repeats", type=int, default=6, help="timed runs a model (short runs, many: load "
                        "spikes on a shared machine then spoil only some of them)")
    parser.add_argument("--calls", type=int, default=50, help="timed calls a latency path")
    args = parser.parse_args()
    model = throughput(args)
    export_latency(model, args)


if __name__ == "__main__":
    main()
