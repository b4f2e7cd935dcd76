"""Pascal VOC XML object detection annotations: read to detection elements, and write.

Layout (as in VOCdevkit/VOC2007)::

    root/Annotations/<id>.xml        one <object> per box: <name>, <difficult>, <bndbox>
    root/JPEGImages/<id>.jpg
    root/ImageSets/Main/<split>.txt  one <id> per line

VOC pixel coordinates are 1-based and inclusive: a box covering pixel columns
c0..c1 (0-based) is written `xmin = c0 + 1, xmax = c1 + 1`, i.e. the continuous
extent `[xmin - 1, xmax]`, which is how vislearn reads and writes them.
"""

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from vislearn.config import ConfigError
from vislearn.data.detection import (AnnotationChecker, DetectionSet, ImageRecord, read_class_names,
                                     records_dataset)

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def _text(element, tag, where, default=None):
    found = element.find(tag)
    if found is None or found.text is None:
        if default is not None:
            return default
        raise ConfigError(f"{where}: missing <{tag}>")
    return found.text.strip()


def _number(element, tag, where):
    value = _text(element, tag, where)
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: <{tag}> is {value!r}, expected a number") from None


def read_voc(root, split="train", class_names=None, skip_corrupt=False, verify_images=True):
    """Read a Pascal VOC split.

    Args:
        root: the folder holding `Annotations`, `JPEGImages`, `ImageSets/Main`.
        split: name of the list in `ImageSets/Main` (`train`, `val`, `trainval`, `test`).
        class_names: list (or one-name-a-line file) fixing class order. By
            default `root/labels.txt` when present, else the 20 VOC classes.
            An object whose name is not in it is an error naming the file.
        skip_corrupt: skip (and count) missing or undecodable images.
        verify_images: fully decode every image once up front (else headers only).

    Returns:
        `DetectionSet` (see `vislearn.data.detection`); `image_id` is the
        line number in the split list.
    """
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise ConfigError(f"{split_file}: VOC split list not found; splits present: {available or 'none'} "
                          "(expected <root>/ImageSets/Main/<split>.txt)")
    if class_names is None:
        class_names = root / "labels.txt" if (root / "labels.txt").is_file() else VOC_CLASSES
    names = read_class_names(class_names, f"{root}: class_names")
    index_of = {n: i for i, n in enumerate(names)}

    checker = AnnotationChecker(skip_corrupt, verify_images)
    records = []
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    for image_index, image_name in enumerate(ids):
        xml_path = root / "Annotations" / f"{image_name}.xml"
        if not xml_path.is_file():
            raise ConfigError(f"{xml_path}: annotation file not found (listed in {split_file})")
        try:
            tree = ElementTree.parse(xml_path).getroot()
        except ElementTree.ParseError as error:
            raise ConfigError(f"{xml_path}: not valid XML ({error})") from None
        file_name = _text(tree, "filename", xml_path, default=f"{image_name}.jpg")
        size = checker.image_size(root / "JPEGImages" / file_name, xml_path)
        if size is None:
            continue
        height, width = size
        boxes, classes, difficult = [], [], []
        for obj in tree.findall("object"):
            name = _text(obj, "name", xml_path)
            if name not in index_of:
                raise ConfigError(f"{xml_path}: unknown class name {name!r}; expected one of {names}")
            box = obj.find("bndbox")
            if box is None:
                raise ConfigError(f"{xml_path}: object {name!r} has no <bndbox>")
            xmin, ymin, xmax, ymax = (_number(box, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([ymin - 1, xmin - 1, ymax, xmax])
            classes.append(index_of[name])
            difficult.append(_text(obj, "difficult", xml_path, default="0") == "1")
        boxes, keep = checker.boxes(np.array(boxes).reshape(-1, 4), xml_path, height, width)
        records.append(ImageRecord(str(root / "JPEGImages" / file_name), image_index, boxes,
                                   np.array(classes, np.int32)[keep], np.array(difficult, bool)[keep]))
    report = checker.report()
    return DetectionSet(records_dataset(records), names, len(records), report)


def write_voc_annotation(path, image, class_names, folder="vislearn"):
    """Write one VOC XML file.

    Args:
        path: the `.xml` path.
        image: dict with `file_name`, `height`, `width`, `boxes` (`rel_yxyx`),
            `classes`, and optional per-box `truncated`, `occluded`, `difficult`.
        class_names: names the class indices refer to.
    """
    height, width = int(image["height"]), int(image["width"])
    annotation = ElementTree.Element("annotation")
    ElementTree.SubElement(annotation, "folder").text = folder
    ElementTree.SubElement(annotation, "filename").text = image["file_name"]
    size = ElementTree.SubElement(annotation, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(size, tag).text = str(value)
    ElementTree.SubElement(annotation, "segmented").text = "0"
    count = len(image["classes"])
    for i, (box, label) in enumerate(zip(np.asarray(image["boxes"]).reshape(-1, 4), image["classes"])):
        obj = ElementTree.SubElement(annotation, "object")
        ElementTree.SubElement(obj, "name").text = class_names[int(label)]
        ElementTree.SubElement(obj, "pose").text = "Unspecified"
        for flag in ("truncated", "occluded", "difficult"):
            values = image.get(flag, [0] * count)
            ElementTree.SubElement(obj, flag).text = str(int(bool(values[i])))
        ymin, xmin, ymax, xmax = box * [height, width, height, width]
        bndbox = ElementTree.SubElement(obj, "bndbox")
        # Continuous [x0, x1] -> VOC's 1-based inclusive pixel indices.
        for tag, value in (("xmin", xmin + 1), ("ymin", ymin + 1), ("xmax", xmax), ("ymax", ymax)):
            ElementTree.SubElement(bndbox, tag).text = str(int(round(value)))
    ElementTree.indent(annotation)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ElementTree.ElementTree(annotation).write(path, encoding="utf-8")
