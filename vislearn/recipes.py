"""YAML recipe -> validated config -> objects -> fit, evaluate, export.

A recipe is data. Its sections are validated strictly against the signatures
of the things they configure (`model:` keys are exactly the model's
constructor arguments), so a typo is a one-line `ConfigError` naming the file
and the dotted key, never a traceback deep in TensorFlow.

The explicit name -> class mappings live beside what they name: `METHODS`
here, `DATASETS` in vislearn.data, `BACKBONES` in vislearn.backbones,
`OPTIMIZERS`/`SCHEDULES` in vislearn.optimizers.
"""

import copy
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import yaml

from vislearn.config import ConfigError, check_arguments, pick, suggestion

log = logging.getLogger("vislearn")

BUNDLED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SECTIONS = ("description", "model", "data", "optimizer", "train", "distribute", "export")
REQUIRED_SECTIONS = ("model", "data", "train")
# Sections that may change between an interrupted run and its resumption.
RESUMABLE_DIFFERENCES = ("description", "distribute", "export")
# `data:` keys naming `vislearn features extract` folders (coco_captions takes one per caption file).
FEATURE_KEYS = ("features", "train_features", "test_features")


def train_section(epochs, seed, steps_per_epoch=None, validation_steps=None, monitor=None, verbose=None,
                  jit_compile=None):
    """`train:` keys. `monitor` picks the best checkpoint (default: the method's).

    `jit_compile: true` compiles the train and test steps with XLA; null is
    Keras' "auto", which leaves XLA off on a machine without an accelerator."""


def distribute_section(strategy="auto"):
    """`distribute:` keys."""


def export_section(name="model"):
    """`export:` keys shared by every method."""


# ---------------------------------------------------------------- methods


def _fill_from_data(model_args, data, keys=("num_classes", "image_shape")):
    """Fill in the model arguments the data determines; a recipe value that
    disagrees with the data is an error."""
    filled = dict(model_args)
    for key in keys:
        value = list(data.image_shape) if key == "image_shape" else data.num_classes
        filled.setdefault(key, value)
        given = list(filled[key]) if key == "image_shape" else filled[key]
        if given != value:
            hint = " (set data.image_size instead)" if key == "image_shape" else " classes"
            raise ConfigError(f"model.{key}: {filled[key]} does not match the data's {value}{hint}")
    return filled


def _dann_model_args(model_args, data, total_steps):
    filled = _fill_from_data(model_args, data)
    filled.setdefault("total_steps", total_steps)
    return filled


def _dann_metrics(model, data):
    from vislearn.evaluation.classification import domain_adaptation_metrics

    return domain_adaptation_metrics(model, data)


def _dann_export(model, path, data, options):
    from vislearn.export import export_classifier

    return export_classifier(model, path, data.image_shape, data.class_names)


RESIZE_MODES = ("stretch", "letterbox")


def detector_export_section(name="model", score_threshold=0.25, iou_threshold=0.45, max_detections=100,
                            resize="stretch"):
    """`export:` keys of detectors (see `vislearn.export.export_detector`)."""


def _yolo_model_args(model_args, data, total_steps):
    return _fill_from_data(model_args, data)


def _detector_metrics(model, data):
    from vislearn.evaluation.detection import evaluate_detector

    return evaluate_detector(model, data.test, data.class_names, data.batch_size)


def _detector_export(model, path, data, options):
    from vislearn.export import export_detector

    options = {k: v for k, v in options.items() if k != "name"}
    return export_detector(model, path, data.image_shape, data.class_names, **options)


def _image_shape_args(model_args, data, total_steps):
    return _fill_from_data(model_args, data, keys=("image_shape",))


def _supervised_model_args(model_args, data, total_steps):
    return _fill_from_data(model_args, data)


def _exemplar_data_args(model):
    import inspect

    from vislearn.models.exemplar import ExemplarCNN

    default = inspect.signature(ExemplarCNN.__init__).parameters["num_exemplars"].default
    return {"train_targets": "exemplars", "num_exemplars": model.get("num_exemplars", default)}


