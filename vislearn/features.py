"""Precomputed image features for image-text matching.

`vislearn features extract` runs a frozen backbone (a vislearn backbone or a
`keras.applications` model with `include_top=False, pooling="avg"`, weights
from a local file, never downloaded) once over every image of a caption set
and caches the feature vectors, so a two-branch model can train its image
MLP on them (`data.features: DIR`, `model.backbone: features`) without
decoding or convolving an image per step.

The caption file is a Karpathy-split JSON (`dataset_coco.json`, captioned
shapes, ...) or a COCO captions JSON (`captions_train2014.json`), told apart by
structure. A COCO file has no splits: all its images are the one split `all`
(`coco_captions` takes one extraction per caption file, `data.train_features`
and `data.test_features`).

An output folder holds one float32 `.npy` per split (rows in the caption
file's image order) and `manifest.json`:

    format:       "vislearn-features/1"
    backbone:     the spec, e.g. {"name": "small_cnn", "width": 16} or {"name": "MobileNetV3Small"}
    weights:      {"path", "sha256"} of the weights file (the user's, or
                  `backbone.weights.h5` in the folder when none was given)
    image_size:   [height, width] images were resized to
    feature_dim:  width of a feature vector
    captions:     {"path", "sha256", "format"} of the caption file read ("karpathy" or "coco")
    splits:       {split: {"file": "train.npy", "ids": [image path relative to the image folder, ...]}}

Exports of a features-trained model put the same backbone (rebuilt from the
manifest, its weights file checked against the sha256) in front of the image
MLP, so `embed_image` takes encoded images like any other export.
"""

import hashlib
import importlib
import json
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

from vislearn.config import ConfigError, suggestion

log = logging.getLogger("vislearn")

FORMAT = "vislearn-features/1"
MANIFEST = "manifest.json"
OWN_WEIGHTS = "backbone.weights.h5"
# A spec key naming the image-branch input of a model trained on cached features.
FEATURES_BACKBONE = "features"
# keras.applications arguments vislearn sets itself.
APPLICATION_FIXED = ("include_top", "weights", "input_shape", "input_tensor", "pooling", "classes")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_backbone(text, where="--backbone"):
    """A backbone spec from the command line: a name, a YAML/JSON mapping
    (`{name: small_cnn, width: 16}`), or a YAML/JSON file holding one."""
    if Path(text).suffix.lower() in (".yaml", ".yml", ".json") and Path(text).is_file():
        text = Path(text).read_text()
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not a name or a YAML/JSON mapping ({error})".replace("\n", " ")) from None
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{where}: expected a backbone name or a mapping with a 'name', received {text!r}")
    return spec


def _application(name):
    """The `keras.applications` builder called `name`, or None."""
    builder = getattr(keras.applications, name, None) if name[:1].isupper() else None
    return builder if callable(builder) else None


def _application_names():
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def _preprocessing(builder):
    """The `preprocess_input` of an application's family (it expects pixels in [0, 255])."""
    module = importlib.import_module(builder.__module__)
    return getattr(module, "preprocess_input", None)


def _load_weights(model, weights, spec, where):
    weights = Path(weights)
    if not weights.is_file():
        raise ConfigError(f"{where} {weights}: file not found")
    if not weights.name.endswith((".weights.h5", ".keras", ".h5")):
        raise ConfigError(f"{where} {weights}: expected a .weights.h5, .keras or .h5 file")
    try:
        model.load_weights(str(weights))
    except Exception as error:  # Keras raises ValueError, KeyError, OSError... for a file of another model
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{where} {weights}: does not fit backbone {spec} ({message})") from None


