"""SimCLR's view augmentation, batched, seeded, for tf.data and train steps.

`simclr_augment` turns a batch of images into one random view of each: a
random resized crop (area fraction in `crop_scale`, aspect ratio 3/4-4/3)
with a horizontal flip (p=0.5), optionally a random affine warp, a
stroke-width change and an elastic distortion (not SimCLR's: for digits,
`random_affine`, `random_stroke_width`, `random_elastic`), colour jitter
(brightness, contrast, saturation 0.8*s, hue 0.2*s) with p=0.8, grayscale
with p=0.2 and, optionally, a Gaussian blur with p=0.5 (sigma in [0.1, 2],
kernel ~1/10 of the image side). Each image draws its own parameters; the
jitter is applied in a fixed order (brightness, contrast, saturation, hue)
where the reference shuffles it, which keeps the op batched.

All randomness is stateless from one `seed` (shape [2]): the same seed gives
the same views, in tf.data (`map_views`) or inside a train step; without a
seed one is drawn from TensorFlow's global generator (seeded by
`keras.utils.set_random_seed`), and under tf.distribute the replica id is
folded in so replicas draw different views.

Reference:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, appendix A.
"""

import math

import tensorflow as tf

from vislearn.config import ConfigError


def split_seed(seed, count):
    """`count` independent stateless seeds from one."""
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), count))


def draw_seed(seed=None):
    """`seed` when given, else a stateless seed from the global generator,
    distinct per replica."""
    if seed is not None:
        return seed
    seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        seed += tf.cast(context.replica_id_in_sync_group, tf.int64) * 7919
    return seed


def _crop_boxes(batch, scale, ratio, flip, seeds):
    """Normalised [y1, x1, y2, x2] boxes of random resized crops; a flipped
    image gets its box with x1 > x2, which crop_and_resize reads mirrored."""
    area = tf.random.stateless_uniform([batch], seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([batch], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)                                       # width / height
    width = tf.minimum(tf.sqrt(area * aspect), 1.0)
    height = tf.minimum(tf.sqrt(area / aspect), 1.0)
    corner = tf.random.stateless_uniform([batch, 2], seeds[2])
    y1 = corner[:, 0] * (1.0 - height)
    x1 = corner[:, 1] * (1.0 - width)
    y2, x2 = y1 + height, x1 + width
    flipped = tf.random.stateless_uniform([batch], seeds[3]) < flip
    x1, x2 = tf.where(flipped, x2, x1), tf.where(flipped, x1, x2)
    return tf.stack([y1, x1, y2, x2], axis=1)


# tf.image.rgb_to_grayscale's weights (ITU-R BT.601).
LUMA = (0.2989, 0.587, 0.114)


def brightness_contrast_saturation(images, brightness, contrast, saturation):
    """Scale brightness, then contrast (about the image's mean luminance),
    then saturation (about each pixel's luminance), per image; clip to [0, 1].

    The three steps are linear in RGB, so they run as one 3x3 matrix and one
    offset per image: a single pass over the pixels instead of a dozen.

    Args:
        images: float (batch, height, width, 3).
        brightness, contrast, saturation: float (batch,) factors.
    """
    luma = tf.constant(LUMA, images.dtype)
    brightness, contrast, saturation = (tf.reshape(tf.cast(f, images.dtype), [-1, 1, 1])
                                        for f in (brightness, contrast, saturation))
    # Saturation: x -> s x + (1 - s) (x . luma) (1, 1, 1), i.e. x @ (s I + (1 - s) luma 1^T).
    desaturate = luma[:, None] * tf.ones([1, 3], images.dtype)
    matrix = brightness * contrast * (saturation * tf.eye(3, dtype=images.dtype) + (1 - saturation) * desaturate)
    # Contrast pulls towards the brightened image's mean luminance m; the
    # saturation matrix maps m (1, 1, 1) to m (s + (1 - s) sum(luma)) (1, 1, 1).
    mean = brightness[:, 0] * tf.reduce_sum(tf.reduce_mean(images, axis=[1, 2]) * luma, axis=-1, keepdims=True)
    offset = mean * (1 - contrast[:, 0]) * (saturation[:, 0] + (1 - saturation[:, 0]) * tf.reduce_sum(luma))
    jittered = tf.einsum("bhwc,bcd->bhwd", images, matrix) + offset[:, None, None, :]
    return tf.clip_by_value(jittered, 0.0, 1.0)


def _colour_jitter(images, strength, seeds):
    batch = tf.shape(images)[0]

    def factor(seed, amount):
        return tf.random.stateless_uniform([batch], seed, max(1.0 - amount, 0.0), 1.0 + amount)

    amount = 0.8 * strength
    x = brightness_contrast_saturation(images, factor(seeds[0], amount), factor(seeds[1], amount),
                                       factor(seeds[2], amount))
    hue = 0.2 * strength
    if hue > 0:
        hsv = tf.image.rgb_to_hsv(x)
        shift = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[3], -hue, hue)
        x = tf.image.hsv_to_rgb(tf.concat([tf.math.floormod(hsv[..., :1] + shift, 1.0), hsv[..., 1:]], -1))
    return tf.clip_by_value(x, 0.0, 1.0)


