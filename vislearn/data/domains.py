"""Two-domain data for domain adaptation: a labelled source, an unlabelled target.

Every builder here returns a `DomainData`; its `train` dataset yields the dicts
`DANN.train_step` takes (`source_image`, `source_label`, `target_image`), and
its evaluation sets are labelled `(image, label)` batches of each domain.
"""

import dataclasses
import math
from pathlib import Path

import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data.folders import image_folder
from vislearn.data.make import default_data_home, make_digits_m
from vislearn.data.tfds import load_tfds


@dataclasses.dataclass
class DomainData:
    train: tf.data.Dataset          # infinite, batched dicts
    steps_per_epoch: int
    source_test: tf.data.Dataset    # batched (image, label)
    target_test: tf.data.Dataset    # batched (image, label): the evaluation domain
    num_classes: int
    image_shape: tuple
    class_names: list
    counts: dict


def _zip_domains(source, target, batch_size, seed, target_as_source):
    """Pair a shuffled source batch with a shuffled target batch, forever.

    With `target_as_source` (the train-on-target oracle) the labelled slots are
    filled from the target domain instead.
    """
    if target_as_source:
        source = target
    source = source.shuffle(4096, seed=seed).repeat().batch(batch_size, drop_remainder=True)
    target = target.shuffle(4096, seed=seed + 1).repeat().batch(batch_size, drop_remainder=True)
    paired = tf.data.Dataset.zip((source, target)).map(
        lambda s, t: {"source_image": s[0], "source_label": s[1], "target_image": t[0]})
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return paired.with_options(options).prefetch(tf.data.AUTOTUNE)


def _bundle(source_train, source_test, target_train, target_test, counts, class_names,
            image_size, batch_size, seed, target_as_source):
    n_train = max(counts["source_train"], counts["target_train"])
    if n_train < batch_size:
        raise ConfigError(f"data.batch_size: {batch_size} is larger than the training set ({n_train} images)")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    def test_batches(dataset):
        return dataset.batch(batch_size).with_options(options).prefetch(tf.data.AUTOTUNE)

    return DomainData(
        train=_zip_domains(source_train, target_train, batch_size, seed, target_as_source),
        steps_per_epoch=math.ceil(n_train / batch_size),
        source_test=test_batches(source_test),
        target_test=test_batches(target_test),
        num_classes=len(class_names),
        image_shape=(*image_size, 3),
        class_names=class_names,
        counts=counts,
    )


def domain_folders(source, target, image_size=(28, 28), batch_size=64, skip_corrupt=False,
                   cache=True, seed=0, target_as_source=False):
    """Source and target class-per-folder trees, each with `train/` and `test/`.

    Args:
        source: root of the labelled domain (`source/{train,test}/<class>/*`).
        target: root of the target domain, same layout; its train labels are
            ignored (except by the train-on-target oracle).
        image_size: [height, width] images are resized to.
        batch_size: global batch size of each domain's half of a step.
        skip_corrupt: drop (and count) undecodable images instead of failing.
        cache: keep decoded images in memory after the first epoch.
    """
    image_size = tuple(image_size)
    sets, counts = {}, {}
    class_names = None
    for domain, root in (("source", source), ("target", target)):
        for split in ("train", "test"):
            dataset, class_names, count = image_folder(
                Path(root) / split, image_size, class_names, skip_corrupt, cache)
            sets[f"{domain}_{split}"], counts[f"{domain}_{split}"] = dataset, count
    return _bundle(sets["source_train"], sets["source_test"], sets["target_train"], sets["target_test"],
                   counts, class_names, image_size, batch_size, seed, target_as_source)


def digits_m(root=None, image_size=(28, 28), batch_size=64, skip_corrupt=False, cache=True,
             make_seed=0, seed=0, target_as_source=False):
    """digits -> digits-M (see `vislearn.data.make.make_digits_m`).

    Args:
        root: folder holding the made set; when null, it is made on first use
            under `$VISLEARN_DATA` (default ~/.cache/vislearn).
        make_seed: seed of the photo crops and the train/test split.
    """
    if root is None:
        root = default_data_home() / f"digits_m-{make_seed}"
        if not (root / "dataset.json").exists():
            make_digits_m(root, seed=make_seed)
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} does not exist (make it with `vislearn data make digits_m --out {root}`)")
    return domain_folders(root / "source", root / "target", image_size, batch_size, skip_corrupt,
                          cache, seed, target_as_source)


def domain_tfds(source, target, data_dir, image_size=(28, 28), batch_size=64,
                train_split="train", test_split="test", seed=0, target_as_source=False):
    """Two TFDS datasets prepared under a local `data_dir` as source and target."""
    image_size = tuple(image_size)
    sets, counts, class_names = {}, {}, None
    for domain, name in (("source", source), ("target", target)):
        for split_key, split in (("train", train_split), ("test", test_split)):
            dataset, names, count = load_tfds(name, split, data_dir, image_size)
            sets[f"{domain}_{split_key}"], counts[f"{domain}_{split_key}"] = dataset.cache(), count
            class_names = class_names or names
    class_names = class_names or [str(i) for i in range(10)]
    return _bundle(sets["source_train"], sets["source_test"], sets["target_train"], sets["target_test"],
                   counts, class_names, image_size, batch_size, seed, target_as_source)
