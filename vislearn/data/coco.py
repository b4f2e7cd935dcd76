"""COCO JSON object detection annotations: read to detection elements, and write.

The file is COCO's `instances_*.json`: `images` (`id`, `file_name`, `width`,
`height`), `annotations` (`image_id`, `category_id`, `bbox` as pixel
`[x, y, width, height]`, optional `iscrowd`) and `categories` (`id`, `name`).
Class indices follow the categories sorted by id unless `class_names` fixes them.
"""

import json
from pathlib import Path

import numpy as np

from vislearn.config import ConfigError
from vislearn.data.boxes import convert_format
from vislearn.data.detection import (AnnotationChecker, DetectionSet, ImageRecord, read_class_names,
                                     records_dataset)


def _load_json(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConfigError(f"{path}: missing list {key!r} (expected COCO instances JSON with "
                              "'images', 'annotations' and 'categories')")
    return data


def read_coco(annotation_file, image_dir, class_names=None, skip_corrupt=False, verify_images=True):
    """Read a COCO JSON detection split.

    Args:
        annotation_file: path of the `instances_*.json` file.
        image_dir: folder that `images[].file_name` is relative to.
        class_names: optional list (or one-name-a-line file) fixing class
            order; every category name must be in it.
        skip_corrupt: skip (and count) missing or undecodable images instead
            of raising.
        verify_images: fully decode every image once up front; with `False`
            only headers are read (fast on large sets; a truncated file then
            fails during training).

    Returns:
        `DetectionSet` of elements as documented in `vislearn.data.detection`;
        `image_id` is the COCO image id.
    """
    annotation_file = Path(annotation_file)
    data = _load_json(annotation_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = read_class_names(class_names, f"{annotation_file}: class_names")
    if names is None:
        names = [str(c["name"]) for c in categories]
    index_of_category = {}
    for category in categories:
        if str(category["name"]) not in names:
            raise ConfigError(f"{annotation_file}: unknown class name {category['name']!r} "
                              f"(category id {category['id']}); expected one of {names}")
        index_of_category[category["id"]] = names.index(str(category["name"]))

    by_image = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        if annotation.get("category_id") not in index_of_category:
            raise ConfigError(f"{annotation_file}: annotation {annotation.get('id')} has unknown "
                              f"category_id {annotation.get('category_id')!r}; expected one of "
                              f"{sorted(index_of_category)}")
        if annotation.get("image_id") not in by_image:
            raise ConfigError(f"{annotation_file}: annotation {annotation.get('id')} refers to "
                              f"image_id {annotation.get('image_id')!r}, which is not in 'images'")
        by_image[annotation["image_id"]].append(annotation)

    checker = AnnotationChecker(skip_corrupt, verify_images)
    records = []
    for image in data["images"]:
        path = Path(image_dir) / image["file_name"]
        size = checker.image_size(path, annotation_file)
        if size is None:
            continue
        height, width = size
        annotations = by_image[image["id"]]
        pixel_xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        yxyx = convert_format(pixel_xywh, "xywh", "yxyx")
        boxes, keep = checker.boxes(yxyx, f"{annotation_file} (image {image['file_name']})", height, width)
        classes = np.array([index_of_category[a["category_id"]] for a in annotations], np.int32)[keep]
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], bool)[keep]
        records.append(ImageRecord(str(path), int(image["id"]), boxes, classes, crowd))
    report = checker.report()
    return DetectionSet(records_dataset(records), names, len(records), report)


def write_coco(annotation_file, images, class_names):
    """Write a COCO instances JSON.

    Args:
        annotation_file: path to write.
        images: list of dicts with `file_name`, `height`, `width`, `boxes`
            (`rel_yxyx` [N, 4]) and `classes` ([N] indices into `class_names`).
        class_names: category names; category ids are index + 1 (COCO ids
            start at 1).
    """
    out = {"info": {"description": "written by vislearn"}, "licenses": [],
           "images": [], "annotations": [],
           "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(class_names)]}
    annotation_id = 1  # pycocotools treats id 0 as "unmatched", so ids start at 1
    for image_id, image in enumerate(images, start=1):
        out["images"].append({"id": image_id, "file_name": image["file_name"],
                              "height": int(image["height"]), "width": int(image["width"])})
        xywh = convert_format(np.asarray(image["boxes"]).reshape(-1, 4), "rel_yxyx", "xywh",
                              image["height"], image["width"])
        for box, label in zip(xywh, image["classes"]):
            box = [round(float(v), 2) for v in box]
            out["annotations"].append({"id": annotation_id, "image_id": image_id,
                                       "category_id": int(label) + 1, "bbox": box,
                                       "area": round(box[2] * box[3], 2), "iscrowd": 0})
            annotation_id += 1
    Path(annotation_file).parent.mkdir(parents=True, exist_ok=True)
    Path(annotation_file).write_text(json.dumps(out))