def _representation_metrics(model, data):
    from vislearn.evaluation.representation import probe_encoder_of, representation_metrics

    if data.probe_train is None:
        log.warning("no labelled probe split (data.probe_train/probe_test): linear_top1 and knn_top1 not computed")
        return {"linear_top1": None, "knn_top1": None}
    return representation_metrics(probe_encoder_of(model), data.probe_train, data.probe_test)


def _knn_monitor(model, data):
    from vislearn.evaluation.representation import KNNMonitor

    return [] if data.probe_train is None else [KNNMonitor(data.probe_train, data.probe_test)]


def _embedder_export(model, path, data, options):
    from vislearn.evaluation.representation import probe_encoder_of
    from vislearn.export import export_image_embedder

    return export_image_embedder(probe_encoder_of(model), path, data.image_shape)


def _contrastive_model_args(model_args, data, total_steps):
    """image_shape and global_batch_size from the data (the batch checks the
    negatives: SimCLR's batch, MoCo's queue), and the online probe's classes."""
    filled = _fill_from_data(model_args, data, keys=("image_shape",))
    spec = data.train.element_spec
    batch = (spec[0] if isinstance(spec, tuple) else spec).shape[0]
    if filled.setdefault("global_batch_size", batch) != batch:
        raise ConfigError(f"model.global_batch_size: {filled['global_batch_size']} does not match the data's "
                          f"batch of {batch} (set data.batch_size instead)")
    if filled.get("online_probe"):
        filled.setdefault("num_classes", data.num_classes)
    return filled


def _detector_method(model_class):
    """A detector: trained on detection batches, scored by mAP, exported with NMS in the graph."""
    return Method(
        model_class=model_class,
        datasets=("shapes_on_photos", "detection_folder"),
        model_args=_yolo_model_args,
        data_args=lambda model: {},
        validation=lambda data: data.validation,
        metrics=_detector_metrics,
        export=_detector_export,
        monitor="val_loss",
        export_options=detector_export_section,
    )


def _representation_method(model_class, data_args=lambda model: {}, **overrides):
    """A method evaluated by the frozen-encoder protocol (linear_top1, knn_top1)
    and exported as an image embedder; its best checkpoint is the lowest
    training loss (the kNN curve, computed on the probe's test split, is
    logged, never used to select)."""
    return Method(**{
        "model_class": model_class,
        "datasets": ("digits_ssl", "image_folders", "object_crops"),
        "model_args": _image_shape_args,
        "data_args": data_args,
        "validation": lambda data: None,
        "metrics": _representation_metrics,
        "export": _embedder_export,
        "monitor": "loss",
        "callbacks": _knn_monitor,
        **overrides,
    })


def _two_branch_model_args(model_args, data, total_steps):
    from vislearn.features import FEATURES_BACKBONE, features_backbone_dim
    from vislearn.models.two_branch import build_vocabulary

    filled = _fill_from_data(model_args, data, keys=("image_shape",))
    if not filled.get("vocabulary"):  # the training captions' words, written to the run's recipe.yaml
        filled["vocabulary"] = build_vocabulary(data.train_captions)
    backbone = filled.get("backbone")
    try:
        dim = features_backbone_dim(backbone)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    cache = data.features  # coco_captions: the data.train_features cache (the test one is checked against it)
    if cache is not None:  # the image MLP takes the cached vectors; their width comes from the manifest
        if backbone is not None and dim is None:
            raise ConfigError(f"model.backbone: {backbone!r} is an image backbone, but {cache.where} feeds the "
                              f"cached features of {cache.manifest_file}; set model.backbone: {FEATURES_BACKBONE}")
        if dim and dim != cache.feature_dim:
            raise ConfigError(f"model.backbone.dim: {dim} does not match the {cache.feature_dim}-wide features of "
                              f"{cache.manifest_file}")
        filled["backbone"] = {"name": FEATURES_BACKBONE, "dim": cache.feature_dim}
    elif dim is not None:
        raise ConfigError(f"model.backbone: {FEATURES_BACKBONE!r} trains on cached features; set data.features to "
                          "a `vislearn features extract` output folder (coco_captions: data.train_features and "
                          "data.test_features, one per caption file)")
    return filled


def _retrieval_metrics(model, data):
    from vislearn.evaluation.retrieval import retrieval_metrics

    return retrieval_metrics(model, data.test)


