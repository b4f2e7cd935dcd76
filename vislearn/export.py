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
        decoded = tf.map_fn(lambda data: decode_image(data, [height, width], channels), images,
                            fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32))
        return outputs(decoded)

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
