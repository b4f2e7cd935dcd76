"""SavedModel export in TF Serving's layout, with named signatures.

`BASE/NAME/VERSION/` holds `saved_model.pb` and `variables/`, plus
`assets.extra/vislearn.json` describing the model (kind, input size, class
names) for `vislearn predict` and clients. Loading needs TensorFlow only.
"""

import json
from pathlib import Path

import keras
import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data.folders import decode_image


def next_version(base, name):
    folder = Path(base) / name
    versions = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(versions, default=0) + 1


def version_dir(base, name, version=None):
    version = next_version(base, name) if version is None else int(version)
    if version <= 0:
        raise ConfigError(f"--version: expected a positive integer, received {version}")
    path = Path(base) / name / str(version)
    if path.exists():
        raise ConfigError(f"{path}: version {version} of {name!r} already exists; choose another --version")
    return path


def write_metadata(path, **metadata):
    extra = Path(path) / "assets.extra"
    extra.mkdir(parents=True, exist_ok=True)
    (extra / "vislearn.json").write_text(json.dumps(metadata, indent=2))


def read_metadata(path):
    file = Path(path) / "assets.extra" / "vislearn.json"
    return json.loads(file.read_text()) if file.exists() else {}


def decode_batch(images, image_shape):
    """A batch of encoded images (string [batch]) -> float32 [batch, H, W, C] in [0, 1]."""
    height, width, channels = image_shape
    return tf.map_fn(lambda data: decode_image(data, [height, width], channels), images,
                     fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32))


def export_classifier(model, path, image_shape, class_names):
    """Export an image classifier.

    Signatures:
        serving_default: `images` string [batch] of encoded JPEG/PNG/BMP/GIF ->
            `probabilities` float [batch, classes], `classes` int64 [batch],
            `labels` string [batch] (the top class's name).
        predict_images: `images` float32 [batch, H, W, 3] in [0, 1] -> same.
    """
    height, width, channels = image_shape
    names = tf.constant([str(n) for n in class_names])

    def outputs(images):
        probabilities = model(images, training=False)
        classes = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "classes": classes, "labels": tf.gather(names, classes)}

    def from_bytes(images):
        return outputs(decode_batch(images, image_shape))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    archive.add_endpoint("predict_images", outputs,
                         input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32, name="images")])
    archive.write_out(str(path), verbose=False)
    write_metadata(path, kind="classifier", image_shape=list(image_shape), class_names=[str(n) for n in class_names],
                   signatures={"serving_default": "images: encoded image bytes",
                               "predict_images": "images: float32 [0,1]"})
    return Path(path)


