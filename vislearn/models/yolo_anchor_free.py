"""An anchor-free YOLO (YOLOv8-style): multi-scale decoupled head, task-aligned assignment, CIoU + DFL.

A CSP-darknet backbone (convolutions with batch norm and SiLU, C2f blocks,
SPPF) gives features at strides 8, 16 and 32; a PAN neck mixes them top-down
and bottom-up. Every cell of each feature map is an anchor *point* (no anchor
boxes): a decoupled head predicts there, in one branch, a distribution over
`reg_max` bins for each of the four distances from the point to the box
sides and, in another, one sigmoid logit per class. Training assigns ground
truth to points by TOOD's task-aligned metric and scores boxes with CIoU and
the distribution focal loss (`vislearn.losses.yolo_anchor_free`). At test
time boxes are the distributions' expectations, scores the class
probabilities, pruned by per-class non-maximum suppression.

Reference:
    Jocher, Chaurasia, Qiu, "Ultralytics YOLOv8" (2023,
    https://github.com/ultralytics/ultralytics); Feng et al., "TOOD:
    Task-aligned One-stage Object Detection", ICCV 2021
    (https://arxiv.org/abs/2108.07755); Li et al., "Generalized Focal Loss",
    NeurIPS 2020 (https://arxiv.org/abs/2006.04388).
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from vislearn.backbones import BN_MOMENTUM
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses.yolo_anchor_free import anchor_free_loss
from vislearn.models.yolo_v1 import per_class_nms

STRIDES = (8, 16, 32)
# YOLOv8 at width and depth 1: channels of the stem and strides 4..32, C2f
# depths at strides 4..32 and in the neck. (YOLOv8n = width 0.25, depth 0.33.)
CHANNELS = (64, 128, 256, 512, 1024)
DEPTHS = (3, 6, 6, 3)
NECK_DEPTH = 3


def _conv(x, filters, kernel, stride, name):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # Momentum 0.9, not Keras' 0.99: short CPU runs move the weights faster
    # than a 100-step average follows, and stale statistics wreck inference.
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3, name=f"{name}_bn")(x)
    return layers.Activation("silu", name=f"{name}_silu")(x)


def _c2f(x, filters, depth, shortcut, name):
    """YOLOv8's C2f: two halves, bottlenecks chained on the second, every stage concatenated."""
    half = filters // 2
    # Two 1x1 convs are the same as YOLOv8's one 1x1 conv split in half.
    parts = [_conv(x, half, 1, 1, f"{name}_a"), _conv(x, half, 1, 1, f"{name}_b")]
    for i in range(depth):
        y = _conv(parts[-1], half, 3, 1, f"{name}_m{i}_1")
        y = _conv(y, half, 3, 1, f"{name}_m{i}_2")
        parts.append(layers.Add(name=f"{name}_m{i}_add")([parts[-1], y]) if shortcut else y)
    return _conv(layers.Concatenate(name=f"{name}_cat")(parts), filters, 1, 1, f"{name}_out")


