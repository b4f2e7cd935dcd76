"""Fixtures for the serving tests: tiny real SavedModels and a running embedded server.

Models (all exported in TF Serving layout BASE/NAME/VERSION):
- `classifier`: a tiny Keras CNN through `vislearn.export.export_classifier`.
- `multi`: a tf.Module with the signatures detection and embedding exports
  will have (`serving_default` detection outputs, `embed_image`, `embed_text`,
  `lookup_text`, `lookup_image`) and a `classify`-method signature, so the
  client paths run against real SavedModels before those exporters exist.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASS_NAMES = ["zero", "one", "two"]
CAPTIONS = ["a red square", "a green field", "a blue sky", "a black cat", "a white wall"]


def png_bytes(colour=(200, 30, 30), size=(28, 28)):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def export_tiny_classifier(path, seed=0):
    import keras

    from vislearn.export import export_classifier

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((28, 28, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    return export_classifier(model, path, (28, 28, 3), CLASS_NAMES)


def export_multi(path):
    """A SavedModel with detection, embedding, lookup and classify signatures."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    captions = tf.constant(CAPTIONS)
    bank = tf.math.l2_normalize(tf.random.stateless_normal([len(CAPTIONS), 4], seed=[1, 2]), axis=-1)

    def decode(images):
        return tf.map_fn(lambda b: tf.image.resize(tf.cast(tf.io.decode_image(b, 3, expand_animations=False),
                                                            tf.float32), [8, 8]) / 255.0,
                         images, fn_output_signature=tf.TensorSpec([8, 8, 3], tf.float32))

    def image_embedding(images):
        pixels = decode(images)
        mean = tf.reduce_mean(pixels, axis=[1, 2])  # [b, 3]
        return tf.math.l2_normalize(tf.concat([mean, 1.0 - mean[:, :1]], axis=-1), axis=-1)

    def text_embedding(texts):
        lengths = tf.cast(tf.strings.length(texts), tf.float32)[:, None]
        return tf.math.l2_normalize(tf.concat([lengths, lengths * 0.5, tf.ones_like(lengths), -lengths], -1), -1)

    def lookup(queries, k):
        scores = tf.matmul(queries, bank, transpose_b=True)
        top = tf.math.top_k(scores, k=k)
        return {"indices": top.indices, "scores": top.values, "captions": tf.gather(captions, top.indices)}

    class Multi(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def detect(self, images):
            pixels = decode(images)
            batch = tf.shape(images)[0]
            brightness = tf.reduce_mean(pixels, axis=[1, 2, 3])
            boxes = tf.constant([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 0.0, 0.0]])
            scores = tf.stack([tf.fill([batch], 0.9), 0.2 + 0.5 * brightness, tf.zeros([batch])], axis=1)
            return {"detection_boxes": tf.tile(boxes[None], [batch, 1, 1]),
                    "detection_scores": scores,
                    "detection_classes": tf.tile(tf.constant([[1.0, 2.0, 0.0]]), [batch, 1]),
                    "num_detections": tf.fill([batch], 2.0)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def embed_image(self, images):
            return {"embeddings": image_embedding(images)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
        def embed_text(self, texts):
            return {"embeddings": text_embedding(texts)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text"),
                                      tf.TensorSpec([], tf.int32, name="k")])
        def lookup_text(self, text, k):
            return lookup(text_embedding(text), k)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image"),
                                      tf.TensorSpec([], tf.int32, name="k")])
        def lookup_image(self, image, k):
            return lookup(image_embedding(image), k)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            parsed = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([2], tf.float32)})
            scores = tf.nn.softmax(parsed["x"], axis=-1)
            labels = tf.tile(tf.constant([["neg", "pos"]]), [tf.shape(inputs)[0], 1])
            return {"classes": labels, "scores": scores}

    module = Multi()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.detect, "embed_image": module.embed_image, "embed_text": module.embed_text,
        "lookup_text": module.lookup_text, "lookup_image": module.lookup_image, "classify": module.classify})
    # TF2 saves every signature as a predict signature; a classify-method one is
    # what TF Serving's Classify API needs, so mark it as the exporter would.
    file = Path(path) / "saved_model.pb"
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(file.read_bytes())
    saved.meta_graphs[0].signature_def["classify"].method_name = "tensorflow/serving/classify"
    file.write_bytes(saved.SerializeToString())
    return Path(path)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """Pristine exports, made once: {"classifier": path/1, "multi": path/1}."""
    root = tmp_path_factory.mktemp("store")
    return {"classifier": export_tiny_classifier(root / "classifier" / "1"),
            "multi": export_multi(root / "multi" / "1"),
            "classifier_2": export_tiny_classifier(root / "classifier_v2" / "2", seed=1)}


def publish(source, target):
    """Copy a version folder in atomically (copy aside, then rename), as a deployer should."""
    target = Path(target)
    staging = target.parent / f".{target.name}.tmp"
    shutil.copytree(source, staging)
    os.rename(staging, target)
    return target


@pytest.fixture(scope="session")
def base(tmp_path_factory, model_store):
    """An export base with `classifier/1` and `multi/1`."""
    root = tmp_path_factory.mktemp("base")
    publish(model_store["classifier"], root / "classifier" / "1")
    publish(model_store["multi"], root / "multi" / "1")
    return root


@pytest.fixture(scope="session")
def server(base):
    """A running embedded server (gRPC + REST on free loopback ports)."""
    from vislearn.serving.server import Server

    with Server(models=[f"classifier={base / 'classifier'}", f"multi={base / 'multi'}"], port=0, rest_port=0,
                poll_seconds=0, max_message_bytes=2 * 1024 * 1024) as running:
        yield running


@pytest.fixture(scope="session")
def image():
    return png_bytes()


@pytest.fixture(scope="session")
def make_png():
    return png_bytes


@pytest.fixture(scope="session")
def publisher():
    return publish


@pytest.fixture(scope="session")
def exporters():
    return {"classifier": export_tiny_classifier, "multi": export_multi}