def export_detector(model, path, image_shape, class_names, score_threshold=0.25, iou_threshold=0.45,
                    max_detections=100, resize="stretch"):
    """Export an object detector; decoding and per-class NMS run inside the graph.

    Args:
        model: has `detect(images, score_threshold, iou_threshold,
            max_detections)` (e.g. `vislearn.models.YoloV1`).
        path: the version folder to write.
        image_shape: (height, width, 3) the network takes.
        class_names: names of the class indices (written to the metadata and
            returned as `detection_labels`).
        score_threshold: detections scoring lower are dropped.
        iou_threshold: per-class NMS overlap threshold.
        max_detections: outputs are padded to this many per image.
        resize: `"stretch"` (how YOLOv1 trains) or `"letterbox"` (keep the
            aspect ratio, pad with grey); boxes are mapped back either way.

    Signatures (both return the same outputs):
        serving_default: `images` string [batch] of encoded JPEG/PNG/BMP/GIF
            images of any sizes. Bytes that are not an image make the call
            fail with `InvalidArgumentError` (an error response in TF Serving).
        detect_images: `images` uint8 [batch, H, W, 3] of any one size.

    Outputs:
        `detection_boxes` float [batch, K, 4] normalised `(ymin, xmin, ymax,
        xmax)` in the *original* image, `detection_scores` float [batch, K],
        `detection_classes` int32 [batch, K], `detection_labels` string
        [batch, K] (class names; "" for padding), `num_detections` int32
        [batch]; K = `max_detections`, entries past `num_detections` are 0.
    """
    from vislearn.data.detection_augment import letterbox

    if resize not in ("stretch", "letterbox"):
        raise ConfigError(f"export.resize: expected 'stretch' or 'letterbox', received {resize!r}")
    for key, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"export.{key}: expected a number in [0, 1], received {value!r}")
    if int(max_detections) < 1:
        raise ConfigError(f"export.max_detections: expected a positive integer, received {max_detections!r}")
    height, width = int(image_shape[0]), int(image_shape[1])
    names = tf.constant([str(n) for n in class_names] + [""])
    score_threshold, iou_threshold, max_detections = float(score_threshold), float(iou_threshold), int(max_detections)

    def prepare(image):
        """One uint8 [H, W, 3] image -> (network input, letterbox parameters)."""
        image = tf.image.convert_image_dtype(image, tf.float32)
        if resize == "letterbox":
            element = letterbox({"image": image, "boxes": tf.zeros([0, 4])}, (height, width))
            return element["image"], element["letterbox"]
        resized = tf.clip_by_value(tf.image.resize(image, [height, width], antialias=True), 0.0, 1.0)
        return resized, tf.constant([1.0, 1.0, 0.0, 0.0])

    def detect(images, params):
        outputs = model.detect(images, score_threshold, iou_threshold, max_detections)
        scale, offset = tf.tile(params[:, None, :2], [1, 1, 2]), tf.tile(params[:, None, 2:], [1, 1, 2])
        boxes = tf.clip_by_value((outputs["detection_boxes"] - offset) / scale, 0.0, 1.0)
        real = tf.range(max_detections)[None, :] < outputs["num_detections"][:, None]
        classes = tf.where(real, outputs["detection_classes"], 0)
        return {
            "detection_boxes": tf.where(real[..., None], boxes, 0.0),
            "detection_scores": tf.where(real, outputs["detection_scores"], 0.0),
            "detection_classes": classes,
            "detection_labels": tf.gather(names, tf.where(real, classes, len(class_names))),
            "num_detections": outputs["num_detections"],
        }

    signature = (tf.TensorSpec([height, width, 3], tf.float32), tf.TensorSpec([4], tf.float32))

    def from_bytes(images):
        decoded = tf.map_fn(
            lambda data: prepare(tf.io.decode_image(data, channels=3, expand_animations=False)),
            images, fn_output_signature=signature)
        return detect(*decoded)

    def from_pixels(images):
        return detect(*tf.map_fn(prepare, images, fn_output_signature=signature))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    archive.add_endpoint("detect_images", from_pixels,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.write_out(str(path), verbose=False)
    write_metadata(path, kind="detector", image_shape=[height, width, 3],
                   class_names=[str(n) for n in class_names], score_threshold=score_threshold,
                   iou_threshold=iou_threshold, max_detections=max_detections, resize=resize,
                   box_format="normalised ymin, xmin, ymax, xmax in the original image",
                   signatures={"serving_default": "images: encoded image bytes (any size)",
                               "detect_images": "images: uint8 [batch, H, W, 3]"})
    return Path(path)


def export_image_embedder(encoder, path, image_shape, description=""):
    """Export a frozen encoder as an image feature extractor.

    Signatures:
        serving_default, embed_image: `images` string [batch] of encoded
            JPEG/PNG/BMP/GIF -> `embeddings` float32 [batch, dim], L2-normalised.
        embed_pixels: `images` float32 [batch, H, W, 3] in [0, 1] -> the same.
    """
    height, width, channels = image_shape

    def embed(images):
        features = tf.reshape(encoder(images, training=False), [tf.shape(images)[0], -1])
        return {"embeddings": tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)}

    def from_bytes(images):
        return embed(decode_batch(images, image_shape))

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    bytes_spec = [tf.TensorSpec([None], tf.string, name="images")]
    archive.add_endpoint("serving_default", from_bytes, input_signature=bytes_spec)
    archive.add_endpoint("embed_image", from_bytes, input_signature=bytes_spec)
    archive.add_endpoint("embed_pixels", embed, input_signature=[
        tf.TensorSpec([None, height, width, channels], tf.float32, name="images")])
    archive.write_out(str(path), verbose=False)
    write_metadata(path, kind="image_embedder", image_shape=list(image_shape),
                   embedding_dim=int(encoder.output_shape[-1]), normalized=True, description=description,
                   signatures={"serving_default": "images: encoded image bytes -> embeddings",
                               "embed_image": "images: encoded image bytes -> embeddings",
                               "embed_pixels": "images: float32 [0,1] -> embeddings"})
    return Path(path)


def check_image_input(model):
    """Refuse a features-mode model without its extraction backbone: its
    `embed_image` takes feature vectors, not the images an export decodes."""
    if getattr(model, "feature_dim", None) and getattr(model, "extractor", None) is None:
        raise ConfigError("export: the model embeds cached feature vectors (model.backbone: features); wrap it "
                          "with vislearn.features.WithExtractor (its extraction backbone) to export embed_image")


def export_text_image_embedder(model, path, image_shape, description=""):
    """Export an image-text embedding model (e.g. `TwoBranch`): both branches,
    one joint space. The tokenizer (lower-casing, punctuation stripping,
    whitespace split, vocabulary lookup) runs in the graph from stock TF ops,
    so stock TF Serving loads the export.

    Signatures:
        serving_default, embed_image: `images` string [batch] of encoded
            JPEG/PNG/BMP/GIF -> `embeddings` float32 [batch, dim], L2-normalised.
        embed_text: `texts` string [batch] -> `embeddings` float32 [batch, dim];
            unknown words map to the out-of-vocabulary token, and an empty
            string embeds as a caption without words (a fixed vector).

    A model trained on cached features (`model.backbone: features`) must come
    with its extraction backbone in front (`vislearn.features.WithExtractor`,
    what `vislearn.recipes.load_trained` returns), so `embed_image` still
    takes encoded images.
    """
    check_image_input(model)

    def embed_image(images):
        return {"embeddings": model.embed_image(decode_batch(images, image_shape), training=False)}

    def embed_text(texts):
        return {"embeddings": model.embed_text(texts, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    bytes_spec = [tf.TensorSpec([None], tf.string, name="images")]
    archive.add_endpoint("serving_default", embed_image, input_signature=bytes_spec)
    archive.add_endpoint("embed_image", embed_image, input_signature=bytes_spec)
    archive.add_endpoint("embed_text", embed_text, input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    archive.write_out(str(path), verbose=False)
    write_metadata(path, kind="text_image_embedder", image_shape=list(image_shape), embedding_dim=int(model.embed_dim),
                   normalized=True, description=description,
                   signatures={"serving_default": "images: encoded image bytes -> embeddings",
                               "embed_image": "images: encoded image bytes -> embeddings",
                               "embed_text": "texts: strings -> embeddings"})
    return Path(path)
