"""Captioned shapes: a small image-caption set in the Karpathy-split JSON layout.

Each image is a crop of a real photo (`photo_collection()`) with one to three
non-overlapping coloured shapes on it; each image gets five captions written
from its scene description with different templates, so they vary the way
human captions of one image do: some name sizes, some count the shapes, some
give spatial relations or the position, some name the photo behind.

Every caption names the colour and kind of every shape, so a caption picks out
few images of a 1,000-image test split and recall@10 is a meaningful target.

Layout (what Flickr30k / COCO users have from Karpathy's splits):
    images/<split>_<index>.jpg
    dataset_captioned_shapes.json: {"dataset": ..., "images": [{"filename",
        "imgid", "split", "sentids", "sentences": [{"raw", "tokens", "imgid",
        "sentid"}]}]}
    dataset.json: what was made (counts, seed, vocabulary of the scenes).
    With `grounding=True` (`vislearn data make captioned_shapes --grounding`),
    also Sentences/<stem>.txt and Annotations/<stem>.xml: each caption's
    shape phrases linked to their boxes in the Flickr30K Entities format
    (`vislearn.data.flickr30k_entities` reads them).
"""

import colorsys
import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from vislearn.config import ConfigError
from vislearn.data.shapes import SHAPE_CLASSES, SUPERSAMPLE, _shape_alpha

# Named hues (degrees): saturation and value vary per shape, the name does not.
COLOURS = {"red": 0, "orange": 30, "yellow": 58, "green": 125, "cyan": 182, "blue": 228, "purple": 278, "pink": 320}
SIZES = {"small": (0.09, 0.13), "large": (0.18, 0.24)}  # radius as a fraction of the image side
# What each photo of `photo_collection()` shows, in its order.
BACKGROUNDS = ["an astronaut", "a cup of coffee", "a cat", "a rocket", "a tissue sample", "galaxies",
               "a retina", "a temple", "a flower"]
NUMBERS = {1: "one", 2: "two", 3: "three"}
JSON_NAME = "dataset_captioned_shapes.json"


def _scene(photos, size, rng, max_objects):
    """Draw one scene; returns (uint8 image, scene description dict)."""
    photo_index = int(rng.integers(len(photos)))
    photo = photos[photo_index]
    h, w = photo.shape[:2]
    # Large crops, so the photo's subject stays recognisable behind the shapes.
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    image = np.asarray(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR),
                       dtype=np.float32)
    objects = []
    target = int(rng.integers(1, max_objects + 1))
    for _ in range(50):  # rejection sampling of non-overlapping placements
        if len(objects) == target:
            break
        size_name = ["small", "large"][int(rng.integers(2))]
        radius = size * rng.uniform(*SIZES[size_name])
        center = rng.uniform(radius, size - radius, size=2)
        if any(np.hypot(*(center - o["center"])) < radius + o["radius"] + 1 for o in objects):
            continue
        objects.append({"shape": SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))],
                        "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                        "size": size_name, "center": center, "radius": radius})
    for obj in objects:
        alpha = _shape_alpha(obj["shape"], obj["center"], obj["radius"], rng.uniform(0, 2 * math.pi), size)
        obj["box"] = _covered_box(alpha)
        hue = (COLOURS[obj["colour"]] + rng.uniform(-8, 8)) % 360 / 360
        rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)), np.float32) * 255
        image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
    scene = {"background": BACKGROUNDS[photo_index], "objects": objects, "size": size}
    return np.clip(image, 0, 255).astype(np.uint8), scene


def _covered_box(alpha):
    """1-based inclusive pixel box (xmin, ymin, xmax, ymax) of the pixels a shape covers at least half."""
    rows, cols = np.flatnonzero((alpha >= 0.5).any(axis=1)), np.flatnonzero((alpha >= 0.5).any(axis=0))
    if not len(rows):  # a shape too thin to cover any pixel half: its brightest pixel
        rows, cols = np.unravel_index(np.argmax(alpha), alpha.shape)
        rows, cols = np.atleast_1d(rows), np.atleast_1d(cols)
    return int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1


def _name(obj, with_size=False):
    return f"{obj['size']} {obj['colour']} {obj['shape']}" if with_size else f"{obj['colour']} {obj['shape']}"


