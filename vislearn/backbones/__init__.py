"""Small image backbones, built by name.

Every backbone is a functional `keras.Model` from an image tensor
(`input_shape`, float in [0, 1]) to a flat feature vector, so a method can put
any head on top. `BACKBONES` is the one name -> builder mapping recipes use.
"""

import difflib

import keras
from keras import layers

from vislearn.config import ConfigError

# Batch-norm moving-average momentum of every vislearn network (PyTorch's 0.1
# is Keras' 0.9). Keras' default 0.99 averages over ~100 steps; in runs of a
# few hundred to a few thousand steps the weights move faster than that, the
# moving variances go stale, and inference-mode outputs (evaluation, probes,
# exports) fall far below training-mode ones. Seen in YOLOv1, the two-branch
# model and the probes of the self-supervised encoders.
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="vislearn")
class PerImageCentering(layers.Layer):
    """Subtracts each image's mean over height, width and channels."""

    def call(self, images):
        return images - keras.ops.mean(images, axis=(1, 2, 3), keepdims=True)


def spatial_encoder(encoder, needed_by):
    """The backbone up to its global pooling / flattening: image -> [B, h, w, C] (shared weights)."""
    feature_map = encoder.layers[-1].input
    if len(feature_map.shape) != 4:
        raise ConfigError(f"model.backbone: {encoder.name} has no spatial feature map before its last layer "
                          f"(received shape {feature_map.shape}); {needed_by} needs one")
    return keras.Model(encoder.inputs, feature_map, name=f"{encoder.name}_map")


def dann_mnist(input_shape=(28, 28, 3), center=False, name="dann_mnist"):
    """The feature extractor of DANN's MNIST network (Ganin et al., 2016).

    conv 32 5x5 -> max-pool 2 -> conv 48 5x5 -> max-pool 2 -> flatten, with
    'valid' convolutions as in the paper (28 -> 24 -> 12 -> 8 -> 4).
    The FC100 -> FC100 label head and FC100 domain head live in the model.

    Args:
        center: subtract each image's mean pixel first, so overall
            brightness is not a feature (off by default: on digits -> digits-M
            it lowered DANN's target accuracy).
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if center:
        x = PerImageCentering(name="center")(x)
    x = layers.Conv2D(32, 5, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(48, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    outputs = layers.Flatten(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


def small_cnn(input_shape=(32, 32, 3), width=32, depth=3, name="small_cnn"):
    """A VGG-like stack: `depth` stages of conv-BN-ReLU x2 and a stride-2 pool,
    channels doubling from `width`, then global average pooling."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for stage in range(depth):
        filters = width * 2**stage
        for conv in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              name=f"stage{stage}_conv{conv}")(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"stage{stage}_bn{conv}")(x)
            x = layers.ReLU(name=f"stage{stage}_relu{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
    outputs = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


def _residual_block(x, filters, stride, name):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet_small(input_shape=(32, 32, 3), width=16, blocks_per_stage=(1, 1, 1), name="resnet_small"):
    """A CIFAR-style ResNet: 3x3 stride-1 stem without max-pool (as every
    small-image anchor uses), stages doubling the width and halving the size."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, blocks in enumerate(blocks_per_stage):
        for block in range(blocks):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = _residual_block(x, width * 2**stage, stride, name=f"stage{stage}_block{block}")
    outputs = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


def csp_darknet(input_shape=(160, 160, 3), width_multiplier=0.125, depth_multiplier=0.33, output_stride=32,
                name="csp_darknet"):
    """The anchor-free YOLO's CSP-darknet backbone and PAN neck, read at one of
    its three outputs (`output_stride` 8, 16 or 32), then global average pooling.

    A detector that needs the grid (YOLOv1) cuts the pooling off, so it gets
    a map that has already mixed the scales.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"backbone.output_stride: expected 8, 16 or 32, received {output_stride!r}")
    # Imported here: the model module imports this one for BN_MOMENTUM.
    from vislearn.models.yolo_anchor_free import csp_darknet_pan

    features = csp_darknet_pan(tuple(input_shape), width_multiplier, depth_multiplier, name=f"{name}_pan")
    level = {8: 0, 16: 1, 32: 2}[output_stride]
    outputs = layers.GlobalAveragePooling2D(name="features")(features.outputs[level])
    return keras.Model(features.inputs, outputs, name=name)