def _retrieval_monitor(model, data):
    from vislearn.evaluation.retrieval import RetrievalMonitor

    return [] if data.val is None else [RetrievalMonitor(data.val)]


def _text_image_export(model, path, data, options):
    from vislearn.export import export_text_image_embedder

    return export_text_image_embedder(model, path, data.image_shape)


def _icmlm_model_args(model_args, data, total_steps):
    """image_shape from the data; the WordPiece vocabulary and the concept words
    from the training captions (written to the run's recipe.yaml); captions
    without a concept are counted and skipped (an error when all are). With
    `bert_preset` the vocabulary is the preset's (recipe.yaml keeps its path),
    and words it splits into several wordpieces are counted and left out of the concepts."""
    from vislearn.data.caption_concepts import (concept_vocabulary, read_vocabulary, unmaskable,
                                                wordpiece_vocabulary)
    from vislearn.models.icmlm import bert_preset_tokenizer, concept_words_not_in

    filled = _fill_from_data(model_args, data, keys=("image_shape",))
    if filled.get("bert_preset"):
        vocabulary = list(bert_preset_tokenizer(filled["bert_preset"]).get_vocabulary())
    else:
        if not filled.get("vocabulary"):
            filled["vocabulary"] = wordpiece_vocabulary(data.train_captions)
        vocabulary = read_vocabulary(filled["vocabulary"], filled.get("vocabulary_size"))
    filled.setdefault("vocabulary_size", len(vocabulary))
    if not filled.get("concepts"):
        filled["concepts"] = concept_vocabulary(data.train_captions, vocabulary)
        split = concept_words_not_in(vocabulary, data.train_captions) if filled.get("bert_preset") else []
        if split:
            log.warning("%d caption word(s) that would be concepts are not one token of model.bert_preset's "
                        "vocabulary (e.g. %r); they are not masked", len(split), split[0])
        if not filled["concepts"]:
            raise ConfigError("model.concepts: no caption word qualifies as a concept (a non-stop word in at "
                              "least 5 training captions that is one vocabulary token); give model.concepts")
    skipped = unmaskable(data.train_captions, filled["concepts"])
    if len(skipped) == len(data.train_captions):
        raise ConfigError(f"data: none of the {len(skipped)} training captions contains a concept word "
                          f"(e.g. {skipped[0]!r}); nothing can be masked")
    if skipped:
        log.warning("%d of %d training captions contain no concept word (e.g. %r); they are skipped "
                    "(weight 0, counted as unmaskable_captions)", len(skipped), len(data.train_captions), skipped[0])
    return filled


def _icmlm_metrics(model, data):
    from vislearn.models.icmlm import caption_probe_metrics, masked_accuracy_metrics

    metrics = masked_accuracy_metrics(model, data.test)
    metrics.update(caption_probe_metrics(model.encoder, data.val, data.test))
    return metrics


@dataclasses.dataclass
class Method:
    """How a recipe runs one method: its model class, which data builders
    feed it, and how it is completed, evaluated and exported."""

    model_class: Callable
    datasets: tuple
    model_args: Callable        # (model section, data, total_steps) -> constructor kwargs
    data_args: Callable         # model section -> extra data-builder kwargs
    validation: Callable        # data -> validation dataset for fit
    metrics: Callable           # (model, data) -> metrics.json dict
    export: Callable            # (model, path, data, export section) -> path
    monitor: str = "val_accuracy"
    callbacks: Callable = lambda model, data: []  # (model, data) -> extra Keras callbacks
    export_options: Callable = export_section  # its keyword arguments are the `export:` keys
    features: bool = False      # trains on cached image features (`data.features`) when given