def _sppf(x, filters, name):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""
    x = _conv(x, x.shape[-1] // 2, 1, 1, f"{name}_in")
    pools = [x]
    for i in range(3):
        pools.append(layers.MaxPooling2D(5, strides=1, padding="same", name=f"{name}_pool{i}")(pools[-1]))
    return _conv(layers.Concatenate(name=f"{name}_cat")(pools), filters, 1, 1, f"{name}_out")


def csp_darknet_pan(input_shape, width_multiplier=0.25, depth_multiplier=0.33, name="csp_darknet_pan"):
    """YOLOv8's backbone and PAN neck.

    Returns:
        Functional `keras.Model` from images [H, W, 3] in [0, 1] to the list
        of feature maps at strides 8, 16 and 32.
    """
    c = [max(8, int(round(ch * width_multiplier / 8)) * 8) for ch in CHANNELS]
    d = [max(1, round(n * depth_multiplier)) for n in DEPTHS]
    neck = max(1, round(NECK_DEPTH * depth_multiplier))
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv(inputs, c[0], 3, 2, "stem")
    features = []
    for level in range(1, 5):
        x = _conv(x, c[level], 3, 2, f"down{level}")
        x = _c2f(x, c[level], d[level - 1], True, f"c2f{level}")
        if level >= 2:
            features.append(x)
    p3, p4, p5 = features[0], features[1], _sppf(x, c[4], "sppf")
    # Top-down, then bottom-up (no residuals inside the neck's C2f, as YOLOv8).
    up = layers.UpSampling2D(2, name="up5")(p5)
    n4 = _c2f(layers.Concatenate(name="cat_up4")([up, p4]), c[3], neck, False, "td4")
    up = layers.UpSampling2D(2, name="up4")(n4)
    out3 = _c2f(layers.Concatenate(name="cat_up3")([up, p3]), c[2], neck, False, "td3")
    down = _conv(out3, c[2], 3, 2, "pan_down3")
    out4 = _c2f(layers.Concatenate(name="cat_down4")([down, n4]), c[3], neck, False, "bu4")
    down = _conv(out4, c[3], 3, 2, "pan_down4")
    out5 = _c2f(layers.Concatenate(name="cat_down5")([down, p5]), c[4], neck, False, "bu5")
    return keras.Model(inputs, [out3, out4, out5], name=name)


def anchor_points(image_shape, strides=STRIDES):
    """Centres `(y, x)` of every feature cell in pixels [A, 2] and their strides [A], scale by scale."""
    points, point_strides = [], []
    for stride in strides:
        rows, cols = image_shape[0] // stride, image_shape[1] // stride
        y, x = np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij")
        points.append(np.stack([y.ravel(), x.ravel()], axis=-1) * stride)
        point_strides.append(np.full(rows * cols, stride))
    return np.concatenate(points).astype("float32"), np.concatenate(point_strides).astype("float32")


@keras.saving.register_keras_serializable(package="vislearn")
class YoloAnchorFree(keras.Model):
    """Anchor-free YOLO detector (YOLOv8-style).

    Args:
        num_classes: C.
        image_shape: (height, width, channels), sides divisible by 32.
        width_multiplier: scales YOLOv8's channels (64 ... 1024); 0.25 is
            YOLOv8n, smaller suits a CPU demo.
        depth_multiplier: scales the C2f depths (3, 6, 6, 3); 0.33 is YOLOv8n.
        reg_max: bins of each side's distance distribution (YOLOv8: 16), so
            a box side lies at most `(reg_max - 1) * stride` from its point.
        topk: anchors each ground-truth box takes (YOLOv8: 10).
        alpha: exponent of the class score in the alignment metric (0.5).
        beta: exponent of the CIoU in the alignment metric (6.0).
        box_gain, cls_gain, dfl_gain: weights of the loss terms (7.5, 0.5, 1.5).

    Call arguments:
        images: float tensor (batch, height, width, 3) in [0, 1].
        training: batch-norm mode.

    Returns:
        A list with one tensor per stride (8, 16, 32), float (batch, H / s,
        W / s, 4 * reg_max + C): the distance logits of (top, left, bottom,
        right), `reg_max` each, then the class logits. `detect` turns them
        into boxes.

    Training data:
        Batches as `vislearn.data.detection.pad_batch` makes them (dicts with
        `image`, `boxes` `rel_yxyx`, `classes` with -1 padding, optional
        `difficult`, which is left out of the assignment), or `(images,
        dict of boxes/classes[/difficult])`. Assignment runs inside the step.
    """

    def __init__(
        self,
        num_classes=80,
        image_shape=(640, 640, 3),
        width_multiplier=0.25,
        depth_multiplier=0.33,
        reg_max=16,
        topk=10,
        alpha=0.5,
        beta=6.0,
        box_gain=7.5,
        cls_gain=0.5,
        dfl_gain=1.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for key, value in (("num_classes", num_classes), ("topk", topk)):
            if int(value) < 1:
                raise ValueError(f"model.{key}: expected a positive integer, received {value!r}")
        if int(reg_max) < 2:
            raise ValueError(f"model.reg_max: expected an integer >= 2, received {reg_max!r}")
        for key, value in (("width_multiplier", width_multiplier), ("depth_multiplier", depth_multiplier)):
            if not value > 0:
                raise ValueError(f"model.{key}: expected a positive number, received {value!r}")
        if image_shape[0] % 32 or image_shape[1] % 32:
            raise ValueError(f"model.image_shape: height and width must be multiples of 32 (the largest "
                             f"stride), received {tuple(image_shape)}")
        self.num_classes = int(num_classes)
        self.image_shape = tuple(image_shape)
        self.width_multiplier = float(width_multiplier)
        self.depth_multiplier = float(depth_multiplier)
        self.reg_max = int(reg_max)
        self.topk = int(topk)
        self.alpha, self.beta = float(alpha), float(beta)
        self.box_gain, self.cls_gain, self.dfl_gain = float(box_gain), float(cls_gain), float(dfl_gain)

        self.features = csp_darknet_pan(self.image_shape, self.width_multiplier, self.depth_multiplier)
        self.heads = [self._head(shape[1:], stride) for shape, stride in zip(self.features.output_shape, STRIDES)]
        anchors, strides = anchor_points(self.image_shape)
        self.anchors, self.strides = tf.constant(anchors), tf.constant(strides)
        self.bins = tf.range(self.reg_max, dtype=tf.float32)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", "box_loss", "cls_loss", "dfl_loss")}

    def _head(self, feature_shape, stride):
        """YOLOv8's decoupled head at one scale: a box branch and a class branch of two 3x3 convs each."""
        p3_channels = self.features.output_shape[0][-1]
        box_width = max(16, p3_channels // 4, 4 * self.reg_max)
        class_width = max(p3_channels, min(self.num_classes, 100))
        inputs = keras.Input(feature_shape)
        box = _conv(_conv(inputs, box_width, 3, 1, "box1"), box_width, 3, 1, "box2")
        # Uniform distributions at the start (expected distance (reg_max - 1) / 2).
        box = layers.Conv2D(4 * self.reg_max, 1, bias_initializer=keras.initializers.Constant(1.0),
                            name="box_logits")(box)
        cls = _conv(_conv(inputs, class_width, 3, 1, "cls1"), class_width, 3, 1, "cls2")
        # YOLOv8's prior: about 5 objects per image at each scale, so the
        # classification loss does not start swamped by easy negatives.
        cells = (self.image_shape[0] // stride) * (self.image_shape[1] // stride)
        prior = math.log(5 / self.num_classes / cells)
        cls = layers.Conv2D(self.num_classes, 1, bias_initializer=keras.initializers.Constant(prior),
                            name="class_logits")(cls)
        return keras.Model(inputs, layers.Concatenate(name="outputs")([box, cls]), name=f"head_p{stride}")

    def call(self, images, training=False):
        features = self.features(images, training=training)
        return [head(x, training=training) for head, x in zip(self.heads, features)]

    def flatten_outputs(self, outputs):
        """Per-scale outputs -> box logits [batch, A, 4, reg_max], class logits [batch, A, C], boxes [batch, A, 4].

        Boxes are `yxyx` in pixels of the network input, the expectation of
        each side's distribution times the stride, measured from the point.
        """
        flat = tf.concat([tf.reshape(tf.cast(o, tf.float32), [tf.shape(o)[0], -1, o.shape[-1]])
                          for o in outputs], axis=1)
        box_logits = tf.reshape(flat[..., :4 * self.reg_max], [tf.shape(flat)[0], -1, 4, self.reg_max])
        class_logits = flat[..., 4 * self.reg_max:]
        distances = tf.reduce_sum(tf.nn.softmax(box_logits, axis=-1) * self.bins, axis=-1) * self.strides[:, None]
        boxes = tf.concat([self.anchors - distances[..., :2], self.anchors + distances[..., 2:]], axis=-1)
        return box_logits, class_logits, boxes

    def detect(self, images, score_threshold=0.005, iou_threshold=0.5, max_detections=100):
        """Boxes of a batch of images after per-class NMS; the outputs of
        `vislearn.models.yolo_v1.decode_yolo_v1` (`rel_yxyx` on the input)."""
        _, class_logits, boxes = self.flatten_outputs(self(images, training=False))
        size = tf.constant([self.image_shape[0], self.image_shape[1]] * 2, tf.float32)
        return per_class_nms(boxes / size, tf.sigmoid(class_logits), score_threshold, iou_threshold,
                             max_detections)

    def build(self, input_shape=None):
        # Every layer is built in __init__ (functional parts).
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' generic pre-build would call the model on the whole (dict) batch.
        if not self.built:
            self.build()
        build_optimizer_state(self)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _images_and_targets(self, data):
        images, targets = (data["image"], data) if isinstance(data, dict) else data
        boxes = tf.cast(targets["boxes"], tf.float32)
        classes = tf.cast(targets["classes"], tf.int32)
        valid = classes >= 0
        if targets.get("difficult") is not None:
            valid &= ~tf.cast(targets["difficult"], tf.bool)
        # One extra padding box so that a batch without any box still has M >= 1.
        boxes = tf.pad(boxes, [[0, 0], [0, 1], [0, 0]])
        classes, valid = tf.pad(classes, [[0, 0], [0, 1]], constant_values=-1), tf.pad(valid, [[0, 0], [0, 1]])
        size = tf.constant([self.image_shape[0], self.image_shape[1]] * 2, tf.float32)
        return images, (boxes * size, classes, valid)

    def _loss_terms(self, outputs, targets):
        box_logits, class_logits, boxes = self.flatten_outputs(outputs)
        return anchor_free_loss(class_logits, box_logits, boxes, self.anchors, self.strides, *targets,
                                topk=self.topk, alpha=self.alpha, beta=self.beta, box_gain=self.box_gain,
                                cls_gain=self.cls_gain, dfl_gain=self.dfl_gain)

    def _track(self, terms, loss):
        for name, value in dict(terms, loss=loss).items():
            self.trackers[name].update_state(value)
        return step_logs(self.metrics)

    def train_step(self, data):
        images, targets = self._images_and_targets(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            terms = self._loss_terms(self(images, training=True), targets)
            loss = tf.add_n(list(terms.values()))
            # As a Keras loss does under tf.distribute: the local loss over the
            # replica count, so the all-reduced (summed) gradients are the mean.
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._track(terms, loss)

    def test_step(self, data):
        images, targets = self._images_and_targets(data)
        terms = self._loss_terms(self(images, training=False), targets)
        return self._track(terms, tf.add_n(list(terms.values())))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            image_shape=list(self.image_shape),
            width_multiplier=self.width_multiplier,
            depth_multiplier=self.depth_multiplier,
            reg_max=self.reg_max,
            topk=self.topk,
            alpha=self.alpha,
            beta=self.beta,
            box_gain=self.box_gain,
            cls_gain=self.cls_gain,
            dfl_gain=self.dfl_gain,
        )
        return config