BACKBONES = {
    "dann_mnist": dann_mnist,
    "small_cnn": small_cnn,
    "resnet_small": resnet_small,
    "csp_darknet": csp_darknet,
}


def build_backbone(spec, input_shape):
    """Build a backbone from a name or a `{"name": ..., **kwargs}` dict.

    Two keys are not builder arguments:
        from_run: a vislearn run dir (e.g. a self-supervised pretraining run);
            the backbone starts from the weights of that run's encoder (its best,
            else last, checkpoint). The run's backbone must have the same name
            and the same weight shapes, else a ConfigError names both.
        trainable: false freezes the backbone (a linear-probe-style transfer).
    A third, `pretrain: RECIPE`, is `vislearn fit`'s (it fits RECIPE first and
    passes its run dir as from_run); here it is an error.
    """
    if isinstance(spec, keras.Model):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    from_run = spec.pop("from_run", None)
    trainable = spec.pop("trainable", True)
    if spec.pop("pretrain", None) is not None:
        raise ValueError("backbone.pretrain: a step of `vislearn fit` (recipes.fit); in a script, fit the "
                         "pretraining recipe first and pass its run dir as backbone.from_run")
    name = spec.pop("name", None)
    if name not in BACKBONES:
        close = difflib.get_close_matches(str(name), BACKBONES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"backbone.name: unknown backbone {name!r}{hint}; expected one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name](input_shape=tuple(input_shape), **spec)
    if from_run is not None:
        load_backbone_from_run(backbone, from_run, {"name": name, **spec})
    if not isinstance(trainable, bool):
        raise ValueError(f"backbone.trainable: expected a boolean, received {trainable!r}")
    backbone.trainable = trainable
    return backbone


def backbone_spec(spec):
    """The builder's name and arguments of a backbone spec (what fixes its weights' shapes)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    for key in ("from_run", "trainable", "pretrain"):
        spec.pop(key, None)
    return spec


def pretrained_encoder(run_dir):
    """The encoder (or DANN feature extractor) of a finished or interrupted run,
    with the weights of its best (else last) checkpoint. Returns (encoder, spec)."""
    from pathlib import Path

    from vislearn.config import ConfigError
    from vislearn.evaluation.representation import encoder_of
    from vislearn.recipes import build_model, read_yaml

    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise ConfigError(f"backbone.from_run: {run_dir} is not a vislearn run dir (no recipe.yaml)")
    checkpoint = next((p for p in (run_dir / "checkpoints" / "best.weights.h5",
                                   run_dir / "checkpoints" / "last.weights.h5") if p.exists()), None)
    if checkpoint is None:
        raise ConfigError(f"backbone.from_run: {run_dir} has no checkpoint (checkpoints/best.weights.h5 "
                          "or last.weights.h5); has the run finished an epoch?")
    recipe = read_yaml(recipe_file)
    model_section = dict(recipe["model"])
    spec = backbone_spec(model_section.get("backbone", "dann_mnist"))
    # Build the run's model on its own weights only (not on its own from_run).
    model_section["backbone"] = spec
    model = build_model(recipe, model_section)
    model.load_weights(str(checkpoint))
    return encoder_of(model), spec


def load_backbone_from_run(backbone, run_dir, spec):
    """Copy the weights of `run_dir`'s encoder into `backbone` (built from `spec`)."""
    from vislearn.config import ConfigError

    source, source_spec = pretrained_encoder(run_dir)
    spec = backbone_spec(spec)
    source_weights, weights = source.get_weights(), backbone.get_weights()
    compatible = source_spec.get("name") == spec.get("name") and len(source_weights) == len(weights) and all(
        a.shape == b.shape for a, b in zip(source_weights, weights))
    if not compatible:
        raise ConfigError(f"backbone.from_run: {run_dir} holds backbone {source_spec}, incompatible with the "
                          f"requested backbone {spec}; use the same name and arguments")
    backbone.set_weights(source_weights)
