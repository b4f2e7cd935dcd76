"""Reader for the Flickr30K Entities format (region-phrase correspondences).

Layout (as released by Plummer et al.; `vislearn data make captioned_shapes
--grounding` writes the same):

    Sentences/<image id>.txt: one caption per line, phrases marked up as
        `[/EN#<entity id>/<type>[/<type>...] words of the phrase]`, e.g.
        `[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up ...`
    Annotations/<image id>.xml: PASCAL-VOC-like; `<size>` and one `<object>`
        per box, whose `<name>` elements are the entity ids it belongs to
        (one entity may have several boxes, one box several entities); an
        object with `<nobndbox>1</nobndbox>` (scenes, non-visual entities)
        has no box.

Boxes are returned in pixel-edge `xyxy` coordinates: the file's 1-based
inclusive pixel indices `xmin..xmax` become `(xmin - 1, ymin - 1, xmax, ymax)`,
so width is `xmax - xmin + 1` pixels, as in the file.

Reference:
    Plummer et al., "Flickr30k Entities: Collecting Region-to-Phrase
    Correspondences for Richer Image-to-Sentence Models", ICCV 2015.
"""

import dataclasses
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from vislearn.config import ConfigError

# `[/EN#12/people/other words]`: entity id, types, phrase words.
PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s/\]]+)+) ([^\[\]]+)\]")


@dataclasses.dataclass
class Phrase:
    text: str           # the phrase's words
    entity: str         # entity id (the `<name>` of its boxes)
    types: list         # e.g. ["people"], ["clothing", "bodyparts"]
    first_word: int     # index of its first word in the sentence's words


@dataclasses.dataclass
class EntitySentence:
    text: str           # the caption without markup
    phrases: list       # [Phrase, ...] in sentence order


@dataclasses.dataclass
class EntityImage:
    image_id: str
    width: int
    height: int
    sentences: list     # [EntitySentence, ...]
    boxes: dict         # entity id -> float [n, 4] pixel-edge xyxy (n >= 1)
    no_box: set         # entity ids annotated without a box (scene, notvisual)

    def phrase_boxes(self, phrase):
        """The phrase's boxes [n, 4] (n = 0 when its entity has none)."""
        return self.boxes.get(phrase.entity, np.zeros((0, 4), np.float32))


def parse_sentence(line, where="sentence"):
    """One marked-up caption -> `EntitySentence`.

    Raises:
        ConfigError naming `where` when a bracket is unbalanced or a `[...]`
        is not `[/EN#<id>/<type> words]`.
    """
    words, phrases, position = [], [], 0
    for match in PHRASE.finditer(line):
        words += _plain_words(line[position:match.start()], where)
        entity, types, text = match.group(1), match.group(2).strip("/").split("/"), match.group(3).strip()
        phrases.append(Phrase(text=text, entity=entity, types=types, first_word=len(words)))
        words += text.split()
        position = match.end()
    _plain_words(line[position:], where)
    return EntitySentence(text=" ".join(PHRASE.sub(lambda m: m.group(3), line).split()), phrases=phrases)


def _plain_words(text, where):
    if "[" in text or "]" in text:
        bad = text[text.find("[") if "[" in text else text.find("]"):][:40]
        raise ConfigError(f"{where}: malformed entity markup near {bad!r}; "
                          "expected [/EN#<id>/<type> words of the phrase]")
    return text.split()


def read_sentences(path):
    """Sentences/<id>.txt -> [EntitySentence, ...] (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read sentences ({error})") from None
    return [parse_sentence(line, f"{path}: line {n}") for n, line in enumerate(lines, 1) if line.strip()]


def read_annotation(path):
    """Annotations/<id>.xml -> (width, height, {entity: boxes [n, 4]}, {entities without a box})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: annotation file not found")
    try:
        root = ElementTree.parse(path).getroot()
        width, height = (int(root.find(f"size/{key}").text) for key in ("width", "height"))
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
        raise ConfigError(f"{path}: not a Flickr30K Entities annotation (expected XML with <size><width>"
                          f"<height> and <object>s; {error})") from None
    boxes, no_box = {}, set()
    for index, obj in enumerate(root.findall("object")):
        names = [name.text.strip() for name in obj.findall("name") if name.text and name.text.strip()]
        if not names:
            raise ConfigError(f"{path}: object {index}: no <name> (the entity id)")
        box = obj.find("bndbox")
        if box is None:
            no_box.update(names)
            continue
        try:
            xmin, ymin, xmax, ymax = (float(box.find(key).text) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"{path}: object {index} (entity {names[0]}): <bndbox> needs numeric "
                              "<xmin> <ymin> <xmax> <ymax>") from None
        for name in names:
            boxes.setdefault(name, []).append((xmin - 1, ymin - 1, xmax, ymax))
    boxes = {name: np.asarray(b, np.float32) for name, b in boxes.items()}
    return width, height, boxes, no_box - set(boxes)


def read_flickr30k_entities(root, image_ids=None):
    """Read `root/Sentences/*.txt` with their `root/Annotations/*.xml`.

    Args:
        root: folder holding `Sentences/` and `Annotations/`.
        image_ids: ids to read (e.g. a split's); default every sentence file's.

    Returns:
        [EntityImage, ...] in id order (or `image_ids` order).

    Raises:
        ConfigError naming the file: a missing folder, sentence file or
        annotation, malformed markup or XML.
    """
    root = Path(root)
    sentences_dir, annotations_dir = root / "Sentences", root / "Annotations"
    for folder in (sentences_dir, annotations_dir):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not found (expected Flickr30K Entities' Sentences/ and Annotations/)")
    ids = sorted(p.stem for p in sentences_dir.glob("*.txt")) if image_ids is None else [str(i) for i in image_ids]
    images = []
    for image_id in ids:
        sentence_file = sentences_dir / f"{image_id}.txt"
        if not sentence_file.is_file():
            raise ConfigError(f"{sentence_file}: sentence file not found")
        width, height, boxes, no_box = read_annotation(annotations_dir / f"{image_id}.xml")
        images.append(EntityImage(image_id=image_id, width=width, height=height,
                                  sentences=read_sentences(sentence_file), boxes=boxes, no_box=no_box))
    return images
