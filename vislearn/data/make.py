"""Datasets the project makes from real pixels that installed packages ship.

Each maker writes a standard on-disk format that the ordinary loaders read
back, so bundled recipes exercise the same code a user's data goes through.
`MAKERS` maps the names `vislearn data make NAME` accepts to these functions.
"""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def default_data_home():
    """Where derived sets are made on first use: $VISLEARN_DATA or ~/.cache/vislearn."""
    return Path(os.environ.get("VISLEARN_DATA", Path.home() / ".cache" / "vislearn"))


def photo_collection():
    """Real colour photos shipped by scikit-image and scikit-learn (no network)."""
    import warnings

    import skimage.data
    from sklearn.datasets import load_sample_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                  skimage.data.rocket(), skimage.data.immunohistochemistry(),
                  skimage.data.hubble_deep_field(), skimage.data.retina()]
        photos += list(load_sample_images().images)
    return [np.asarray(p[..., :3], dtype=np.uint8) for p in photos]


def random_crop(photo, size, rng):
    h, w = photo.shape[:2]
    y = rng.integers(0, h - size + 1)
    x = rng.integers(0, w - size + 1)
    return photo[y:y + size, x:x + size]


def sklearn_digits_28():
    """scikit-learn's 1,797 real handwritten digits as 28x28 uint8, MNIST-style
    (the 8x8 digit scaled to a 20x20 box and centred with a 4-pixel margin)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.zeros((len(digits.images), 28, 28), dtype=np.uint8)
    for i, small in enumerate(digits.images):
        img = Image.fromarray((small / 16.0 * 255).astype(np.uint8)).resize((20, 20), Image.BICUBIC)
        images[i, 4:24, 4:24] = np.asarray(img)
    return images, digits.target.astype(np.int64)


def _write_class_folders(root, images, labels, indices):
    for i in indices:
        folder = Path(root) / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


def make_digits_m(out, seed=0, test_fraction=0.3, target_copies=1):
    """digits -> digits-M, the small-scale MNIST -> MNIST-M of the DANN paper.

    Source: the real handwritten digits as 28x28 RGB (grey replicated).
    Target: each digit blended over a random crop of a real colour photo as
    |photo - digit| per channel, the MNIST-M construction.
    Both are split the same way (fixed by `seed`) and written as
    `out/{source,target}/{train,test}/<class>/<index>.png`. With
    `target_copies` > 1 each target training digit is blended over that many
    different crops (MNIST-M draws a fresh crop per image; more crops give the
    domain classifier more of the target's variety).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    digits, labels = sklearn_digits_28()
    order = rng.permutation(len(digits))
    n_test = int(round(len(digits) * test_fraction))
    splits = {"test": order[:n_test], "train": order[n_test:]}

    source = np.repeat(digits[..., None], 3, axis=-1)
    photos = photo_collection()
    target = np.empty_like(source)
    for i, digit in enumerate(source):
        patch = random_crop(photos[rng.integers(len(photos))], 28, rng).astype(np.int16)
        target[i] = np.abs(patch - digit.astype(np.int16)).astype(np.uint8)

    for domain, images in (("source", source), ("target", target)):
        for split, indices in splits.items():
            _write_class_folders(out / domain / split, images, labels, indices)
    for copy in range(1, target_copies):
        for i in splits["train"]:
            patch = random_crop(photos[rng.integers(len(photos))], 28, rng).astype(np.int16)
            blended = np.abs(patch - source[i].astype(np.int16)).astype(np.uint8)
            Image.fromarray(blended).save(out / "target" / "train" / str(int(labels[i])) / f"{i:05d}_{copy}.png")
    info = {"name": "digits_m", "seed": seed, "classes": [str(c) for c in range(10)],
            "train": len(splits["train"]), "test": len(splits["test"]), "target_copies": target_copies,
            "layout": "{source,target}/{train,test}/<class>/<index>.png"}
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return out


def make_digits_folders(out, seed=0, test_fraction=0.3, image_size=32):
    """scikit-learn's real handwritten digits as class-per-folder RGB PNGs.

    Each 8x8 digit is upsampled (bicubic) into a centred box three quarters of
    `image_size` wide, grey replicated to RGB, and the set is split (fixed by
    `seed`) into `out/{train,test}/<class>/<index>.png`. Self-supervised
    recipes pretrain on `train/` without its labels; the labels serve only the
    linear probe / kNN evaluation (train/ to fit, test/ to score).
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    box = int(round(image_size * 0.75))
    margin = (image_size - box) // 2
    images = np.zeros((len(digits.images), image_size, image_size, 3), dtype=np.uint8)
    for i, small in enumerate(digits.images):
        img = Image.fromarray((small / 16.0 * 255).astype(np.uint8)).resize((box, box), Image.BICUBIC)
        images[i, margin:margin + box, margin:margin + box] = np.asarray(img)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    splits = {"test": order[:n_test], "train": order[n_test:]}
    for split, indices in splits.items():
        _write_class_folders(out / split, images, labels, indices)
    info = {"name": "digits_folders", "seed": seed, "classes": [str(c) for c in range(10)],
            "image_size": image_size, "train": len(splits["train"]), "test": len(splits["test"]),
            "layout": "{train,test}/<class>/<index>.png"}
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return out


from vislearn.data.captioned_shapes import make_captioned_shapes  # noqa: E402 (reads photo_collection lazily)
from vislearn.data.shapes import make_shapes_on_photos  # noqa: E402 (shapes reads photo_collection lazily)

MAKERS = {
    "digits_m": make_digits_m,
    "digits_folders": make_digits_folders,
    "shapes_on_photos": make_shapes_on_photos,
    "captioned_shapes": make_captioned_shapes,
}
