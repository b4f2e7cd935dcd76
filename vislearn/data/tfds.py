"""TFDS datasets from a local `data_dir` (vislearn never downloads)."""

import tensorflow as tf

from vislearn.config import ConfigError


def load_tfds(name, split, data_dir, image_size, image_key="image", label_key="label"):
    """`(image, label)` float [0, 1] dataset of a prepared TFDS dataset.

    Raises:
        ConfigError: the dataset is not prepared under `data_dir`.

    Returns:
        (dataset, class_names, count).
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
        info = builder.info
    except (FileNotFoundError, AssertionError, ValueError) as error:  # TFDS's "not prepared" errors
        raise ConfigError(
            f"data.data_dir: TFDS dataset {name!r} split {split!r} is not prepared in {data_dir!r} "
            f"(vislearn does not download; run tfds build there first): {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    label_feature = info.features[label_key] if label_key in info.features else None
    class_names = list(label_feature.names) if hasattr(label_feature, "names") else None
    try:
        count = info.splits[split].num_examples
    except KeyError:  # split metadata absent (e.g. generated without info): count once
        count = int(dataset.reduce(0, lambda n, _: n + 1))
    size = list(image_size)

    def convert(example):
        image = tf.cast(example[image_key], tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image = tf.image.resize(image, size, antialias=True) / 255.0
        image.set_shape([*size, 3])
        return image, tf.cast(example[label_key], tf.int64)

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE), class_names, count
