"""YOLO txt annotations (darknet / Ultralytics layout): read to detection elements, and write.

Layout::

    root/data.yaml             path, train, val, test (image folders), names, nc
    root/images/<split>/*.jpg
    root/labels/<split>/*.txt  one line per box: class x_center y_center width height,
                               all normalised to [0, 1]

A label file sits where its image is, with `images` replaced by `labels` and
the suffix by `.txt`; an image without one has no objects.
"""

from pathlib import Path

import numpy as np
import yaml

from vislearn.config import ConfigError
from vislearn.data.boxes import convert_format
from vislearn.data.detection import AnnotationChecker, DetectionSet, ImageRecord, records_dataset
from vislearn.data.folders import IMAGE_SUFFIXES


def _names_from_yaml(data, path):
    names = data.get("names")
    if isinstance(names, dict):  # Ultralytics: {0: name, 1: name, ...}
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: 'names' keys must be class indices, received {list(names)}") from None
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise ConfigError(f"{path}: 'names' missing (expected a list of class names or an index -> name mapping)")


def label_path_for(image_path):
    """`.../images/<split>/x.jpg` -> `.../labels/<split>/x.txt` (the Ultralytics rule)."""
    parts = list(Path(image_path).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_yolo_txt(data_yaml, split="train", skip_corrupt=False, verify_images=True):
    """Read a YOLO txt split described by a data YAML.

    Args:
        data_yaml: path of the data YAML (`path`, `train`/`val`/`test`, `names`).
        split: the YAML key naming the split's image folder.
        skip_corrupt: skip (and count) missing or undecodable images.
        verify_images: fully decode every image once up front (else headers only).

    Returns:
        `DetectionSet` (see `vislearn.data.detection`); `image_id` is the
        image's index in the sorted folder listing.
    """
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise ConfigError(f"{data_yaml}: YOLO data YAML not found")
    data = yaml.safe_load(data_yaml.read_text()) or {}
    names = _names_from_yaml(data, data_yaml)
    if "nc" in data and int(data["nc"]) != len(names):
        raise ConfigError(f"{data_yaml}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    if split not in data:
        raise ConfigError(f"{data_yaml}: no split {split!r}; expected one of "
                          f"{[k for k in ('train', 'val', 'test') if k in data]}")
    base = Path(data.get("path") or data_yaml.parent)
    if not base.is_absolute():
        base = data_yaml.parent / base
    image_dir = base / data[split]
    if not image_dir.is_dir():
        raise ConfigError(f"{data_yaml}: {split} image folder {image_dir} not found")
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    checker = AnnotationChecker(skip_corrupt, verify_images)
    records = []
    for image_index, image_path in enumerate(image_paths):
        if checker.image_size(image_path, image_dir) is None:
            continue
        label_path = label_path_for(image_path)
        rows = []
        if label_path.is_file():
            for line_number, line in enumerate(label_path.read_text().splitlines(), start=1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    if len(fields) != 5:
                        raise ValueError
                    label, values = int(fields[0]), [float(v) for v in fields[1:]]
                except ValueError:
                    raise ConfigError(f"{label_path}:{line_number}: expected 'class x_center y_center "
                                      f"width height', received {line.strip()!r}") from None
                if not 0 <= label < len(names):
                    raise ConfigError(f"{label_path}:{line_number}: unknown class index {label}; "
                                      f"{data_yaml} names {len(names)} classes (0..{len(names) - 1})")
                rows.append([label, *values])
        rows = np.array(rows, dtype=np.float64).reshape(-1, 5)
        yxyx = convert_format(rows[:, 1:], "rel_center_xywh", "rel_yxyx")
        boxes, keep = checker.boxes(yxyx, label_path)
        records.append(ImageRecord(str(image_path), image_index, boxes, rows[keep, 0].astype(np.int32),
                                   np.zeros(int(keep.sum()), bool)))
    report = checker.report()
    return DetectionSet(records_dataset(records), names, len(records), report)


def write_yolo_labels(path, boxes, classes):
    """Write one label file from `rel_yxyx` boxes and class indices."""
    center = convert_format(np.asarray(boxes, np.float64).reshape(-1, 4), "rel_yxyx", "rel_center_xywh")
    lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, (x, y, w, h) in zip(classes, center)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""))


def write_data_yaml(path, class_names, splits):
    """Write the data YAML.

    `splits` maps a key (`train`, `val`, `test`) to an image folder relative
    to the YAML's folder.
    """
    # No `path` key: readers (vislearn's and Ultralytics') then resolve the
    # split folders against the YAML's own folder, so the set can be moved.
    data = {**splits, "nc": len(class_names), "names": {i: n for i, n in enumerate(class_names)}}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
