"""Small image backbones, built by name.

Every backbone is a functional `keras.Model` from an image tensor
(`input_shape`, float in [0, 1]) to a flat feature vector, so a method can put
any head on top. `BACKBONES` is the one name -> builder mapping recipes use.
"""

import difflib

import keras
from keras import layers


def dann_mnist(input_shape=(28, 28, 3), center=True, name="dann_mnist"):
    """The feature extractor of DANN's MNIST network (Ganin et al., 2016).

    conv 32 5x5 -> max-pool 2 -> conv 48 5x5 -> max-pool 2 -> flatten, with
    'valid' convolutions as in the paper (28 -> 24 -> 12 -> 8 -> 4).
    The FC100 -> FC100 label head and FC100 domain head live in the model.

    Args:
        center: subtract each image's mean pixel first (the reference
            implementations subtract a mean image), so overall brightness,
            which differs between domains, is not a feature.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if center:
        x = layers.Lambda(lambda t: t - keras.ops.mean(t, axis=(1, 2, 3), keepdims=True),
                          output_shape=tuple(input_shape), name="center")(x)
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
            x = layers.BatchNormalization(name=f"stage{stage}_bn{conv}")(x)
            x = layers.ReLU(name=f"stage{stage}_relu{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
    outputs = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


def _residual_block(x, filters, stride, name):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet_small(input_shape=(32, 32, 3), width=16, blocks_per_stage=(1, 1, 1), name="resnet_small"):
    """A CIFAR-style ResNet: 3x3 stride-1 stem without max-pool (as every
    small-image anchor uses), stages doubling the width and halving the size."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, blocks in enumerate(blocks_per_stage):
        for block in range(blocks):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = _residual_block(x, width * 2**stage, stride, name=f"stage{stage}_block{block}")
    outputs = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


BACKBONES = {
    "dann_mnist": dann_mnist,
    "small_cnn": small_cnn,
    "resnet_small": resnet_small,
}


def build_backbone(spec, input_shape):
    """Build a backbone from a name or a `{"name": ..., **kwargs}` dict."""
    if isinstance(spec, keras.Model):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in BACKBONES:
        close = difflib.get_close_matches(str(name), BACKBONES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"backbone.name: unknown backbone {name!r}{hint}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](input_shape=tuple(input_shape), **spec)
