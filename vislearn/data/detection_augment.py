"""Detection-aware resizing and the YOLOv1 paper's data augmentation.

Every function takes and returns one detection element (see
`vislearn.data.detection`: `image` float [H, W, 3] in [0, 1], `boxes`
`rel_yxyx` [N, 4], `classes` [N], `difficult` [N], `image_id`) and moves the
boxes with the pixels. Boxes that leave the image are clipped, and those left
thinner than `min_size` (normalised) are dropped together with their class and
flag, as darknet does after its crop-and-jitter.

The deterministic transforms (`scale_translate`, `flip_horizontal`,
`adjust_exposure_saturation`) take explicit parameters and are what the tests
pin down; `random_*` draw those parameters; `yolo_v1_augment` chains them.
The draws are stateless: given a `seed` (int [2]) they are the same in every
run however `tf.data` schedules its parallel maps (stateful random ops there
made every YOLO run differ); without one, a seed is drawn from TensorFlow's
global generator.

keras-cv 0.9's `RandomFlip`/`Resizing` handle boxes on *batched* tensors, but
under Keras 3.15 they reject numpy inputs, and keras-cv has no HSV exposure
jitter, so these per-element ops are written in plain TensorFlow (they run in
`tf.data.Dataset.map` before batching). The tests cross-check the flip against
keras-cv's `RandomFlip`.

Reference:
    Redmon et al., "You Only Look Once: Unified, Real-Time Object Detection",
    CVPR 2016, section 2.2: "random scaling and translations of up to 20% of
    the original image size ... randomly adjust the exposure and saturation
    of the image by up to a factor of 1.5 in the HSV color space."
"""

import tensorflow as tf

from vislearn.data.views import draw_seed, split_seed

GREY = 0.5  # fill for pixels with no source (letterbox bars, translated-in borders)


def _keep_boxes(element, boxes, min_size):
    """Clip boxes to the image and drop those thinner than `min_size`, with their labels."""
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    out = dict(element)
    out["boxes"] = tf.boolean_mask(boxes, keep)
    for key in ("classes", "difficult"):
        if key in element:
            out[key] = tf.boolean_mask(element[key], keep)
    return out


def resize(element, size):
    """Stretch the image to `size` = (height, width); normalised boxes are unchanged.

    This is YOLOv1's own input handling (every image warped to 448x448).
    """
    out = dict(element)
    image = tf.image.resize(element["image"], size, antialias=True)
    image.set_shape([*size, 3])
    out["image"] = tf.clip_by_value(image, 0.0, 1.0)  # antialiased kernels overshoot slightly
    return out


def letterbox(element, size, fill=GREY):
    """Resize keeping the aspect ratio and pad the rest with `fill` to `size` = (height, width).

    Returns:
        The element with the new image and boxes, plus `letterbox` float [4]:
        `(scale_y, scale_x, offset_y, offset_x)` in normalised units of the
        output, so `unletterbox_boxes` maps predictions back to the original.
    """
    image = element["image"]
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    target_h, target_w = float(size[0]), float(size[1])
    ratio = tf.minimum(target_h / height, target_w / width)
    new_h = tf.cast(tf.round(height * ratio), tf.int32)
    new_w = tf.cast(tf.round(width * ratio), tf.int32)
    resized = tf.clip_by_value(tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True), 0.0, 1.0)
    top = (size[0] - new_h) // 2
    left = (size[1] - new_w) // 2
    padded = tf.pad(resized - fill, [[top, size[0] - new_h - top], [left, size[1] - new_w - left], [0, 0]]) + fill
    padded.set_shape([*size, 3])
    scale = tf.stack([tf.cast(new_h, tf.float32) / target_h, tf.cast(new_w, tf.float32) / target_w])
    offset = tf.stack([tf.cast(top, tf.float32) / target_h, tf.cast(left, tf.float32) / target_w])
    out = dict(element)
    out["image"] = padded
    out["boxes"] = tf.cast(element["boxes"], tf.float32) * tf.tile(scale, [2]) + tf.tile(offset, [2])
    out["letterbox"] = tf.concat([scale, offset], axis=0)
    return out


def unletterbox_boxes(boxes, letterbox_params):
    """Map `rel_yxyx` boxes on a letterboxed image back to the original image."""
    scale, offset = letterbox_params[..., :2], letterbox_params[..., 2:]
    return tf.clip_by_value((boxes - tf.tile(offset, [2])) / tf.tile(scale, [2]), 0.0, 1.0)