def _methods():
    from vislearn.models.dann import DANN
    from vislearn.models.autoencoder import Autoencoder
    from vislearn.models.context_prediction import ContextPrediction
    from vislearn.models.exemplar import ExemplarCNN
    from vislearn.models.icmlm import ICMLM
    from vislearn.models.moco import MoCo
    from vislearn.models.rotnet import RotNet
    from vislearn.models.simclr import SimCLR
    from vislearn.models.supervised import Supervised
    from vislearn.models.two_branch import TwoBranch
    from vislearn.models.two_branch_similarity import (ScoredRetrievalMonitor, TwoBranchSimilarity,
                                                       export_text_image_scorer, scored_retrieval_metrics)
    from vislearn.models.yolo_v1 import YoloV1
    from vislearn.models.yolo_anchor_free import YoloAnchorFree

    return {
        "dann": Method(
            model_class=DANN,
            datasets=("digits_m", "domain_folders", "domain_tfds"),
            model_args=_dann_model_args,
            data_args=lambda model: {"target_as_source": model.get("mode") == "train_on_target"},
            validation=lambda data: data.target_test,
            metrics=_dann_metrics,
            export=_dann_export,
        ),
        "yolo_v1": _detector_method(YoloV1),
        "yolo_anchor_free": _detector_method(YoloAnchorFree),
        "autoencoder": _representation_method(Autoencoder),
        "rotnet": _representation_method(RotNet),
        "exemplar": _representation_method(ExemplarCNN, data_args=_exemplar_data_args),
        "context_prediction": _representation_method(ContextPrediction),
        "simclr": _representation_method(
            SimCLR, model_args=_contrastive_model_args,
            data_args=lambda model: {"train_targets": "labels"} if model.get("online_probe") else {}),
        "moco": _representation_method(MoCo, model_args=_contrastive_model_args),  # v1, v2, MoChi
        "supervised": _representation_method(
            Supervised, datasets=("digits_ssl", "object_crops"), model_args=_supervised_model_args,
            data_args=lambda model: {"train_targets": "labels"}, validation=lambda data: data.probe_test),
        "two_branch": (two_branch := Method(
            model_class=TwoBranch,
            datasets=("captioned_shapes", "karpathy_captions", "coco_captions"),
            model_args=_two_branch_model_args,
            data_args=lambda model: {},
            validation=lambda data: data.validation,
            metrics=_retrieval_metrics,
            export=_text_image_export,
            monitor="val_rsum",  # written by the retrieval monitor on the val split
            callbacks=_retrieval_monitor,
            features=True,
        )),
        "two_branch_similarity": dataclasses.replace(  # two_branch's data and recipe; pairs scored by a network
            two_branch,
            model_class=TwoBranchSimilarity,
            metrics=lambda model, data: scored_retrieval_metrics(model, data.test),
            export=lambda model, path, data, options: export_text_image_scorer(model, path, data.image_shape),
            callbacks=lambda model, data: [] if data.val is None else [ScoredRetrievalMonitor(data.val)],
        ),
        "icmlm": Method(
            model_class=ICMLM,
            datasets=("captioned_shapes", "karpathy_captions", "coco_captions"),
            model_args=_icmlm_model_args,
            data_args=lambda model: {},
            validation=lambda data: data.validation,
            metrics=_icmlm_metrics,
            export=_embedder_export,  # the visual encoder, as `embed_image`
            monitor="loss",
        ),
    }


# ---------------------------------------------------------------- loading


def bundled_recipes():
    """Name -> path of the recipes shipped in `recipes/`."""
    return {p.stem: p for p in sorted(BUNDLED_RECIPES.glob("*.yaml"))}


def resolve_recipe(name_or_path, where="RECIPE"):
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    raise ConfigError(f"{where}: {name_or_path!r} is neither a file nor a bundled recipe"
                      f"{suggestion(name_or_path, bundled)}; bundled: {sorted(bundled)}")


def read_yaml(path):
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}, received {type(recipe).__name__}")
    return recipe


def apply_override(recipe, assignment, source="--set"):
    """Apply `a.b=c` to a recipe in place; `c` is parsed as YAML (1 -> int,
    0.5 -> float, [1, 2] -> list, null -> None, true -> bool)."""
    if "=" not in assignment:
        raise ConfigError(f"{source} {assignment!r}: expected KEY=VALUE, e.g. train.epochs=1")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"{source} {key}: unknown section {parts[0]!r}{suggestion(parts[0], SECTIONS)}; "
                          f"expected one of {list(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = recipe
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_recipe(name_or_path, overrides=()):
    """Read, override and validate a recipe. Returns (recipe, source path)."""
    path = resolve_recipe(name_or_path)
    recipe = read_yaml(path)
    for assignment in overrides:
        apply_override(recipe, assignment)
    validate(recipe, str(path))
    return recipe, str(path)


