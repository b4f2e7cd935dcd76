"""Class-per-folder image datasets (`root/<class>/<image>`), read with tf.data."""

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from vislearn.config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
log = logging.getLogger("vislearn.data")


class CorruptImageError(ConfigError):
    """An image file that cannot be decoded."""


def check_images(paths, skip_corrupt=False):
    """Decode every file once with PIL; a corrupt one raises an error naming it,
    or with `skip_corrupt` is dropped and counted. Returns the kept indices."""
    kept, skipped = [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as error:  # PIL raises several types for bad files
            if not skip_corrupt:
                raise CorruptImageError(
                    f"{path}: cannot decode image ({type(error).__name__}: {error}); "
                    "fix or remove it, or set data.skip_corrupt: true") from None
            skipped.append(str(path))
            continue
        kept.append(i)
    if skipped:
        log.warning("skipped %d corrupt image(s), first: %s", len(skipped), skipped[0])
    return kept, skipped


def list_class_folders(root, class_names=None):
    """Paths and integer labels of `root/<class>/*`; classes sorted by name
    unless `class_names` fixes the order (so a test split matches the train split)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: image folder not found (expected <root>/<class>/<image>)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise ConfigError(f"{root}: no class folders inside (expected <root>/<class>/<image>)")
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ConfigError(f"{root}: class folder(s) {unknown} not among the training classes {class_names}")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(path))
                labels.append(label)
    if not paths:
        raise ConfigError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return paths, np.asarray(labels, dtype=np.int64), list(class_names)


def decode_image(data, image_size, channels=3):
    """Encoded bytes -> float32 [0, 1] image of `image_size`, RGB."""
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), image_size, antialias=True)
    image.set_shape([*image_size, channels])
    return image / 255.0


def image_folder(root, image_size, class_names=None, skip_corrupt=False, cache=True):
    """Labelled `(image, label)` dataset of a class-per-folder tree, unbatched.

    Returns:
        (dataset, class_names, count).
    """
    paths, labels, class_names = list_class_folders(root, class_names)
    kept, _ = check_images(paths, skip_corrupt)
    paths = [paths[i] for i in kept]
    labels = labels[kept]
    size = list(image_size)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda path, label: (decode_image(tf.io.read_file(path), size), label),
        num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        dataset = dataset.cache()
    return dataset, class_names, len(paths)