def scale_translate(element, scale, shift_y, shift_x, fill=GREY, min_size=0.002):
    """Zoom the image by `scale` about its centre, then move its content by
    (`shift_y`, `shift_x`) fractions of the image size; output size unchanged.

    A point at normalised `p` moves to `(p - 0.5) * scale + 0.5 + shift`.
    Pixels with no source take `fill`.
    """
    image = element["image"]
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(scale, tf.float32)
    shift = tf.cast(tf.stack([shift_y, shift_x]), tf.float32)
    # The output shows the source window [origin, origin + 1/scale].
    origin = 0.5 - (0.5 + shift) / scale
    window = 1.0 / scale
    # crop_and_resize samples output row j at source pixel y1*(H-1) + j*(y2-y1)*(H-1)/(H-1)
    # (corner-aligned); pick y1, y2 so output pixel centres (j + 0.5)/H map to
    # source pixel centres under the continuous mapping above.
    sizes = tf.stack([height, width])
    first = (origin + 0.5 * window / sizes) * sizes - 0.5
    last = (origin + (sizes - 0.5) * window / sizes) * sizes - 0.5
    crop_box = tf.concat([first / (sizes - 1.0), last / (sizes - 1.0)], axis=0)
    warped = tf.image.crop_and_resize(image[None], crop_box[None], [0], shape[:2],
                                      extrapolation_value=fill)[0]
    warped.set_shape(image.shape)
    boxes = (tf.cast(element["boxes"], tf.float32) - tf.tile(origin, [2])) / window
    out = _keep_boxes(element, boxes, min_size)
    out["image"] = warped
    return out


def flip_horizontal(element):
    """Mirror left-right; `xmin, xmax` become `1 - xmax, 1 - xmin`."""
    out = dict(element)
    out["image"] = element["image"][:, ::-1, :]
    ymin, xmin, ymax, xmax = tf.unstack(tf.cast(element["boxes"], tf.float32), 4, axis=-1)
    out["boxes"] = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
    return out


def adjust_exposure_saturation(element, exposure, saturation):
    """Multiply HSV value by `exposure` and saturation by `saturation`, clipped to [0, 1].

    Boxes are unchanged. Computed in RGB, without the HSV round trip (a
    cheaper input pipeline on a CPU): with V the largest channel and
    S = 1 - min / V, every channel is c = V (1 - S k) with k fixed by the
    hue, so scaling S by a factor r and V to V' gives c' = V' (1 - r (1 - c / V));
    r = min(saturation, 1 / S) is the clipping. (The tf.where below evaluates
    both branches, hence the guarded divisions.)
    """
    image = element["image"]
    value = tf.reduce_max(image, axis=-1, keepdims=True)
    safe_value = tf.maximum(value, 1e-12)
    sat = 1.0 - tf.reduce_min(image, axis=-1, keepdims=True) / safe_value
    ratio = tf.where(sat * saturation > 1.0, 1.0 / tf.maximum(sat, 1e-12), saturation)
    new_value = tf.clip_by_value(value * exposure, 0.0, 1.0)
    out = dict(element)
    out["image"] = tf.clip_by_value(new_value * (1.0 - ratio * (1.0 - image / safe_value)), 0.0, 1.0)
    return out


def _factor(max_factor, seed):
    """darknet's rand_scale: a factor in [1, max] inverted half the time, so
    brightening and darkening by the same ratio are equally likely."""
    draws = tf.random.stateless_uniform([2], seed)
    factor = 1.0 + draws[0] * (max_factor - 1.0)
    return tf.where(draws[1] < 0.5, factor, 1.0 / factor)


def random_scale_translate(element, max_scale=0.2, max_shift=0.2, fill=GREY, seed=None):
    """Random zoom in [1 - max_scale, 1 + max_scale] and shifts up to `max_shift` of the size."""
    draws = tf.random.stateless_uniform([3], draw_seed(seed), -1.0, 1.0)
    return scale_translate(element, 1.0 + max_scale * draws[0], max_shift * draws[1], max_shift * draws[2],
                           fill=fill)


def random_flip(element, seed=None):
    """Mirror left-right with probability 0.5."""
    return tf.cond(tf.random.stateless_uniform([], draw_seed(seed)) < 0.5,
                   lambda: flip_horizontal(element), lambda: dict(element))


def random_exposure_saturation(element, max_factor=1.5, seed=None):
    """Exposure and saturation each scaled by up to `max_factor` (or its inverse)."""
    exposure_seed, saturation_seed = split_seed(draw_seed(seed), 2)
    return adjust_exposure_saturation(element, _factor(max_factor, exposure_seed),
                                      _factor(max_factor, saturation_seed))


def yolo_v1_augment(element, size=(448, 448), max_scale=0.2, max_shift=0.2, max_exposure=1.5,
                    max_saturation=1.5, flip=True, seed=None):
    """The YOLOv1 training pipeline for one element: resize to `size`, random
    scale/translate, horizontal flip, exposure and saturation jitter in HSV.

    Args:
        size: [height, width] to resize to first, or None for an element
            already at its training size (the training pipelines cache images
            resized).
        seed: int [2] for the stateless random draws (the same seed, the same
            jitter); None draws one from the global generator.

    Returns:
        The augmented element; `image` is `size` + (3,).
    """
    scale_seed, flip_seed, colour_seed = split_seed(draw_seed(seed), 3)
    if size is not None:
        element = resize(element, size)
    element = random_scale_translate(element, max_scale, max_shift, seed=scale_seed)
    if flip:
        element = random_flip(element, seed=flip_seed)
    exposure_seed, saturation_seed = split_seed(colour_seed, 2)
    return adjust_exposure_saturation(element, _factor(max_exposure, exposure_seed),
                                      _factor(max_saturation, saturation_seed))
