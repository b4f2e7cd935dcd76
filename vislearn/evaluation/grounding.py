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

`vislearn ground RUN_DIR --entities ROOT` (`ground_run`) does this for a
trained two_branch / two_branch_similarity run and draws the answers
(`grounding_grid`).

Reference:
    Wang, Li, Huang, Lazebnik, "Learning Two-Branch Neural Networks for
    Image-Text Matching Tasks", TPAMI 2018 (section 4.3, phrase localization);
    Plummer et al., "Flickr30k Entities", ICCV 2015 (the protocol).
"""

import dataclasses
import json
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


@dataclasses.dataclass
class GroundedPhrase:
    """The model's answer for one phrase (`ground_phrases`)."""

    image_id: str
    text: str
    chosen: object        # [4] `xyxy` pixel box the model picked; None when its image had no candidate
    truth: np.ndarray     # [m, 4] the phrase's ground-truth boxes
    hit: bool             # the chosen box matches the truth (`box_hits`)
    chance: float         # fraction of the image's candidates that would match


def ground_phrases(model, images, image_dir, candidates=None, threshold=0.5, protocol="any", image_suffix=".jpg"):
    """Pick, for every phrase of `images` whose entity has a box, the best-scoring candidate box.

    Args: as `grounding_metrics`.

    Returns:
        ([GroundedPhrase, ...] in image and sentence order, the number of
        phrases left out because their entity has no box).
    """
    grounded, without_box = [], 0
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
        if not len(boxes):  # no candidate: every phrase of the image is missed
            grounded += [GroundedPhrase(record.image_id, p.text, None, record.boxes[p.entity], False, 0.0)
                         for p in boxed]
            continue
        path = Path(image_dir) / f"{record.image_id}{image_suffix}"
        pixels = load_image(path)
        if pixels.shape[:2] != (record.height, record.width):
            raise ConfigError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, its annotation says "
                              f"{record.width}x{record.height}")
        scores = phrase_box_scores(model, crops=crop_boxes(pixels, boxes, size), phrases=[p.text for p in boxed])
        chosen = boxes[np.argmax(scores, axis=1)]
        truths = [record.boxes[p.entity] for p in boxed]
        hits = box_hits(chosen, truths, threshold, protocol)
        for phrase, box, truth, hit in zip(boxed, chosen, truths, hits):
            chance = box_hits(boxes, [truth] * len(boxes), threshold, protocol).mean()
            grounded.append(GroundedPhrase(record.image_id, phrase.text, box, truth, bool(hit), float(chance)))
    return grounded, without_box


def summarise_grounding(grounded, without_box):
    """The `grounding_metrics` dict of `ground_phrases`' answers."""
    return {"grounding_accuracy": float(np.mean([g.hit for g in grounded])) if grounded else 0.0,
            "grounding_phrases": len(grounded), "grounding_phrases_without_box": without_box,
            "grounding_chance": float(np.mean([g.chance for g in grounded])) if grounded else 0.0,
            "grounding_upper_bound": float(np.mean([g.chance > 0 for g in grounded])) if grounded else 0.0}


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
    return summarise_grounding(*ground_phrases(model, images, image_dir, candidates, threshold, protocol,
                                               image_suffix))


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


def grounding_grid(grounded, image_dir, out_png, images_shown=8, phrases_shown=4, seed=0, image_suffix=".jpg"):
    """A PNG grid: per row one image, per column one of its phrases (the
    caption below): dashed yellow, the phrase's ground-truth boxes; solid,
    the box the model chose (green: a hit, red: a miss)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    by_image = {}
    for phrase in grounded:  # one panel per distinct phrase text of an image
        shown = by_image.setdefault(phrase.image_id, {})
        if phrase.text not in shown and len(shown) < phrases_shown:
            shown[phrase.text] = phrase
    sample = np.random.default_rng(seed).choice(sorted(by_image), min(images_shown, len(by_image)), replace=False)
    shown_ids = sorted(str(image_id) for image_id in sample)
    rows, cols = max(len(shown_ids), 1), max([len(by_image[i]) for i in shown_ids], default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False,
                             layout="constrained")  # unlike tight_layout, leaves room for the title
    for ax in axes.flat:
        ax.axis("off")  # rows with fewer phrases leave blanks
    for row, image_id in enumerate(shown_ids):
        pixels = load_image(Path(image_dir) / f"{image_id}{image_suffix}")
        for col, phrase in enumerate(by_image[image_id].values()):
            ax = axes[row, col]
            ax.axis("on")
            ax.imshow(pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            for x0, y0, x1, y1 in phrase.truth:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow",
                                       linestyle="--", linewidth=1.5))
            if phrase.chosen is not None:
                x0, y0, x1, y1 = phrase.chosen
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                       edgecolor="green" if phrase.hit else "red", linewidth=1.5))
            ax.set_xlabel("\n".join(textwrap.wrap(phrase.text, 28)) + ("" if phrase.chosen is not None
                                                                        else "\n(no candidate box)"), fontsize=7)
        axes[row, 0].set_ylabel(image_id, fontsize=7)
    fig.suptitle("dashed yellow: ground truth; solid: the model's choice (green: hit, red: miss)", fontsize=8)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


GROUNDING_METHODS = ("two_branch", "two_branch_similarity")
DETECTOR_METHODS = ("yolo_v1", "yolo_anchor_free")


def _check_method(run_dir, expected, where, role):
    """Check the run's method from its recipe, before its (slow) model is built."""
    from vislearn.recipes import read_yaml

    recipe_file = Path(run_dir) / "recipe.yaml"
    if not recipe_file.is_file():
        raise ConfigError(f"{where}{run_dir}: not a run dir (no recipe.yaml)")
    name = (read_yaml(recipe_file).get("model") or {}).get("name")
    if name not in expected:
        raise ConfigError(f"{where}{run_dir}: method {name!r} {role}; expected a {' or '.join(expected)} run")