def _a(name):
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _listing(names):
    names = [_a(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _relation(a, b):
    """How `a` lies relative to `b`, in image coordinates (x right, y down)."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _position(obj, size):
    col = ["left", "middle", "right"][min(int(obj["center"][0] / size * 3), 2)]
    row = ["top", "middle", "bottom"][min(int(obj["center"][1] / size * 3), 2)]
    if row == col == "middle":
        return "in the centre"
    return f"in the {row} {col}" if "middle" not in (row, col) else f"in the {row if col == 'middle' else col}"


def captions_of(scene, rng):
    """Five different captions of one scene (templates in random order)."""
    objects, background = scene["objects"], scene["background"]
    picture = ["picture", "photo", "image"][int(rng.integers(3))]
    a_picture = f"an {picture}" if picture == "image" else f"a {picture}"
    count = len(objects)

    def full():
        return f"{_listing([_name(o, True) for o in objects])} on {a_picture} of {background}"

    def counted():
        things = "shape" if count == 1 else "shapes"
        return f"{NUMBERS[count]} {things}: {_listing([_name(o) for o in objects])}"

    def spatial():
        if count == 1:
            return f"{_a(_name(objects[0]))} {_position(objects[0], scene['size'])} of the {picture}"
        parts = [f"{_a(_name(a))} {_relation(a, b)} {_a(_name(b))}" for a, b in zip(objects, objects[1:])]
        return " and ".join(parts)

    def terse():
        return ", ".join(_name(o, True) for o in objects)

    def background_first():
        return f"{background} behind {_listing([_name(o) for o in objects])}"

    templates = [full, counted, spatial, terse, background_first]
    return [templates[i]() for i in rng.permutation(len(templates))]


def grounding_markup(scene, captions, first_entity):
    """Flickr30K Entities markup of one scene's captions.

    Shapes of one colour and kind are one entity (type `shape`; several
    boxes when the scene repeats it); a phrase is the article, the optional
    size and `colour kind`. The photo behind is an entity of type `scene`
    without a box.

    Returns:
        (marked-up captions, {entity id: [box, ...]}, scene entity id).
    """
    groups = {}
    for obj in scene["objects"]:
        groups.setdefault((obj["colour"], obj["shape"]), []).append(obj["box"])
    entities, patterns = {}, []
    for number, ((colour, shape), boxes) in enumerate(groups.items(), first_entity):
        entities[str(number)] = boxes
        patterns.append((str(number), "shape", rf"\b(?:an? )?(?:(?:{'|'.join(SIZES)}) )?{colour} {shape}\b"))
    scene_entity = str(first_entity + len(groups))
    patterns.append((scene_entity, "scene", rf"\b{re.escape(scene['background'])}\b"))
    marked = []
    for caption in captions:
        found = sorted((m.start(), m.end(), entity, kind) for entity, kind, pattern in patterns
                       for m in re.finditer(pattern, caption))
        out, position = [], 0
        for start, end, entity, kind in found:
            if start >= position:  # patterns never overlap; keep the first if they ever do
                out += [caption[position:start], f"[/EN#{entity}/{kind} {caption[start:end]}]"]
                position = end
        marked.append("".join(out) + caption[position:])
    return marked, entities, scene_entity


def _write_grounding(out, stem, size, marked, entities, scene_entity):
    """Sentences/<stem>.txt and Annotations/<stem>.xml (Flickr30K Entities format)."""
    (out / "Sentences" / f"{stem}.txt").write_text("\n".join(marked) + "\n")
    objects = [f"  <object>\n    <name>{entity}</name>\n    <bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
               f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>\n  </object>"
               for entity, boxes in entities.items() for box in boxes]
    objects.append(f"  <object>\n    <name>{scene_entity}</name>\n    <nobndbox>1</nobndbox>\n"
                   f"    <scene>1</scene>\n  </object>")
    (out / "Annotations" / f"{stem}.xml").write_text(
        f"<annotation>\n  <filename>{stem}.jpg</filename>\n  <size><width>{size}</width><height>{size}</height>"
        f"<depth>3</depth></size>\n" + "\n".join(objects) + "\n</annotation>\n")


def tokenize(text):
    """Karpathy's `tokens`: lower-cased words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def make_captioned_shapes(out, seed=0, n_train=4000, n_val=500, n_test=1000, image_size=64, max_objects=3,
                          jpeg_quality=92, grounding=False):
    """Write the captioned-shapes set (JPEGs + Karpathy-split JSON).

    Args:
        out: output folder.
        seed: fixes scenes, captions and splits.
        n_train, n_val, n_test: images per split (the test split is the
            1,000-image retrieval benchmark at the default size).
        image_size: side of the square images in pixels (at least 32).
        max_objects: 1 to 3 shapes per image.
        jpeg_quality: JPEG quality of the written images.
        grounding: also write phrase -> box annotations in the Flickr30K
            Entities format (`Sentences/<stem>.txt`, `Annotations/<stem>.xml`,
            see `grounding_markup`); the images and captions are the same.

    Returns:
        `out` as a `Path`.
    """
    if image_size < 32:
        raise ConfigError(f"image_size: expected at least 32 pixels, received {image_size}")
    if not 1 <= max_objects <= 3:
        raise ConfigError(f"max_objects: expected 1 to 3, received {max_objects}")
    from vislearn.data.make import photo_collection  # make.py registers this maker, so import late

    photos = photo_collection()
    if len(photos) != len(BACKGROUNDS):
        raise RuntimeError(f"photo_collection() returned {len(photos)} photos; BACKGROUNDS names {len(BACKGROUNDS)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if grounding:
        (out / "Sentences").mkdir(exist_ok=True)
        (out / "Annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    records, sentence_id = [], 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for index in range(count):
            pixels, scene = _scene(photos, image_size, rng, max_objects)
            filename = f"{split}_{index:05d}.jpg"
            Image.fromarray(pixels).save(out / "images" / filename, quality=jpeg_quality)
            image_id = len(records)
            captions = captions_of(scene, rng)
            sentences = [{"raw": raw, "tokens": tokenize(raw), "imgid": image_id, "sentid": sentence_id + i}
                         for i, raw in enumerate(captions)]
            if grounding:
                marked, entities, scene_entity = grounding_markup(scene, captions, first_entity=10 * image_id + 1)
                _write_grounding(out, Path(filename).stem, image_size, marked, entities, scene_entity)
            sentence_id += len(sentences)
            records.append({"filename": filename, "imgid": image_id, "split": split,
                            "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    (out / JSON_NAME).write_text(json.dumps({"dataset": "captioned_shapes", "images": records}))
    info = {"name": "captioned_shapes", "seed": seed, "image_size": image_size, "max_objects": max_objects,
            "train": n_train, "val": n_val, "test": n_test, "captions_per_image": 5,
            "annotations": JSON_NAME, "images": "images/", "colours": list(COLOURS), "shapes": SHAPE_CLASSES,
            "sizes": list(SIZES), "backgrounds": BACKGROUNDS, "supersample": SUPERSAMPLE}
    if grounding:
        info["grounding"] = {"format": "flickr30k_entities", "sentences": "Sentences/", "annotations": "Annotations/"}
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return out
