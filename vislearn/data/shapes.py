"""Shapes on photos: a small real-background detection set in COCO, VOC or YOLO format.

Coloured geometric shapes of five classes and many sizes are composited onto
random crops of real photos (`photo_collection()`), later shapes partly
hiding earlier ones and some reaching over the image border. Each box is the
tight box of the object's *visible* pixels (the VOC convention), and a shape
is only placed where it leaves every earlier shape at least half visible, so
every annotated object can be seen.
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vislearn.config import ConfigError

SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross"]
FORMATS = ("coco", "voc", "yolo")
SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled for antialiased edges


def _polygon(kind, center, radius, angle):
    """Vertices of a shape (other than the circle) around `center`."""
    cx, cy = center

    def ring(count, radii, start):
        return [(cx + r * math.cos(start + 2 * math.pi * k / count),
                 cy + r * math.sin(start + 2 * math.pi * k / count)) for k, r in enumerate(radii)]

    if kind == "square":
        return ring(4, [radius] * 4, angle + math.pi / 4)
    if kind == "triangle":
        return ring(3, [radius] * 3, angle - math.pi / 2)
    if kind == "star":
        return ring(10, [radius, radius * 0.45] * 5, angle - math.pi / 2)
    if kind == "cross":  # a plus sign of arm half-width radius/3, rotated by `angle`
        a = radius / 3
        outline = [(a, radius), (a, a), (radius, a), (radius, -a), (a, -a), (a, -radius),
                   (-a, -radius), (-a, -a), (-radius, -a), (-radius, a), (-a, a), (-a, radius)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]
    raise ValueError(kind)


def _shape_alpha(kind, center, radius, angle, size):
    """Antialiased coverage [size, size] in [0, 1] of one shape."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    center = (center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE)
    radius = radius * SUPERSAMPLE
    if kind == "circle":
        draw.ellipse([center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius], fill=255)
    else:
        draw.polygon(_polygon(kind, center, radius, angle), fill=255)
    canvas = canvas.resize((size, size), Image.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _random_colour(rng):
    """A saturated colour, so shapes differ from most photo regions."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255


def _background(photos, size, rng):
    """A random square crop of a random photo, of random scale, resized to `size`."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(size, h, w), min(h, w) + 1))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)


def make_shapes_image(photos, size, rng, max_objects=4, min_radius_fraction=0.06, max_radius_fraction=0.25,
                      min_visible=0.5):
    """One image and its objects.

    Returns:
        (uint8 image [size, size, 3], list of objects), each object a dict with
        `class` (index into `SHAPE_CLASSES`), `box` (`rel_yxyx` of the visible
        pixels), `truncated` (reaches over the border) and `occluded` (less
        than 95% of it visible).
    """
    image = _background(photos, size, rng)
    visible_masks, full_areas, placed = [], [], []
    target = int(rng.integers(1, max_objects + 1))
    for _ in range(target * 10):  # placement attempts; give up quietly on crowded images
        if len(placed) == target:
            break
        kind = int(rng.integers(len(SHAPE_CLASSES)))
        radius = size * rng.uniform(min_radius_fraction, max_radius_fraction)
        center = rng.uniform(-0.3 * radius, size + 0.3 * radius, size=2)
        alpha = _shape_alpha(SHAPE_CLASSES[kind], center, radius, rng.uniform(0, 2 * math.pi), size)
        mask = alpha > 0.5
        if mask.sum() < 30:  # mostly outside the frame: nothing worth annotating
            continue
        if any((visible & ~mask).sum() < min_visible * full for visible, full in zip(visible_masks, full_areas)):
            continue  # would hide too much of an earlier shape
        colour = _random_colour(rng)
        # A linear shading across the shape, so colour alone is not a constant.
        ramp = np.linspace(0.75, 1.15, size, dtype=np.float32)
        shade = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        fill = np.clip(colour[None, None, :] * shade[..., None], 0, 255)
        image = image * (1 - alpha[..., None]) + fill * alpha[..., None]
        visible_masks = [visible & ~mask for visible in visible_masks] + [mask]
        full_areas.append(mask.sum())
        truncated = bool(center.min() - radius < 0 or center.max() + radius > size)
        placed.append((kind, truncated))

    objects = []
    for (kind, truncated), visible, full in zip(placed, visible_masks, full_areas):
        rows, cols = np.nonzero(visible.any(axis=1))[0], np.nonzero(visible.any(axis=0))[0]
        box = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=np.float64) / size
        objects.append({"class": kind, "box": box, "truncated": truncated,
                        "occluded": bool(visible.sum() < 0.95 * full)})
    return np.clip(image, 0, 255).astype(np.uint8), objects