def validate(recipe, source):
    """Check every section's keys and types; raise ConfigError naming the key."""
    for section in recipe:
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {section}: unknown section{suggestion(section, SECTIONS)}; "
                              f"expected one of {list(SECTIONS)}")
    for section in REQUIRED_SECTIONS:
        if not isinstance(recipe.get(section), dict):
            raise ConfigError(f"{source}: {section}: missing section (a mapping is required)")
    for section in ("optimizer", "distribute", "export"):
        if recipe.get(section) is not None and not isinstance(recipe[section], dict):
            raise ConfigError(f"{source}: {section}: expected a mapping, received {recipe[section]!r}")

    from vislearn.data import DATASETS
    from vislearn.distribute import STRATEGIES
    from vislearn.optimizers import OPTIMIZERS, SCHEDULES

    model = dict(recipe["model"])
    method_name = model.pop("name", None)
    method = pick(_methods(), method_name, f"{source}: model.name")
    check_arguments(method.model_class.__init__, model, f"{source}: model")

    data = dict(recipe["data"])
    data_name = data.pop("name", None)
    builder = pick(DATASETS, data_name, f"{source}: data.name")
    if data_name not in method.datasets:
        raise ConfigError(f"{source}: data.name: {data_name!r} cannot feed method {method_name!r}; "
                          f"expected one of {list(method.datasets)}")
    check_arguments(builder, data, f"{source}: data",
                    skip=("seed", "target_as_source", "train_targets", "num_exemplars"))
    feature_keys = [key for key in FEATURE_KEYS if data.get(key) is not None]
    if feature_keys and not method.features:
        raise ConfigError(f"{source}: data.{feature_keys[0]}: method {method_name!r} trains on images; cached "
                          "features feed two_branch and two_branch_similarity")

    optimizer = dict(recipe.get("optimizer") or {})
    optimizer_class = pick(OPTIMIZERS, optimizer.pop("name", "adam"), f"{source}: optimizer.name")
    schedule = optimizer.pop("schedule", None)
    check_arguments(optimizer_class.__init__, optimizer, f"{source}: optimizer")
    if schedule is not None:
        if not isinstance(schedule, dict):
            raise ConfigError(f"{source}: optimizer.schedule: expected a mapping, received {schedule!r}")
        schedule = dict(schedule)
        schedule_class = pick(SCHEDULES, schedule.pop("name", "constant"), f"{source}: optimizer.schedule.name")
        init = getattr(schedule_class, "__init__", schedule_class)
        check_arguments(init if isinstance(schedule_class, type) else schedule_class, schedule,
                        f"{source}: optimizer.schedule", provided=("initial_learning_rate",))

    train = recipe["train"]
    check_arguments(train_section, train, f"{source}: train")
    for key in ("epochs", "seed"):
        if not isinstance(train.get(key), int) or isinstance(train.get(key), bool):
            raise ConfigError(f"{source}: train.{key}: expected an integer, received {train.get(key)!r}")
    if train["epochs"] < 1:
        raise ConfigError(f"{source}: train.epochs: expected at least 1, received {train['epochs']}")
    if train.get("jit_compile") not in (None, True, False):
        raise ConfigError(f"{source}: train.jit_compile: expected true, false or null (Keras' auto), "
                          f"received {train['jit_compile']!r}")

    distribute = recipe.get("distribute") or {}
    check_arguments(distribute_section, distribute, f"{source}: distribute")
    if distribute.get("strategy", "auto") not in STRATEGIES:
        pick({s: s for s in STRATEGIES}, distribute.get("strategy"), f"{source}: distribute.strategy")
    pretraining_recipe(recipe, source)  # a bad `model.backbone.pretrain` fails here, not after a fit
    export = recipe.get("export") or {}
    check_arguments(method.export_options, export, f"{source}: export")
    if "resize" in export and export["resize"] not in RESIZE_MODES:
        raise ConfigError(f"{source}: export.resize: expected one of {list(RESIZE_MODES)}, "
                          f"received {export['resize']!r}")