def build_extractor(spec, image_size, weights=None, where="--backbone", weights_where="--weights"):
    """A frozen image -> feature-vector model from a backbone spec.

    Args:
        spec: `{"name": ..., **kwargs}`: a vislearn backbone (`BACKBONES`) or a
            `keras.applications` model name (built with `include_top=False,
            pooling="avg", weights=None`; its family's `preprocess_input` is
            applied to the [0, 1] images scaled to [0, 255]).
        image_size: [height, width] of the input images.
        weights: optional local .weights.h5 / .keras / .h5 file loaded into
            the backbone (without it the weights are a fresh initialisation).

    Returns:
        A `keras.Model` from float32 [batch, H, W, 3] in [0, 1] to [batch, dim].
    """
    from vislearn.backbones import BACKBONES, build_backbone

    spec = dict(spec)
    name = spec.get("name")
    shape = (int(image_size[0]), int(image_size[1]), 3)
    if name in BACKBONES:
        try:
            backbone = build_backbone(spec, shape)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: cannot build {spec} at image size {list(shape[:2])} "
                              f"({str(error).splitlines()[0]})") from None
        if weights is not None:
            _load_weights(backbone, weights, spec, weights_where)
        extractor = backbone
    else:
        builder = _application(str(name))
        if builder is None:
            choices = sorted(BACKBONES) + _application_names()
            raise ConfigError(f"{where}: unknown backbone {name!r}{suggestion(name, choices)}; expected a vislearn "
                              f"backbone {sorted(BACKBONES)} or a keras.applications model (e.g. MobileNetV3Small)")
        fixed = sorted(set(spec) & set(APPLICATION_FIXED))
        if fixed:
            raise ConfigError(f"{where}: {fixed} are set by vislearn (include_top=False, pooling='avg', "
                              "weights from --weights); remove them")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        try:
            application = builder(include_top=False, weights=None, input_shape=shape, pooling="avg", **kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: cannot build {name} at image size {list(shape[:2])} "
                              f"({str(error).splitlines()[0]})") from None
        if weights is not None:
            _load_weights(application, weights, spec, weights_where)
        preprocess = _preprocessing(builder)
        inputs = keras.Input(shape=shape, name="image")
        x = ScaleAndPreprocess(name, name="preprocess")(inputs) if preprocess else inputs
        extractor = keras.Model(inputs, application(x, training=False), name=f"{name}_extractor")
    extractor.trainable = False
    if len(extractor.output_shape) != 2:
        raise ConfigError(f"{where}: backbone {spec} gives outputs of shape {extractor.output_shape}; "
                          "expected flat feature vectors [batch, dim]")
    return extractor


@keras.saving.register_keras_serializable(package="vislearn")
class ScaleAndPreprocess(keras.layers.Layer):
    """[0, 1] images -> the input a keras.applications family expects (its
    `preprocess_input` of the pixels in [0, 255])."""

    def __init__(self, application, **kwargs):
        super().__init__(**kwargs)
        self.application = application
        self._preprocess = _preprocessing(_application(application))

    def call(self, images):
        return self._preprocess(images * 255.0)

    def get_config(self):
        return {**super().get_config(), "application": self.application}


# ---------------------------------------------------------------- extraction


def _image_ids(splits, image_dir):
    return {split: [Path(path).relative_to(Path(image_dir)).as_posix() for path, _ in records]
            for split, records in splits.items()}