def make_shapes_on_photos(out, seed=0, file_format="coco", n_train=800, n_test=200, image_size=224,
                          max_objects=4, jpeg_quality=90):
    """Write the shapes-on-photos detection set.

    Args:
        out: output folder.
        seed: fixes backgrounds, shapes and splits.
        file_format: `coco`, `voc` or `yolo`. Layouts:
            coco: `train/*.jpg`, `test/*.jpg`, `annotations/instances_{train,test}.json`;
            voc: `JPEGImages/`, `Annotations/`, `ImageSets/Main/{train,test}.txt`, `labels.txt`;
            yolo: `images/{train,test}/`, `labels/{train,test}/`, `data.yaml`
            (`val` and `test` both name the test images).
        n_train: number of training images.
        n_test: number of test images.
        image_size: side of the square images in pixels.
        max_objects: at most this many shapes per image (at least one).
        jpeg_quality: JPEG quality of the written images.

    Returns:
        `out` as a `Path`; `out/dataset.json` records the classes and counts.
    """
    if file_format not in FORMATS:
        raise ConfigError(f"--format: unknown value {file_format!r}; expected one of {list(FORMATS)}")
    if image_size < 32:
        raise ConfigError(f"image_size: expected at least 32 pixels, received {image_size}")
    from vislearn.data.make import photo_collection  # make.py registers this maker, so import late

    out = Path(out)
    rng = np.random.default_rng(seed)
    photos = photo_collection()
    splits = {}
    for split, count in (("train", n_train), ("test", n_test)):
        images = []
        for index in range(count):
            pixels, objects = make_shapes_image(photos, image_size, rng, max_objects)
            images.append({
                "file_name": f"{split}_{index:05d}.jpg", "pixels": pixels,
                "height": image_size, "width": image_size,
                "boxes": np.array([o["box"] for o in objects]).reshape(-1, 4),
                "classes": [o["class"] for o in objects],
                "truncated": [o["truncated"] for o in objects],
                "occluded": [o["occluded"] for o in objects],
            })
        splits[split] = images

    if file_format == "coco":
        from vislearn.data.coco import write_coco

        for split, images in splits.items():
            _save_images(out / split, images, jpeg_quality)
            write_coco(out / "annotations" / f"instances_{split}.json", images, SHAPE_CLASSES)
    elif file_format == "voc":
        from vislearn.data.voc import write_voc_annotation

        (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for split, images in splits.items():
            _save_images(out / "JPEGImages", images, jpeg_quality)
            for image in images:
                write_voc_annotation(out / "Annotations" / (Path(image["file_name"]).stem + ".xml"),
                                     image, SHAPE_CLASSES)
            (out / "ImageSets" / "Main" / f"{split}.txt").write_text(
                "".join(Path(image["file_name"]).stem + "\n" for image in images))
        (out / "labels.txt").write_text("".join(name + "\n" for name in SHAPE_CLASSES))
    else:
        from vislearn.data.yolo_txt import write_data_yaml, write_yolo_labels

        for split, images in splits.items():
            _save_images(out / "images" / split, images, jpeg_quality)
            for image in images:
                write_yolo_labels(out / "labels" / split / (Path(image["file_name"]).stem + ".txt"),
                                  image["boxes"], image["classes"])
        write_data_yaml(out / "data.yaml", SHAPE_CLASSES,
                        {"train": "images/train", "val": "images/test", "test": "images/test"})

    info = {"name": "shapes_on_photos", "format": file_format, "seed": seed, "classes": SHAPE_CLASSES,
            "image_size": image_size, "train": n_train, "test": n_test,
            "objects": {split: int(sum(len(i["classes"]) for i in images)) for split, images in splits.items()}}
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return out


def _save_images(folder, images, quality):
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        Image.fromarray(image["pixels"]).save(folder / image["file_name"], quality=quality)
