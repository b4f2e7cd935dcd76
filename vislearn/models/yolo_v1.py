"""YOLOv1: one network regresses boxes and class probabilities in one pass.

The image is divided into an S x S grid. Each cell predicts B boxes
`(x, y, sqrt_w, sqrt_h, confidence)` and one set of C class probabilities,
so the network's output is S x S x (B * 5 + C) (7 x 7 x 30 for VOC). A
convolutional feature extractor is followed by two fully connected layers,
the first with leaky ReLU and dropout 0.5, the second linear, reshaped to the
grid. At test time the class-specific confidence of a box is
`confidence * P(class | object)`; boxes are then pruned with per-class
non-maximum suppression.

Reference:
    Redmon, Divvala, Girshick, Farhadi, "You Only Look Once: Unified,
    Real-Time Object Detection", CVPR 2016 (https://arxiv.org/abs/1506.02640).
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import BN_MOMENTUM, build_backbone
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean
from vislearn.losses.yolo_v1 import YoloV1Loss, encode_yolo_v1_batch

# (filters, kernel, stride) per conv layer, "M" a 2x2 stride-2 max-pool.
# Figure 3 of the paper: 24 convolutional layers.
DARKNET24 = (
    [(64, 7, 2), "M", (192, 3, 1), "M",
     (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M"]
    + [(256, 1, 1), (512, 3, 1)] * 4 + [(512, 1, 1), (1024, 3, 1), "M"]
    + [(512, 1, 1), (1024, 3, 1)] * 2 + [(1024, 3, 1), (1024, 3, 2), (1024, 3, 1), (1024, 3, 1)]
)
# Fast YOLO: 9 convolutional layers with fewer filters (the paper gives the
# depth only; these widths follow darknet's tiny configurations).
FAST_YOLO = [(16, 3, 1), "M", (32, 3, 1), "M", (64, 3, 1), "M", (128, 3, 1), "M", (256, 3, 1), "M",
             (512, 3, 1), "M", (1024, 3, 1), (1024, 3, 1), (256, 3, 1)]
LAYOUTS = {"darknet24": DARKNET24, "fast_yolo": FAST_YOLO}


def darknet_features(layout, input_shape, width_multiplier=1.0, batch_norm=False, output_stride=64,
                     name="darknet"):
    """A YOLOv1 conv stack: convs with leaky ReLU 0.1, max-pools, 'same' padding.

    With `output_stride=32` the last downsampling step (darknet24's stride-2
    conv, Fast YOLO's last max-pool) keeps the resolution instead.

    Returns:
        Functional `keras.Model` from images [H, W, 3] in [0, 1] to a feature map.
    """
    if output_stride not in (32, 64):
        raise ValueError(f"model.output_stride: expected 32 or 64, received {output_stride!r}")
    layout = list(layout)
    if output_stride == 32:
        last = max(i for i, spec in enumerate(layout) if spec == "M" or spec[2] == 2)
        layout[last] = None if layout[last] == "M" else (*layout[last][:2], 1)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    conv, pool = 0, 0
    for spec in layout:
        if spec is None:
            continue
        if spec == "M":
            pool += 1
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{pool}")(x)
            continue
        filters, kernel, stride = spec
        conv += 1
        x = layers.Conv2D(max(4, int(round(filters * width_multiplier))), kernel, strides=stride,
                          padding="same", use_bias=not batch_norm, name=f"conv{conv}")(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{conv}")(x)
        x = layers.LeakyReLU(negative_slope=0.1, name=f"leaky{conv}")(x)
    return keras.Model(inputs, x, name=name)


def feature_map_backbone(spec, input_shape):
    """A vislearn backbone cut before its global pooling, so the head sees where things are."""
    backbone = build_backbone(spec, input_shape)
    last = backbone.layers[-1]
    if isinstance(last, (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D, layers.Flatten)):
        backbone = keras.Model(backbone.inputs, last.input, name=backbone.name)
    return backbone


def decode_yolo_v1(grid, num_boxes, num_classes, score_threshold=0.005, iou_threshold=0.5,
                   max_detections=100):
    """The network's grid output -> boxes after per-class non-maximum suppression.

    Args:
        grid: float [batch, S, S, B * 5 + C].
        num_boxes: B.
        num_classes: C.
        score_threshold: drop boxes whose class-specific confidence is lower.
        iou_threshold: per-class NMS overlap threshold.
        max_detections: outputs are padded (or cut) to this many per image.

    Returns:
        dict of `detection_boxes` float [batch, K, 4] `rel_yxyx` on the
        network's input, `detection_scores` float [batch, K],
        `detection_classes` int32 [batch, K] and `num_detections` int32
        [batch], K = `max_detections`; entries past `num_detections` are 0.
    """
    grid = tf.cast(grid, tf.float32)
    s = tf.shape(grid)[1]
    size = tf.cast(s, tf.float32)
    predicted = tf.reshape(grid[..., :num_boxes * 5], [-1, s, s, num_boxes, 5])
    x, y, sqrt_w, sqrt_h, confidence = tf.unstack(predicted, 5, axis=-1)
    index = tf.cast(tf.range(s), tf.float32)
    center_x = (x + index[None, None, :, None]) / size
    center_y = (y + index[None, :, None, None]) / size
    width, height = tf.square(sqrt_w), tf.square(sqrt_h)
    boxes = tf.stack([center_y - height / 2, center_x - width / 2,
                      center_y + height / 2, center_x + width / 2], axis=-1)
    class_probs = tf.clip_by_value(grid[..., num_boxes * 5:], 0.0, 1.0)  # [batch, S, S, C]
    scores = tf.clip_by_value(confidence, 0.0, 1.0)[..., None] * class_probs[:, :, :, None, :]
    batch = tf.shape(grid)[0]
    return per_class_nms(tf.reshape(boxes, [batch, -1, 4]), tf.reshape(scores, [batch, -1, num_classes]),
                         score_threshold, iou_threshold, max_detections)


def per_class_nms(boxes, scores, score_threshold, iou_threshold, max_detections):
    """Candidate boxes [batch, N, 4] `rel_yxyx` with class scores [batch, N, C]
    -> the padded `detection_*` dict every vislearn detector returns (see
    `decode_yolo_v1`), after per-class non-maximum suppression."""
    nmsed_boxes, nmsed_scores, nmsed_classes, valid = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :], scores,
        max_output_size_per_class=max_detections, max_total_size=max_detections,
        iou_threshold=iou_threshold, score_threshold=score_threshold, clip_boxes=True)
    return {"detection_boxes": nmsed_boxes, "detection_scores": nmsed_scores,
            "detection_classes": tf.cast(nmsed_classes, tf.int32), "num_detections": tf.cast(valid, tf.int32)}


@keras.saving.register_keras_serializable(package="vislearn")
class YoloV1(keras.Model):
    """YOLOv1 detector.

    Args:
        num_classes: C.
        image_shape: (height, width, channels) of the input (paper: 448 x 448).
        grid_size: S (paper: 7).
        num_boxes: B, boxes per cell (paper: 2). Predictors that never
            specialise (same boxes, responsible in turn) split the
            confidence target between them; `yolo_shapes` uses 1.
        backbone: `"darknet24"` (the paper's 24 conv layers), `"fast_yolo"`
            (9 conv layers), or a vislearn backbone name / `{"name": ...}`
            spec (used up to its global pooling).
        width_multiplier: scales the filter counts of the darknet layouts
            (1.0 = the paper; e.g. 0.25 for a demo on a CPU).
        batch_norm: batch normalisation after every conv (not in the paper;
            YOLOv2 added it, and it makes training from scratch far easier).
        output_stride: 64 (the paper: 448 -> 7 x 7 features) or 32 (the
            last downsampling step removed: 224 -> 7 x 7).
        head: `"fc"` (the paper: flatten, two fully connected layers) or
            `"conv"` (not in the paper: a 3x3 conv with leaky ReLU and
            dropout, then a linear 1x1 conv predicting each cell from the
            features at that cell; the feature map must be S x S). Same grid
            output, loss and decoding; the conv head learns from far fewer
            images, which a from-scratch demo on a CPU needs.
        fc_units: width of the first fully connected layer (paper: 4096);
            null connects the features straight to the output layer.
        dropout: dropout rate after the first fully connected layer (paper: 0.5).
        lambda_coord: weight of the box terms of the loss (paper: 5).
        lambda_noobj: weight of the confidence of boxes without objects (paper: 0.5).
        confidence_target: `"iou"` (the paper) or `"one"`, see `YoloV1Loss`.
        lambda_class: weight of the class term of the loss (paper: 1).

    Call arguments:
        images: float tensor (batch, height, width, 3) in [0, 1].
        training: dropout and batch-norm mode.

    Returns:
        The grid, float (batch, S, S, B * 5 + C): per cell B x
        `(x, y, sqrt_w, sqrt_h, confidence)` then C class probabilities.
        `detect` turns it into boxes.

    Training data:
        Batches as `vislearn.data.detection.pad_batch` makes them (dicts with
        `image`, `boxes`, `classes`, optional `difficult`; targets are encoded
        in the step), or `(images, targets)` with targets from
        `vislearn.losses.yolo_v1.yolo_v1_training_pair`.
    """

    def __init__(
        self,
        num_classes=20,
        image_shape=(448, 448, 3),
        grid_size=7,
        num_boxes=2,
        backbone="darknet24",
        width_multiplier=1.0,
        batch_norm=False,
        output_stride=64,
        head="fc",
        fc_units=4096,
        dropout=0.5,
        lambda_coord=5.0,
        lambda_noobj=0.5,
        confidence_target="iou",
        lambda_class=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for key, value in (("num_classes", num_classes), ("grid_size", grid_size), ("num_boxes", num_boxes)):
            if int(value) < 1:
                raise ValueError(f"model.{key}: expected a positive integer, received {value!r}")
        if not width_multiplier > 0:
            raise ValueError(f"model.width_multiplier: expected a positive number, received {width_multiplier!r}")
        self.num_classes = int(num_classes)
        self.image_shape = tuple(image_shape)
        self.grid_size = int(grid_size)
        self.num_boxes = int(num_boxes)
        self.backbone_spec = backbone
        self.width_multiplier = float(width_multiplier)
        self.batch_norm = bool(batch_norm)
        self.output_stride = int(output_stride)
        if head not in ("fc", "conv"):
            raise ValueError(f"model.head: expected 'fc' or 'conv', received {head!r}")
        self.head_type = head
        self.fc_units = None if fc_units is None else int(fc_units)
        self.dropout = float(dropout)
        self.lambda_coord = float(lambda_coord)
        self.lambda_noobj = float(lambda_noobj)
        self.confidence_target = confidence_target
        self.lambda_class = float(lambda_class)

        if isinstance(backbone, str) and backbone in LAYOUTS:
            self.features = darknet_features(LAYOUTS[backbone], self.image_shape, self.width_multiplier,
                                             self.batch_norm, self.output_stride, name=backbone)
        else:
            self.features = feature_map_backbone(backbone, self.image_shape)
        s, outputs = self.grid_size, self.grid_size**2 * (self.num_boxes * 5 + self.num_classes)
        per_cell = self.num_boxes * 5 + self.num_classes
        head = keras.Sequential(name="head")
        head.add(keras.Input(self.features.output_shape[1:]))
        if self.head_type == "fc":
            head.add(layers.Flatten(name="flatten"))
            if self.fc_units:
                head.add(layers.Dense(self.fc_units, name="fc1"))
                head.add(layers.LeakyReLU(negative_slope=0.1, name="fc1_leaky"))
            head.add(layers.Dropout(self.dropout, name="dropout"))
            head.add(layers.Dense(outputs, name="fc2"))  # linear, as the paper's last layer
            head.add(layers.Reshape((s, s, per_cell), name="grid"))
        else:
            if tuple(self.features.output_shape[1:3]) != (s, s):
                raise ValueError(f"model.head: 'conv' needs {s} x {s} features for grid_size {s}, the backbone "
                                 f"gives {tuple(self.features.output_shape[1:3])} (change image_size, "
                                 "output_stride or grid_size)")
            if self.fc_units:
                head.add(layers.Conv2D(self.fc_units, 3, padding="same", name="conv1"))
                head.add(layers.LeakyReLU(negative_slope=0.1, name="conv1_leaky"))
            head.add(layers.Dropout(self.dropout, name="dropout"))
            head.add(layers.Conv2D(per_cell, 1, name="grid"))  # linear
        self.head = head

        self.loss_fn = YoloV1Loss(self.grid_size, self.num_boxes, self.num_classes, self.lambda_coord,
                                  self.lambda_noobj, confidence_target, self.lambda_class)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, images, training=False):
        return self.head(self.features(images, training=training), training=training)

    def detect(self, images, score_threshold=0.005, iou_threshold=0.5, max_detections=100):
        """Boxes of a batch of images: see `decode_yolo_v1` for the outputs."""
        return decode_yolo_v1(self(images, training=False), self.num_boxes, self.num_classes,
                              score_threshold, iou_threshold, max_detections)

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
        return [self.loss_tracker]

    def _images_and_targets(self, data):
        if isinstance(data, dict):
            targets = encode_yolo_v1_batch(data["boxes"], data["classes"], self.grid_size, self.num_classes,
                                           data.get("difficult"))
            return data["image"], targets
        return data[0], data[1]

    def train_step(self, data):
        images, targets = self._images_and_targets(data)
        with tf.GradientTape() as tape:
            grid = self(images, training=True)
            # A Keras loss is divided by the replica count under tf.distribute,
            # so the all-reduced (summed) gradients are the global mean.
            loss = self.loss_fn(targets, grid)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(per_replica_mean(loss))
        return step_logs(self.metrics)

    def test_step(self, data):
        images, targets = self._images_and_targets(data)
        loss = self.loss_fn(targets, self(images, training=False))
        self.loss_tracker.update_state(per_replica_mean(loss))
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            image_shape=list(self.image_shape),
            grid_size=self.grid_size,
            num_boxes=self.num_boxes,
            backbone=self.backbone_spec,
            width_multiplier=self.width_multiplier,
            batch_norm=self.batch_norm,
            output_stride=self.output_stride,
            head=self.head_type,
            fc_units=self.fc_units,
            dropout=self.dropout,
            lambda_coord=self.lambda_coord,
            lambda_noobj=self.lambda_noobj,
            confidence_target=self.confidence_target,
            lambda_class=self.lambda_class,
        )
        return config