def extract_features(captions, images, backbone, out, weights=None, image_size=(64, 64), batch_size=64, verbose=1):
    """`vislearn features extract`: cache a backbone's features of every image
    of a Karpathy-split or COCO captions file (see the module docstring).

    Args:
        captions: the Karpathy-split or COCO captions JSON file.
        images: the folder its file names are relative to.
        backbone: a spec (`parse_backbone`).
        out: output folder (new or empty).
        weights: optional local weights file of the backbone.
        image_size: [height, width] images are resized to.
        batch_size: images per forward pass.
        verbose: 1 shows a progress bar.

    Returns:
        `out` as a `Path`.
    """
    from vislearn.data.captions import read_caption_file
    from vislearn.data.folders import check_images, decode_image

    image_size = [int(s) for s in image_size]
    if len(image_size) != 2 or min(image_size) < 1:
        raise ConfigError(f"--image-size: expected a positive height and width, received {image_size}")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, received {batch_size}")
    if not Path(images).is_dir():
        raise ConfigError(f"--images {images}: not a folder")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: not an empty folder; choose an empty or new folder")
    # ConfigError for a missing file, image or caption, or JSON of neither format
    caption_format, splits = read_caption_file(captions, images)
    extractor = build_extractor(backbone, image_size, weights)
    paths = [path for records in splits.values() for path, _ in records]
    check_images(paths)  # a corrupt file fails here, named, not mid-extraction
    ids = _image_ids(splits, images)

    out.mkdir(parents=True, exist_ok=True)
    if weights is None:
        # No file to rebuild from: keep the weights used (a fresh initialisation,
        # or a run's encoder), so exports compose the same backbone.
        log.warning("no --weights: features of %s as initialised%s", backbone.get("name"),
                    " (from_run)" if "from_run" in backbone else " (untrained)")
        extractor.save_weights(str(out / OWN_WEIGHTS))
        weights_entry = {"path": OWN_WEIGHTS, "sha256": sha256(out / OWN_WEIGHTS)}
    else:
        weights_entry = {"path": str(Path(weights).resolve()), "sha256": sha256(weights)}

    forward = tf.function(lambda batch: extractor(batch, training=False))
    progress = keras.utils.Progbar(len(paths), unit_name="image", verbose=verbose)
    manifest_splits, seen = {}, 0
    for split, records in splits.items():
        dataset = tf.data.Dataset.from_tensor_slices([p for p, _ in records]).map(
            lambda path: decode_image(tf.io.read_file(path), image_size),
            num_parallel_calls=tf.data.AUTOTUNE).batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)
        rows = []
        for batch in dataset:
            rows.append(np.asarray(forward(batch), dtype=np.float32))
            seen += len(rows[-1])
            progress.update(seen)
        features = np.concatenate(rows)
        np.save(out / f"{split}.npy", features)
        manifest_splits[split] = {"file": f"{split}.npy", "ids": ids[split]}
    manifest = {
        "format": FORMAT,
        "backbone": dict(backbone),
        "weights": weights_entry,
        "image_size": image_size,
        "feature_dim": int(extractor.output_shape[-1]),
        "captions": {"path": str(Path(captions).resolve()), "sha256": sha256(captions), "format": caption_format},
        "splits": manifest_splits,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


# ---------------------------------------------------------------- reading


class FeatureCache:
    """An extracted features folder: the manifest and every split's rows, by image id."""

    def __init__(self, folder, where="data.features"):
        self.folder = Path(folder)
        self.where = where
        self.manifest_file = self.folder / MANIFEST
        if not self.manifest_file.is_file():
            raise ConfigError(f"{where}: {self.folder} holds no {MANIFEST} "
                              "(write it with `vislearn features extract ... --out DIR`)")
        try:
            manifest = json.loads(self.manifest_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{self.manifest_file}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ConfigError(f"{self.manifest_file}: not a vislearn features manifest (expected format {FORMAT!r})")
        self.manifest = manifest
        self.feature_dim = int(manifest["feature_dim"])
        self.image_size = [int(s) for s in manifest["image_size"]]
        self.rows = {}  # image id -> (split, row)
        self.arrays = {}
        for split, entry in manifest["splits"].items():
            file = self.folder / entry["file"]
            if not file.is_file():
                raise ConfigError(f"{self.manifest_file}: split {split!r}: {file} not found")
            array = np.load(file, mmap_mode="r")
            if array.ndim != 2 or array.shape != (len(entry["ids"]), self.feature_dim):
                raise ConfigError(f"{file}: features of shape {list(array.shape)}; {self.manifest_file} expects "
                                  f"[{len(entry['ids'])}, {self.feature_dim}] (ids x feature_dim)")
            self.arrays[split] = array
            self.rows.update({image_id: (split, row) for row, image_id in enumerate(entry["ids"])})

    def extraction(self):
        """What makes two caches' vectors comparable: backbone, weights sha256, image size, feature width."""
        weights = self.manifest.get("weights") or {}
        return {"backbone": self.manifest["backbone"], "weights sha256": weights.get("sha256"),
                "image_size": self.image_size, "feature_dim": self.feature_dim}

    def check_same_extraction(self, other):
        """Refuse `other` (e.g. the test split's cache) unless its vectors come
        from the same extraction as this cache's (one model embeds both)."""
        mine, theirs = self.extraction(), other.extraction()
        differences = []
        for key in (k for k in mine if mine[k] != theirs[k]):
            # A sha256 prefix is enough to tell two weights files apart.
            values = [str(v)[:12] if key == "weights sha256" else v for v in (mine[key], theirs[key])]
            differences.append(f"{key} {values[0]} vs {values[1]}")
        if differences:
            weights = (self.manifest.get("weights") or {}).get("path")
            weights = self.folder / OWN_WEIGHTS if weights == OWN_WEIGHTS else weights  # fresh weights: reuse them
            raise ConfigError(f"{other.where}: {other.manifest_file} and {self.where} {self.manifest_file} come from "
                              f"different extractions ({'; '.join(differences)}); extract both with the same "
                              f"--backbone, --image-size and --weights {weights}")

    def lookup(self, records, image_dir, captions_file):
        """float32 [len(records), feature_dim]: the cached rows of `records`
        ((image path, captions) under `image_dir`), in their order."""
        vectors = np.empty((len(records), self.feature_dim), np.float32)
        for i, (path, _) in enumerate(records):
            image_id = Path(path).relative_to(Path(image_dir)).as_posix()
            if image_id not in self.rows:
                raise ConfigError(f"{self.manifest_file}: no features of image {image_id!r} of {captions_file} "
                                  f"({len(self.rows)} images cached); extract the features of this caption file")
            split, row = self.rows[image_id]
            vectors[i] = self.arrays[split][row]
        return vectors

    def weights_file(self):
        """The extraction weights, checked against the manifest's sha256."""
        entry = self.manifest.get("weights")
        if not entry:
            return None
        path = Path(entry["path"])
        path = path if path.is_absolute() else self.folder / path
        if not path.is_file():
            raise ConfigError(f"{self.manifest_file}: weights file {path} not found; the image backbone cannot be "
                              "rebuilt (restore the file or extract the features again)")
        if sha256(path) != entry.get("sha256"):
            raise ConfigError(f"{self.manifest_file}: weights file {path} changed since the extraction (sha256 "
                              "differs); the backbone would not give the cached features: extract them again")
        return path

    def extractor(self):
        """The extraction backbone, rebuilt from the manifest (spec + weights file)."""
        return build_extractor(self.manifest["backbone"], self.image_size, self.weights_file(),
                               where=f"{self.manifest_file}: backbone", weights_where=f"{self.manifest_file}: weights")


def features_backbone_dim(spec):
    """The feature width of a `{"name": "features", "dim": N}` model backbone
    spec (`"features"` alone: 0, to be filled in), or None for an image backbone."""
    if spec == FEATURES_BACKBONE or (isinstance(spec, dict) and spec.get("name") == FEATURES_BACKBONE):
        extra = sorted(set(spec) - {"name", "dim"}) if isinstance(spec, dict) else []
        if extra:
            raise ValueError(f"model.backbone: {FEATURES_BACKBONE!r} takes only 'dim', received {extra}")
        dim = spec.get("dim", 0) if isinstance(spec, dict) else 0
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"model.backbone.dim: expected a positive integer, received {dim!r}")
        return dim
    return None


class WithExtractor(keras.Model):
    """A model trained on cached features (`model.backbone: features`) with its
    extraction backbone in front, so `embed_image` takes images again (exports,
    `vislearn index build`, grounding); feature vectors [batch, dim] still go
    straight to the image MLP (evaluation on the cached splits). Every other
    attribute (`embed_text`, `embed_dim`, `similarity_head`, ...) is the
    trained model's.

    Args:
        model: the trained features-mode model.
        extractor: the frozen backbone (`FeatureCache.extractor()`).
    """

    def __init__(self, model, extractor, **kwargs):
        super().__init__(**kwargs)
        self.trained = model
        self.extractor = extractor
        self.built = True  # both parts are built

    def embed_image(self, images, training=False):
        if len(images.shape) == 2:
            return self.trained.embed_image(images, training=training)
        return self.trained.embed_image(self.extractor(images, training=False), training=training)

    def call(self, images, training=False):
        return self.embed_image(images, training=training)

    def __getattr__(self, name):
        # Only reached for attributes this wrapper lacks: they are the trained model's.
        if name in ("trained", "extractor") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.trained, name)