# `data:` keys that say which images a set holds (not how they are batched or
# sized): a `model.backbone.pretrain` recipe reads the images of the recipe that
# names it.
IMAGE_SOURCE_KEYS = ("root", "format", "train_split", "test_split", "class_names", "skip_corrupt",
                     "n_train", "n_test", "source_size", "make_seed")


def pretraining_recipe(recipe, source):
    """The recipe named by `model.backbone.pretrain`, set to this recipe's seed
    and images, or None. Returns (pretraining recipe, its source).

    `pretrain: RECIPE` (a bundled name or a path) makes `vislearn fit` train
    RECIPE first, in RUN_DIR/pretrain, and start the backbone from it as
    `from_run` would: the paper's two steps (e.g. YOLOv1's classification
    pretraining) from one command. RECIPE takes this recipe's `train.seed` and
    the `data:` keys in IMAGE_SOURCE_KEYS its data accepts, so it learns from
    the same images."""
    import inspect

    from vislearn.backbones import backbone_spec
    from vislearn.data import DATASETS

    backbone = recipe["model"].get("backbone")
    name = backbone.get("pretrain") if isinstance(backbone, dict) else None
    if name is None:
        return None
    where = f"{source}: model.backbone.pretrain"
    if backbone.get("from_run") is not None:
        raise ConfigError(f"{where}: give pretrain or from_run, not both")
    path = resolve_recipe(str(name), where)
    try:
        pretraining = read_yaml(path)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if not isinstance(pretraining, dict) or not isinstance(pretraining.get("data"), dict) \
            or not isinstance(pretraining.get("train"), dict):
        raise ConfigError(f"{where}: {path} is not a recipe (data: and train: sections)")
    builder = DATASETS.get(pretraining["data"].get("name"))
    accepted = inspect.signature(builder).parameters if builder else {}  # an unknown name: validate says so
    for key in IMAGE_SOURCE_KEYS:
        if key in recipe["data"] and key in accepted:
            pretraining["data"][key] = recipe["data"][key]
    pretraining["train"]["seed"] = recipe["train"]["seed"]
    model = pretraining.get("model")
    theirs = model.get("backbone") if isinstance(model, dict) else None
    if isinstance(theirs, dict) and theirs.get("pretrain") is not None:
        raise ConfigError(f"{where}: {path} has a pretrain step of its own; chain the runs with "
                          "backbone.from_run instead")
    validate(pretraining, str(path))
    if backbone_spec(theirs) != backbone_spec(backbone):
        raise ConfigError(f"{where}: {path} trains backbone {backbone_spec(theirs)}, this recipe's is "
                          f"{backbone_spec(backbone)}; use the same name and arguments")
    return pretraining, str(path)


def run_pretraining(recipe, source, model_section, run_dir, strategy, verbose):
    """Fit `model.backbone.pretrain` in RUN_DIR/pretrain (resuming it, or
    skipping it once finished) and return the model section with the backbone
    starting from that run (`from_run`)."""
    found = pretraining_recipe(recipe, source)
    if found is None:
        return model_section
    pretraining, pretraining_source = found
    pretrain_dir = Path(run_dir) / "pretrain"
    if (pretrain_dir / "metrics.json").exists() and not (pretrain_dir / "backup").exists():
        log.info("backbone pretraining %s already finished in %s", pretraining_source, pretrain_dir)
    else:
        log.info("pretraining the backbone first: %s in %s", pretraining_source, pretrain_dir)
        fit(pretraining, pretraining_source, pretrain_dir, verbose=verbose, strategy=strategy)
    import keras

    # The model starts from the same random state whether or not the
    # pretraining ran in this process (a resumed run skips it).
    keras.utils.set_random_seed(recipe["train"]["seed"])
    backbone = {k: v for k, v in model_section["backbone"].items() if k != "pretrain"}
    return {**model_section, "backbone": {**backbone, "from_run": str(pretrain_dir)}}


# ---------------------------------------------------------------- building


def method_of(recipe):
    return _methods()[recipe["model"]["name"]]


def build_data(recipe):
    from vislearn.data import DATASETS

    method = method_of(recipe)
    data_args = dict(recipe["data"])
    builder = DATASETS[data_args.pop("name")]
    data_args.update(method.data_args(recipe["model"]))
    data_args["seed"] = recipe["train"]["seed"]
    return builder(**data_args)