def read_image_ids(path):
    """A split file (Flickr30K Entities' train.txt / val.txt / test.txt): one image id a line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: split file not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ConfigError(f"{path}: no image ids (expected one a line)")
    return ids


def ground_run(run_dir, entities_root, image_dir=None, detector_run=None, split_file=None, score_threshold=0.25,
               threshold=0.5, protocol="any", out=None, image_suffix=".jpg"):
    """`vislearn ground`: ground the phrases of a Flickr30K Entities style
    folder with a trained two-branch run.

    Args:
        run_dir: a two_branch or two_branch_similarity run.
        entities_root: folder of `Sentences/` and `Annotations/`.
        image_dir: folder of `<image id><image_suffix>` (default `entities_root/images`).
        detector_run: a yolo_v1 / yolo_anchor_free run whose detections
            (score >= `score_threshold`) are the candidates; default the
            image's ground-truth boxes.
        split_file: image ids to read (default every sentence file's).
        threshold, protocol: see `box_hits`.
        out: folder to write `grounding.json` (the metrics) and `grounding.png`
            (`grounding_grid`) to.

    Returns:
        The `grounding_metrics` dict.

    Raises:
        ConfigError for a run of another method, a missing folder or file,
        or data without a phrase that has a box; all before a model is loaded.
    """
    from vislearn.data.flickr30k_entities import read_flickr30k_entities
    from vislearn.recipes import load_trained

    _check_method(run_dir, GROUNDING_METHODS, "", "cannot ground phrases (not a two-branch image-text model)")
    if detector_run is not None:
        _check_method(detector_run, DETECTOR_METHODS, "--detector ", "is not a detector")
    image_ids = read_image_ids(split_file) if split_file is not None else None
    images = read_flickr30k_entities(entities_root, image_ids)
    if not any(p.entity in record.boxes for record in images for s in record.sentences for p in s.phrases):
        raise ConfigError(f"{entities_root}: no phrase whose entity has a box (in {len(images)} images)")
    if image_dir is None:
        image_dir = Path(entities_root) / "images"
        if not image_dir.is_dir():
            raise ConfigError(f"{image_dir}: not found; give --images DIR, the folder of <image id>{image_suffix}")
    elif not Path(image_dir).is_dir():
        raise ConfigError(f"--images {image_dir}: not a folder")
    image_dir = Path(image_dir)
    for record in images:  # a missing image fails now, not after the model has loaded
        if not (image_dir / f"{record.image_id}{image_suffix}").is_file():
            raise ConfigError(f"{image_dir / (record.image_id + image_suffix)}: image file not found")

    _, model, _ = load_trained(run_dir)
    candidates = None
    if detector_run is not None:
        _, detector, detector_data = load_trained(detector_run)
        candidates = detector_candidates(detector, images, image_dir, detector_data.image_shape, score_threshold,
                                         image_suffix=image_suffix)
    grounded, without_box = ground_phrases(model, images, image_dir, candidates, threshold, protocol, image_suffix)
    metrics = summarise_grounding(grounded, without_box)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "grounding.json").write_text(json.dumps(metrics, indent=2))
        grounding_grid(grounded, image_dir, out / "grounding.png", image_suffix=image_suffix)
    return metrics
