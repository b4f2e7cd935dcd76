"""TFDS `voc` and `coco` from a local `data_dir`, as detection elements (never downloads).

TFDS stores boxes as normalised `(ymin, xmin, ymax, xmax)` already, so elements
only gain float images, int32 classes and the `difficult` flag (VOC
`is_difficult`, COCO `is_crowd`). TFDS validated the boxes when it built the
set; the graph still clips them to [0, 1] and drops zero-area ones (not
counted: the counts of `vislearn.data.detection` need a pass over the data).
"""

import tensorflow as tf

from vislearn.config import ConfigError

SUPPORTED = ("voc", "coco")


def load_detection_tfds(name, split, data_dir):
    """Detection elements of a prepared TFDS `voc/*` or `coco/*` dataset.

    Args:
        name: TFDS name with config, e.g. `voc/2007` or `coco/2017`.
        split: TFDS split, e.g. `train`, `validation`, `test`, `train[:10%]`.
        data_dir: folder where `tfds build` prepared the dataset.

    Raises:
        ConfigError: the name is not a VOC or COCO detection set, or it is not
            prepared under `data_dir`.

    Returns:
        `vislearn.data.detection.DetectionSet`; `image_id` is COCO's
        `image/id`, or for VOC the example's index in the split.
    """
    import tensorflow_datasets as tfds

    from vislearn.data.detection import DetectionSet

    family = name.split("/")[0].split(":")[0]
    if family not in SUPPORTED:
        raise ConfigError(f"data.name: TFDS detection dataset {name!r} is not supported; "
                          f"expected one of {[f + '/...' for f in SUPPORTED]}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
        info = builder.info
    except (FileNotFoundError, AssertionError, ValueError, tfds.core.registered.DatasetNotFoundError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"data.data_dir: TFDS dataset {name!r} split {split!r} is not prepared in {str(data_dir)!r} "
            f"(vislearn does not download; run `tfds build {name} --data_dir {data_dir}` first): {first_line}"
        ) from None
    class_names = list(info.features["objects"]["label"].names)
    try:
        count = info.splits[split].num_examples
    except (KeyError, ValueError):  # split metadata absent (mocked or partial): count once
        count = int(dataset.reduce(0, lambda n, _: n + 1))
    flag = "is_difficult" if family == "voc" else "is_crowd"

    def convert(index, example):
        objects = example["objects"]
        boxes = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
        labels, flags = tf.cast(objects["label"], tf.int32), tf.cast(objects[flag], tf.bool)
        # Prepared data has one label and flag per box; tfds.testing.mock_data
        # draws each sequence's length independently, so align on the shortest.
        n = tf.reduce_min([tf.shape(boxes)[0], tf.shape(labels)[0], tf.shape(flags)[0]])
        boxes, labels, flags = boxes[:n], labels[:n], flags[:n]
        boxes = tf.clip_by_value(boxes, 0.0, 1.0)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        image = tf.image.convert_image_dtype(example["image"], tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image_id = tf.cast(example["image/id"], tf.int64) if "image/id" in example else index
        return {
            "image": image,
            "boxes": tf.boolean_mask(boxes, keep),
            "classes": tf.boolean_mask(labels, keep),
            "difficult": tf.boolean_mask(flags, keep),
            "image_id": image_id,
        }

    dataset = dataset.enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    return DetectionSet(dataset, class_names, count, {})