def gaussian_blur(images, sigma, kernel_size):
    """Blur each image with its own sigma (batch,): a separable Gaussian as
    one depthwise convolution over the batch folded into channels."""
    batch, height, width, channels = tf.unstack(tf.shape(images))
    radius = kernel_size // 2
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(offsets)[None, :] / (2.0 * tf.square(sigma)[:, None]))
    kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)                       # (batch, k)
    kernel = tf.repeat(kernel, channels, axis=0)                                 # (batch * c, k)
    folded = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, batch * channels])
    padded = tf.pad(folded, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.transpose(kernel)[:, None, :, None]                                # (k, 1, batch*c, 1)
    columns = tf.transpose(kernel)[None, :, :, None]                             # (1, k, batch*c, 1)
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, columns, [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(blurred, [height, width, batch, channels]), [2, 0, 1, 3])


AFFINE_KEYS = ("rotation", "zoom", "shear", "translate")


def _check_ranges(ranges, keys, where):
    """A view step's mapping of numbers >= 0, keyed by `keys` (or None)."""
    if ranges is None:
        return None
    if not isinstance(ranges, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(keys)} or null, received {ranges!r}")
    for key, value in ranges.items():
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of {list(keys)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}.{key}: expected a number >= 0, received {value!r}")
    return {key: float(value) for key, value in ranges.items()}


def check_affine(affine, where="affine"):
    """None, or a mapping of the random affine step's ranges (`AFFINE_KEYS`,
    each >= 0, zoom < 1) with the missing ones set to 0."""
    affine = _check_ranges(affine, AFFINE_KEYS, where)
    if affine is None:
        return None
    if affine.get("zoom", 0) >= 1:
        raise ConfigError(f"{where}.zoom: expected a zoom range below 1 (scales 1 - zoom to 1 + zoom), "
                          f"received {affine['zoom']!r}")
    return {key: affine.get(key, 0.0) for key in AFFINE_KEYS}


def random_affine(images, seeds, rotation=0.0, zoom=0.0, shear=0.0, translate=0.0):
    """A random affine warp of every image about its centre, zero-filled.

    Each image draws a rotation in [-rotation, rotation] degrees, a scale in
    [1 - zoom, 1 + zoom], a horizontal shear in [-shear, shear] (x += shear * y)
    and a shift in [-translate, translate] of its side along each axis: the
    small deformations handwriting varies by, which a flip or a tight crop
    would get wrong (a mirrored 2 is no digit; a crop of an 8 can be a 0).

    Args:
        images: float (batch, height, width, channels).
        seeds: 5 stateless seeds.
    """
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    angle = tf.random.stateless_uniform([batch], seeds[0], -rotation, rotation) * (math.pi / 180)
    scale = tf.random.stateless_uniform([batch], seeds[1], 1 - zoom, 1 + zoom)
    skew = tf.random.stateless_uniform([batch], seeds[2], -shear, shear)
    shift = tf.random.stateless_uniform([batch, 2], seeds[3], -translate, translate) * [width, height]
    # The transform maps each output pixel (x, y) to the input pixel it reads:
    # input = A (output - centre) + centre - shift, A = R(angle) S(skew) / scale.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1, a3, a4 = cos, cos * skew - sin, sin, sin * skew + cos
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a2 = cx - a0 * cx - a1 * cy - shift[:, 0]
    a5 = cy - a3 * cx - a4 * cy - shift[:, 1]
    zeros = tf.zeros([batch])
    transforms = tf.stack([a0, a1, a2, a3, a4, a5, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=[height, width], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


ELASTIC_KEYS = ("shift", "sigma")


def check_elastic(elastic, where="elastic"):
    """None, or a mapping of the elastic step's `shift` (>= 0) and `sigma`
    (> 0), both in pixels; a missing sigma is 4."""
    elastic = _check_ranges(elastic, ELASTIC_KEYS, where)
    if elastic is None:
        return None
    if elastic.get("sigma", 4.0) <= 0:
        raise ConfigError(f"{where}.sigma: expected a number > 0, received {elastic['sigma']!r}")
    return {"shift": elastic.get("shift", 0.0), "sigma": elastic.get("sigma", 4.0)}


def random_elastic(images, seed, shift=0.0, sigma=4.0):
    """A random elastic distortion of every image, zero-filled.

    As in Simard et al. (2003): each pixel draws a displacement uniform in
    [-1, 1] along both axes, the field is smoothed by a Gaussian of `sigma`
    pixels and each image's field is scaled so that its largest displacement
    is `shift` pixels (Simard scales by a fixed alpha instead); every output
    pixel then reads the input bilinearly at its displaced position. The
    strokes bend and wobble as one hand's do from one digit to the next,
    which no affine map does.

    Args:
        images: float (batch, height, width, channels).
        seed: a stateless seed.
    """
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    field = tf.random.stateless_uniform([batch, height, width, 2], seed, -1.0, 1.0)
    radius = min(int(2 * sigma), (min(height, width) - 1) // 2)      # REFLECT padding needs radius < side
    field = gaussian_blur(field, tf.fill([batch], sigma), 2 * radius + 1)
    field *= shift / (tf.reduce_max(tf.abs(field), axis=[1, 2, 3], keepdims=True) + 1e-6)
    rows, columns = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                                indexing="ij")
    x, y = columns + field[..., 0], rows + field[..., 1]
    x0, y0 = tf.floor(x), tf.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    image_index = tf.broadcast_to(tf.range(batch)[:, None, None], tf.shape(x))

    def read(ys, xs):
        # Pixels outside the image read as zero (the affine step's fill).
        inside = (ys >= 0) & (ys <= height - 1) & (xs >= 0) & (xs <= width - 1)
        ys = tf.clip_by_value(tf.cast(ys, tf.int32), 0, height - 1)
        xs = tf.clip_by_value(tf.cast(xs, tf.int32), 0, width - 1)
        return tf.gather_nd(images, tf.stack([image_index, ys, xs], -1)) * tf.cast(inside, images.dtype)[..., None]

    top = read(y0, x0) * (1 - wx) + read(y0, x0 + 1) * wx
    bottom = read(y0 + 1, x0) * (1 - wx) + read(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


def check_stroke_jitter(window, where="stroke_jitter"):
    """None, or the stroke-width step's window: an integer >= 2 (pixels)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"{where}: expected the window of the stroke-width step, an integer >= 2 "
                          f"(or null for none), received {window!r}")
    return window


def random_stroke_width(images, seed, window=3):
    """Thicken, thin or keep each image's strokes, a third of the images each.

    A grey-scale dilation (each pixel takes the largest value in its
    `window` x `window` neighbourhood) thickens bright strokes on a dark
    ground by about `window - 1` pixels; an erosion (the smallest) thins
    them as much. Pens and hands vary the width of a digit's strokes, which
    the affine and elastic steps leave as it was.

    Args:
        images: float (batch, height, width, channels), strokes brighter than the ground.
        seed: a stateless seed.
    """
    choice = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed)
    thick = tf.nn.max_pool2d(images, window, 1, "SAME")
    thin = -tf.nn.max_pool2d(-images, window, 1, "SAME")
    return tf.where(choice < 1 / 3, thick, tf.where(choice < 2 / 3, thin, images))


def check_probability(value, where="probability"):
    """A probability in [0, 1], as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: expected a probability in [0, 1], received {value!r}")
    return float(value)


def check_crop_scale(crop_scale, where="crop_scale"):
    """(min, max) area fractions with 0 < min <= max <= 1, as a tuple of floats."""
    try:
        low, high = (float(v) for v in crop_scale)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected [min, max] area fractions, received {crop_scale!r}") from None
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{where}: expected 0 < min <= max <= 1, received {[low, high]}")
    return low, high


def simclr_augment(images, seed=None, strength=0.5, blur=False, crop_scale=(0.08, 1.0),
                   ratio=(3 / 4, 4 / 3), flip=0.5, jitter_probability=0.8, grayscale_probability=0.2,
                   blur_probability=0.5, blur_sigma=(0.1, 2.0), affine=None, stroke_jitter=None, elastic=None):
    """One random SimCLR view of every image of a batch.

    Args:
        images: float (batch, height, width, 3) in [0, 1].
        seed: int tensor [2] for stateless randomness; None draws one.
        strength: colour jitter strength s (SimCLR: 1.0 ImageNet, 0.5 CIFAR).
        blur: apply the Gaussian blur with `blur_probability`.
        crop_scale: (min, max) area fraction of the crop.
        flip: probability of the horizontal flip.
        affine: None, or `random_affine`'s ranges (`{rotation, zoom, shear,
            translate}`), applied after the crop: not SimCLR's; the digits
            recipes use it in place of the flip.
        stroke_jitter: None, or `random_stroke_width`'s window, applied
            after the affine step: not SimCLR's either; for digits.
        elastic: None, or `random_elastic`'s `{shift, sigma}`, applied
            after that: not SimCLR's either; for digits.

    Returns:
        Views, float32 (batch, height, width, 3) in [0, 1].
    """
    if strength < 0:
        raise ConfigError(f"strength: expected a colour jitter strength >= 0, received {strength}")
    crop_scale = check_crop_scale(crop_scale)
    images = tf.convert_to_tensor(images, tf.float32)
    seed = draw_seed(seed)
    seeds = split_seed(seed, 12)
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]

    boxes = _crop_boxes(batch, crop_scale, ratio, flip, seeds[:4])
    x = tf.image.crop_and_resize(images, boxes, tf.range(batch), [height, width])
    # The optional steps take seeds of their own, folded off the view's seed,
    # so the other steps draw what they drew without them.
    def own_seed(salt):
        return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), salt)

    affine = check_affine(affine)
    if affine is not None:
        x = random_affine(x, split_seed(own_seed(12), 5), **affine)
    stroke_jitter = check_stroke_jitter(stroke_jitter)
    if stroke_jitter is not None:
        x = random_stroke_width(x, own_seed(14), stroke_jitter)
    elastic = check_elastic(elastic)
    if elastic is not None:
        x = random_elastic(x, own_seed(13), **elastic)

    if strength > 0:
        jitter = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[4]) < jitter_probability
        x = tf.where(jitter, _colour_jitter(x, strength, seeds[5:9]), x)
    gray = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[9]) < grayscale_probability
    # The one-channel luminance broadcasts to three: several times cheaper than tiling it.
    x = tf.where(gray, tf.image.rgb_to_grayscale(x), x)
    if blur:
        kernel_size = max(3, (height // 10) | 1)                    # odd, ~10% of the side
        sigma = tf.random.stateless_uniform([batch], seeds[10], *blur_sigma)
        blurred = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[11]) < blur_probability
        x = tf.where(blurred, gaussian_blur(x, sigma, kernel_size), x)
    return tf.clip_by_value(x, 0.0, 1.0)


def map_views(dataset, seed=0, views=2, **options):
    """Map a dataset of image batches to tuples of `views` augmented views,
    reproducibly: batch i uses seeds derived from (seed, i)."""
    def augment(index, images):
        base = tf.stack([tf.cast(seed, tf.int64), index])
        return tuple(simclr_augment(images, seed=s, **options) for s in split_seed(base, views))

    return dataset.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE)


def random_resized_crops(images, crop_scale, seed=None):
    """Only the geometric part of the views: a random resized crop of every
    image (area fraction in `crop_scale`), no flip and no colour change, for
    pretext tasks whose labels a flip or a colour change would corrupt."""
    return simclr_augment(images, seed=seed, strength=0.0, crop_scale=crop_scale, flip=0.0,
                          grayscale_probability=0.0)
