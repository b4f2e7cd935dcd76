"""Region-phrase grounding with a two-branch image-text model.

For each phrase of a caption, every candidate box of its image is cropped,
resized to the model's input and embedded by the image branch; the phrase is
embedded by the text branch; the best-scoring box is the model's answer
(cosine for the embedding network `TwoBranch`, the similarity head's logit
for `TwoBranchSimilarity`). Candidates are the image's ground-truth boxes
(every annotated box, of every entity) or a detector's output.

`grounding_accuracy`: fraction of phrases (whose entity has a box) whose
chosen box overlaps the phrase's ground truth with IoU >= 0.5. A phrase with
several boxes counts as found when the chosen box matches any of them
(`protocol="any"`), or their union box (`protocol="merged"`, Plummer et al.).

Reference:
    Wang, Li, Huang, Lazebnik, "Learning Two-Branch Neural Networks for
    Image-Text Matching Tasks", TPAMI 2018 (section 4.3, phrase localization);
    Plummer et al., "Flickr30k Entities", ICCV 2015 (the protocol).
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

from vislearn.config import ConfigError
from vislearn.data.boxes import convert_format, iou

PROTOCOLS = ("any", "merged")


def _truth(boxes, protocol):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if protocol == "merged" and len(boxes):
        return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)])[None]
    return boxes


def box_hits(predicted, truths, threshold=0.5, protocol="any"):
    """Per phrase, whether its predicted `xyxy` box has IoU >= `threshold` with its truth.

    Args:
        predicted: [n, 4] one box per phrase.
        truths: n arrays [m_i, 4] (m_i >= 1), the phrase's ground-truth boxes.
        protocol: `"any"` (any of the boxes) or `"merged"` (their union box).

    Returns:
        bool [n].
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, received {protocol!r}")
    predicted = np.asarray(predicted, np.float64).reshape(-1, 4)
    if len(predicted) != len(truths):
        raise ValueError(f"expected one truth per predicted box, received {len(predicted)} boxes "
                         f"and {len(truths)} truths")
    hits = []
    for box, truth in zip(predicted, truths):
        truth = _truth(truth, protocol)
        if not len(truth):
            raise ValueError("a phrase without a ground-truth box cannot be scored; leave it out")
        hits.append(bool(iou(convert_format(box[None], "xyxy", "yxyx"),
                             convert_format(truth, "xyxy", "yxyx")).max() >= threshold))
    return np.array(hits, bool)


def grounding_accuracy(predicted, truths, threshold=0.5, protocol="any"):
    """Fraction of phrases whose predicted box is right (`box_hits`); 0 for no phrases."""
    hits = box_hits(predicted, truths, threshold, protocol)
    return float(hits.mean()) if len(hits) else 0.0


def crop_boxes(image, boxes, size):
    """Crops of `xyxy` pixel-edge boxes of one float image [H, W, C], resized to `size` (h, w)."""
    height, width = image.shape[:2]
    normalised = convert_format(np.asarray(boxes, np.float32).reshape(-1, 4), "xyxy", "rel_yxyx",
                                height=height, width=width)
    return tf.image.crop_and_resize(tf.convert_to_tensor(image, tf.float32)[None], normalised.astype(np.float32),
                                    tf.zeros(len(normalised), tf.int32), list(size))


def phrase_box_scores(model, crops, phrases):
    """[n_phrases, n_boxes] scores of phrases against box crops (higher: better)."""
    image_embeddings = np.asarray(model.embed_image(crops, training=False))
    text_embeddings = np.asarray(model.embed_text(tf.constant(list(phrases)), training=False))
    if hasattr(model, "score_matrix"):  # a similarity network scores pairs
        return model.score_matrix(image_embeddings, text_embeddings).T
    return text_embeddings @ image_embeddings.T


def load_image(path):
    """float32 [H, W, 3] in [0, 1]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: image file not found")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float32) / 255.0


def grounding_metrics(model, images, image_dir, candidates=None, threshold=0.5, protocol="any",
                      image_suffix=".jpg"):
    """Ground every phrase with a box of `images` and score the choices.

    Args:
        model: a two-branch model (`embed_image`, `embed_text`; `image_shape`).
        images: `EntityImage`s (`vislearn.data.flickr30k_entities`).
        image_dir: folder of `<image id><image_suffix>`.
        candidates: None for every ground-truth box of the image, or
            {image id: [n, 4] `xyxy` pixel boxes} (e.g. `detector_candidates`).
        threshold, protocol: see `box_hits`.

    Returns:
        `grounding_accuracy`; `grounding_phrases` (scored), and
        `grounding_phrases_without_box` (left out); `grounding_chance` (the
        accuracy of a uniformly random candidate) and `grounding_upper_bound`
        (phrases some candidate matches), both meaningful with detections.
    """
    predicted, truths, chance, reachable, without_box = [], [], [], [], 0
    size = tuple(model.image_shape[:2])
    for record in images:
        phrases = [p for s in record.sentences for p in s.phrases]
        boxed = [p for p in phrases if p.entity in record.boxes]
        without_box += len(phrases) - len(boxed)
        if not boxed:
            continue
        if candidates is None:
            boxes = np.unique(np.concatenate(list(record.boxes.values())), axis=0)
        else:
            boxes = np.asarray(candidates.get(record.image_id, np.zeros((0, 4))), np.float32).reshape(-1, 4)
        phrase_truths = [record.boxes[p.entity] for p in boxed]
        if not len(boxes):  # no candidate: every phrase of the image is missed
            predicted += [np.zeros(4)] * len(boxed)
            truths += phrase_truths
            chance += [0.0] * len(boxed)
            reachable += [False] * len(boxed)
            continue
        pixels = load_image(Path(image_dir) / f"{record.image_id}{image_suffix}")
        if pixels.shape[:2] != (record.height, record.width):
            raise ConfigError(f"{Path(image_dir) / (record.image_id + image_suffix)}: image is "
                              f"{pixels.shape[1]}x{pixels.shape[0]}, its annotation says "
                              f"{record.width}x{record.height}")
        scores = phrase_box_scores(model, crops=crop_boxes(pixels, boxes, size), phrases=[p.text for p in boxed])
        predicted += list(boxes[np.argmax(scores, axis=1)])
        truths += phrase_truths
        for truth in phrase_truths:
            hits = box_hits(boxes, [truth] * len(boxes), threshold, protocol)
            chance.append(float(hits.mean()))
            reachable.append(bool(hits.any()))
    return {"grounding_accuracy": grounding_accuracy(predicted, truths, threshold, protocol),
            "grounding_phrases": len(truths), "grounding_phrases_without_box": without_box,
            "grounding_chance": float(np.mean(chance)) if chance else 0.0,
            "grounding_upper_bound": float(np.mean(reachable)) if reachable else 0.0}


def detector_candidates(detector, images, image_dir, image_shape, score_threshold=0.25, max_detections=20,
                        image_suffix=".jpg"):
    """{image id: [n, 4] `xyxy` pixel boxes} from a vislearn detector (`detect`,
    e.g. `YoloV1`) run on each image resized to its input `image_shape`."""
    out = {}
    for record in images:
        pixels = load_image(Path(image_dir) / f"{record.image_id}{image_suffix}")
        resized = tf.image.resize(pixels[None], list(image_shape[:2]))
        detections = detector.detect(resized, score_threshold=score_threshold, max_detections=max_detections)
        n = int(detections["num_detections"][0])
        out[record.image_id] = convert_format(np.asarray(detections["detection_boxes"][0, :n]), "rel_yxyx", "xyxy",
                                              height=pixels.shape[0], width=pixels.shape[1])
    return out