def complete_model_section(recipe, data):
    """The model section with what vislearn derives from the data filled in."""
    steps = recipe["train"].get("steps_per_epoch") or data.steps_per_epoch
    model_args = dict(recipe["model"])
    name = model_args.pop("name")
    model_args = method_of(recipe).model_args(model_args, data, recipe["train"]["epochs"] * steps)
    return {"name": name, **model_args}, steps


def build_model(recipe, model_section):
    model_args = dict(model_section)
    model_args.pop("name")
    model = method_of(recipe).model_class(**model_args)
    # A model on cached features takes [batch, dim] (what a SavedModel's default signature records).
    model.build((None, model.feature_dim) if getattr(model, "feature_dim", None) else (None, *model.image_shape))
    return model


def load_trained(run_dir, image_input=True):
    """Rebuild a run's model from its recipe and load its best (else last) weights.

    A model trained on cached features (`data.features`) comes back, with
    `image_input`, behind its extraction backbone (rebuilt from the features'
    manifest), so it embeds images too (exports, index build).

    Returns (recipe, model, data)."""
    import keras

    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise ConfigError(f"{run_dir}: not a run dir (no recipe.yaml)")
    recipe = read_yaml(recipe_file)
    model = recipe.get("model") if isinstance(recipe, dict) else None
    backbone = model.get("backbone") if isinstance(model, dict) else None
    if isinstance(backbone, dict):
        # The checkpoint holds the pretrained backbone's weights too: its run
        # dir, or the pretraining recipe, may be gone.
        recipe["model"]["backbone"] = {k: v for k, v in backbone.items() if k not in ("from_run", "pretrain")}
    validate(recipe, str(recipe_file))
    checkpoint = next((p for p in (run_dir / "checkpoints" / "best.weights.h5",
                                   run_dir / "checkpoints" / "last.weights.h5") if p.exists()), None)
    if checkpoint is None:
        raise ConfigError(f"{run_dir}: no checkpoint (checkpoints/best.weights.h5 or last.weights.h5); "
                          "has the run finished an epoch?")
    keras.utils.set_random_seed(recipe["train"]["seed"])
    data = build_data(recipe)
    model_section = dict(recipe["model"])
    if model_section.get("word_vectors"):
        model_section["word_vectors"] = None  # the checkpoint restores those rows; the file may be gone
    model = build_model(recipe, model_section)
    model.load_weights(str(checkpoint))
    if image_input and getattr(data, "features", None) is not None:
        from vislearn.features import WithExtractor

        model = WithExtractor(model, data.features.extractor())
    return recipe, model, data


# ---------------------------------------------------------------- running


def _comparable(recipe, model_keys=None):
    comparable = {k: v for k, v in recipe.items() if k not in RESUMABLE_DIFFERENCES}
    if model_keys is not None:  # ignore model values vislearn derived from the data
        comparable["model"] = {k: v for k, v in comparable.get("model", {}).items() if k in model_keys}
        given, derived = model_keys.get("backbone"), comparable["model"].get("backbone")
        if given in ("features", {"name": "features"}) and isinstance(derived, dict) \
                and derived.get("name") == "features":
            comparable["model"]["backbone"] = given  # its dim was filled in from data.features
    return comparable


def _first_difference(old, new, prefix=""):
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def check_run_dir(run_dir, recipe):
    """Refuse a run dir that holds another recipe's run or a finished run.

    Runs before any data is read, so a refusal is immediate."""
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir}: not empty and not a vislearn run dir (no recipe.yaml); "
                              "choose another --run-dir")
        return "new"
    previous = yaml.safe_load(recipe_file.read_text()) or {}
    difference = _first_difference(_comparable(previous, recipe["model"]), _comparable(recipe))
    if difference:
        raise ConfigError(f"{recipe_file}: the run dir holds a run of another recipe ({difference}); "
                          "choose another --run-dir")
    if (run_dir / "metrics.json").exists() and not (run_dir / "backup").exists():
        raise ConfigError(f"{run_dir}: holds a finished run (metrics.json); use `vislearn evaluate` "
                          "or choose another --run-dir")
    return "resume"


def default_run_dir(recipe_source):
    return Path("runs") / Path(recipe_source).stem


def fit(recipe, source, run_dir=None, strategy_name=None, verbose=None, strategy=None):
    """Train a validated recipe in `run_dir`, resuming an interrupted run there.

    strategy: a tf.distribute strategy to train under instead of building one
        (a pretraining step shares its recipe's: one multi-worker strategy per
        process).
    Returns the metrics dict written to `metrics.json`.
    """
    import keras

    from vislearn.distribute import is_chief, make_strategy
    from vislearn.evaluation.plots import plot_history
    from vislearn.optimizers import build_optimizer

    run_dir = Path(run_dir or default_run_dir(source))
    train = recipe["train"]
    chief = is_chief()
    state = check_run_dir(run_dir, recipe) if chief else "worker"
    strategy = strategy or make_strategy(strategy_name or (recipe.get("distribute") or {}).get("strategy", "auto"))
    keras.utils.set_random_seed(train["seed"])
    method = method_of(recipe)
    data = build_data(recipe)
    model_section, steps = complete_model_section(recipe, data)
    resolved = copy.deepcopy(recipe)
    resolved["model"] = model_section

    # Non-chief workers of a multi-worker run write to their own scratch dir.
    write_dir = run_dir if chief else run_dir / "workers" / f"task{os.getpid()}"
    write_dir.mkdir(parents=True, exist_ok=True)
    if chief and state == "new":
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    log.info("%s run in %s (%s)", {"new": "starting", "resume": "resuming"}.get(state, "joining"),
             run_dir, strategy.__class__.__name__)

    model_section = run_pretraining(recipe, source, model_section, run_dir, strategy, verbose)
    total_steps = train["epochs"] * steps
    with strategy.scope():
        model = build_model(recipe, model_section)
        model.compile(optimizer=build_optimizer(recipe.get("optimizer") or {"name": "adam"}, total_steps),
                      jit_compile="auto" if train.get("jit_compile") is None else train["jit_compile"])
    if model.jit_compile:
        log.info("train and test steps compiled with XLA (train.jit_compile)")

    checkpoints = write_dir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    monitor = train.get("monitor") or method.monitor
    callbacks = [
        # First, so the epoch is backed up before its history row is written.
        keras.callbacks.BackupAndRestore(str(write_dir / "backup"), delete_checkpoint=True),
        keras.callbacks.ModelCheckpoint(str(checkpoints / "last.weights.h5"), save_weights_only=True),
        keras.callbacks.ModelCheckpoint(str(checkpoints / "best.weights.h5"), save_weights_only=True,
                                        monitor=monitor, save_best_only=True,
                                        mode="min" if "loss" in monitor else "max"),
        keras.callbacks.CSVLogger(str(write_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(write_dir / "logs")),
    ]
    callbacks[1:1] = method.callbacks(model, data)  # e.g. a kNN monitor: before the loggers read the logs
    if verbose is None:
        verbose = train.get("verbose") or (1 if sys.stdout.isatty() else 2)
    model.fit(data.train, epochs=train["epochs"], steps_per_epoch=steps,
              validation_data=method.validation(data), validation_steps=train.get("validation_steps"),
              callbacks=callbacks, verbose=verbose, shuffle=False)

    metrics = method.metrics(model, data)
    if chief:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_history(run_dir / "history.csv", run_dir / "plots" / "history.png",
                     title=recipe.get("description", ""))
    else:
        shutil.rmtree(write_dir, ignore_errors=True)
        try:
            write_dir.parent.rmdir()  # `workers/`, once the last worker is gone
        except OSError:
            pass
    return metrics


def evaluate(run_dir):
    recipe, model, data = load_trained(run_dir, image_input=False)
    return method_of(recipe).metrics(model, data)


def export(run_dir, base, name=None, version=None):
    from vislearn.export import version_dir

    recipe, model, data = load_trained(run_dir)
    name = name or (recipe.get("export") or {}).get("name") or Path(run_dir).name
    path = version_dir(base, name, version)
    return method_of(recipe).export(model, path, data, recipe.get("export") or {})
