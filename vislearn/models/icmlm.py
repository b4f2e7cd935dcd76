"""ICMLM: image-conditioned masked language modelling.

A ConvNet learns visual features from captions: one concept word of each
caption (a noun or adjective, `vislearn.data.caption_concepts`) is replaced
by `[MASK]` and predicted from the rest of the caption *and the image*. The
text is read by a small language model (keras-hub token + position
embedding, TransformerEncoder layers, WordPiece vocabulary of the training
captions); the image by a vislearn backbone, whose spatial feature map (the
map before its global pooling) conditions the prediction. Two ways:

- `tfm` (ICMLM-tfm): the feature map's cells, projected to the text width
  with a learned position and a modality embedding, are tokens; transformer
  layers fuse them with the language model's text tokens, and the fused
  output at the masked position predicts the token.
- `att` (ICMLM-att): the language model's output at the masked position
  attends (multi-head attention) over the projected feature-map cells; the
  attended visual vector and the text vector, concatenated, go through an MLP
  that predicts the token.
- `text_only`: the same language model without the image (the ablation).

The language model is trained from scratch unless `bert_preset` names a local
keras-hub BERT preset: then, as in the paper, that pretrained BERT is the
language model, frozen, and its WordPiece tokenizer replaces the captions'
vocabulary; only the visual side, the fusion / attention modules and the heads
learn.

Beside the image-conditioned head every variant trains a text-only head on
the language model's output at the masked position (weight
`text_head_weight`; it is the whole model in `text_only`): the language
model thus stays a masked language model of its own, as the paper's BERT is,
and `masked_accuracy_text_only` is what it predicts without the image. The
tag-prediction head (`tag_weight`) predicts from the pooled image features
alone which concepts the image's captions name (multi-label, sigmoid cross
entropy), as the paper's auxiliary loss does.

The visual encoder (`model.encoder`, the pooled backbone) is what transfers:
it is exported as `embed_image` and read by `backbone.from_run`.

Reference:
    Sariyildiz, Perez, Larlus, "Learning Visual Representations with Caption
    Annotations", ECCV 2020.
"""

import os
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import BN_MOMENTUM, build_backbone, spatial_encoder
from vislearn.config import ConfigError
from vislearn.data.caption_concepts import (MASK, PAD, caption_words, check_concepts, concept_vocabulary,
                                            mask_one_concept, read_vocabulary)
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.losses import per_replica_mean

VARIANTS = ("tfm", "att", "text_only")
EVAL_SEED = (1234, 0)  # evaluation masks the same token of a caption every time


# ---------------------------------------------------------------- a user's pretrained BERT


def local_bert_preset(path, where="model.bert_preset"):
    """The absolute path of a local keras-hub BERT preset directory: what
    `BertBackbone.save_to_preset` and `BertTokenizer.save_to_preset` write
    (config.json, model.weights.h5, tokenizer.json, assets/tokenizer/vocabulary.txt).

    Only local directories are accepted: a built-in preset name, a Kaggle or
    Hugging Face handle would make keras-hub download, so they are errors.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{where}: expected the path of a local keras-hub BERT preset directory, received {path!r}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{where}: {str(path)!r} is not an existing local directory; only local keras-hub presets "
                          "are loaded (a directory written by BertBackbone.save_to_preset and "
                          "BertTokenizer.save_to_preset), nothing is downloaded")
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise ConfigError(f"{where}: {path} is not a keras-hub BERT preset (it holds no {name}; expected a "
                              "directory written by BertBackbone.save_to_preset and BertTokenizer.save_to_preset)")
    return str(directory.resolve())  # absolute, so keras-hub never reads it as a preset name or handle


def _from_local_preset(cls, path, where):
    directory = local_bert_preset(path, where)
    try:
        return cls.from_preset(directory)
    except (ValueError, OSError, KeyError, TypeError) as error:  # keras-hub's messages span lines: keep the first
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{where}: {path} is not a keras-hub BERT preset that loads as {cls.__name__} "
                          f"({first_line})") from None


def bert_preset_tokenizer(path, where="model.bert_preset"):
    """The `BertTokenizer` (WordPiece vocabulary, special tokens) of a local preset."""
    import keras_hub

    return _from_local_preset(keras_hub.models.BertTokenizer, path, where)


def bert_preset_backbone(path, where="model.bert_preset"):
    """The `BertBackbone` of a local preset, with its pretrained weights."""
    import keras_hub

    return _from_local_preset(keras_hub.models.BertBackbone, path, where)


def concept_words_not_in(vocabulary, captions):
    """Words that pass the concept rule but are not one whole token of
    `vocabulary` (a pretrained BERT splits rarer words into several
    wordpieces): they cannot be masked as one token, so they are not concepts."""
    words = {word for caption in captions for word in caption_words(caption)}
    tokens = set(vocabulary)
    return [word for word in concept_vocabulary(captions, words) if word not in tokens]


@keras.saving.register_keras_serializable(package="vislearn")
class ICMLM(keras.Model):
    """Image-conditioned masked language model (ICMLM-tfm / ICMLM-att).

    Args:
        image_shape: (height, width, channels) of the images.
        vocabulary: WordPiece tokens (ids 0-2 `[PAD]`, `[UNK]`, `[MASK]`), or
            a vocabulary file, one token a line. Recipes compute it from the
            training captions (`caption_concepts.wordpiece_vocabulary`).
            None with `bert_preset` (the preset's vocabulary is used).
        concepts: the maskable words, each one whole token of the vocabulary
            (`caption_concepts.concept_vocabulary`); also the tag head's labels.
            A given concept that is not one whole token (with `bert_preset`: a
            word the preset's tokenizer splits into several wordpieces, or
            lacks) is an error; recipes deriving the concepts leave such words
            out and log how many.
        vocabulary_size: when given, the vocabulary must have this many tokens
            (a file or preset that changed since training is a clear error,
            not a shape mismatch deep in weight loading).
        bert_preset: path of a local keras-hub BERT preset directory (what
            `BertBackbone.save_to_preset` + `BertTokenizer.save_to_preset`
            write); never a preset name to download. That pretrained BERT,
            frozen (`trainable=False`, run in inference mode), is the language
            model: its sequence output (projected to `width` when its hidden
            size differs) replaces the token embedding and `text_layers`
            (ignored then), captions are tokenised by its tokenizer as
            `[CLS] caption [SEP]`, and its `[MASK]` id masks. The visual
            encoder, the fusion / attention modules and the heads still learn.
        variant: `"tfm"`, `"att"` or `"text_only"`.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone.
        sequence_length: captions are cut / padded to this many tokens.
        width: text width (and width of the projected visual tokens).
        num_heads, intermediate_dim, dropout: of every transformer layer.
        text_layers: TransformerEncoder layers of the language model (without `bert_preset`).
        fusion_layers: TransformerEncoder layers fusing image and text (`tfm`).
        tag_weight: weight of the tag-prediction loss (0 turns it off).
        text_head_weight: weight of the text-only head's loss in `tfm`/`att`.
        batchnorm_momentum: momentum of the backbone's batch norms.

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        The visual encoder's pooled features (batch, dim).

    Training data:
        Dicts of `image` [B, H, W, C] and `captions` string [B, C_per_image]
        (`vislearn.data.captions`); every caption is masked once per step.
    """

    def __init__(self, image_shape=(64, 64, 3), vocabulary=None, concepts=None, vocabulary_size=None,
                 variant="tfm", backbone="small_cnn", sequence_length=32, width=64, num_heads=4,
                 intermediate_dim=128, text_layers=2, fusion_layers=1, dropout=0.1, tag_weight=1.0,
                 text_head_weight=1.0, batchnorm_momentum=BN_MOMENTUM, bert_preset=None, **kwargs):
        import keras_hub  # imported here: `import vislearn.models` stays free of keras-hub's import cost

        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ConfigError(f"model.variant: expected one of {list(VARIANTS)}, received {variant!r}")
        self.vocabulary_source = vocabulary if isinstance(vocabulary, str) else None
        self.bert_preset = str(bert_preset) if bert_preset else None
        if self.bert_preset:
            # The pretrained BERT's tokenizer: its vocabulary and special tokens replace the captions' ones.
            if vocabulary is not None:
                raise ConfigError("model.vocabulary: give either model.vocabulary or model.bert_preset (whose "
                                  "tokenizer's vocabulary is used), not both")
            self.tokenizer = bert_preset_tokenizer(bert_preset)
            self.vocabulary = list(self.tokenizer.get_vocabulary())
            if vocabulary_size is not None and len(self.vocabulary) != int(vocabulary_size):
                raise ConfigError(f"model.bert_preset: {bert_preset} holds {len(self.vocabulary)} tokens but the "
                                  f"model was built for vocabulary_size {vocabulary_size}; use the preset the "
                                  "model was trained with")
            self.mask_id, self.pad_id = self.tokenizer.mask_token_id, self.tokenizer.pad_token_id
        else:
            self.vocabulary = read_vocabulary(vocabulary, vocabulary_size)
            self.mask_id, self.pad_id = self.vocabulary.index(MASK), self.vocabulary.index(PAD)
        self.concepts = [str(c) for c in (concepts or [])]
        concept_ids = check_concepts(self.concepts, self.vocabulary)
        self.image_shape = tuple(image_shape)
        self.variant, self.backbone_spec = variant, backbone
        self.sequence_length, self.width, self.num_heads = int(sequence_length), int(width), int(num_heads)
        self.intermediate_dim, self.text_layers, self.fusion_layers = (
            int(intermediate_dim), int(text_layers), int(fusion_layers))
        self.dropout, self.tag_weight, self.text_head_weight = float(dropout), float(tag_weight), float(
            text_head_weight)
        self.batchnorm_momentum = float(batchnorm_momentum)
        vocab_size = len(self.vocabulary)
        # token id -> concept index (-1: not a concept)
        table = [-1] * vocab_size
        for index, token_id in enumerate(concept_ids):
            table[token_id] = index
        self.concept_index = tf.constant(table, tf.int32)

        # Visual encoder: the pooled backbone (what transfers) and its feature map.
        self.encoder = build_backbone(backbone, self.image_shape)
        for layer in self.encoder.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = self.batchnorm_momentum
        self.feature_map = spatial_encoder(self.encoder, "ICMLM")
        _, h, w, _ = self.feature_map.output_shape
        self.num_cells = h * w

        def transformer(name):
            return keras_hub.layers.TransformerEncoder(self.intermediate_dim, self.num_heads, self.dropout,
                                                       activation="gelu", name=name)

        # Language model: a user's pretrained BERT, frozen, or layers trained from scratch.
        if self.bert_preset:
            self.bert = bert_preset_backbone(bert_preset)
            self.bert.trainable = False  # as in the paper: only the visual side and the fusion modules learn
            if self.sequence_length > self.bert.max_sequence_length:
                raise ConfigError(f"model.sequence_length: {self.sequence_length} is longer than the BERT "
                                  f"preset's max_sequence_length {self.bert.max_sequence_length}")
            # [CLS] caption [SEP] [PAD]...: the layout the BERT was pretrained on.
            self.packer = keras_hub.layers.StartEndPacker(
                self.sequence_length, start_value=self.tokenizer.cls_token_id,
                end_value=self.tokenizer.sep_token_id, pad_value=self.pad_id, name="packer")
            self.text_projection = (None if self.bert.hidden_dim == self.width
                                    else layers.Dense(self.width, name="text_projection"))
        else:
            self.bert = None
            self.tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
                vocabulary=self.vocabulary, sequence_length=self.sequence_length, lowercase=True, name="tokenizer")
            self.token_embedding = keras_hub.layers.TokenAndPositionEmbedding(
                vocab_size, self.sequence_length, self.width, name="token_embedding")
            self.embedding_norm = layers.LayerNormalization(epsilon=1e-5, name="embedding_norm")
            self.text_encoder = [transformer(f"text_layer{i}") for i in range(self.text_layers)]
        self.text_head = layers.Dense(vocab_size, name="text_head")

        # Image conditioning.
        if variant != "text_only":
            self.visual_projection = layers.Dense(self.width, name="visual_projection")
            self.cell_embedding = keras_hub.layers.PositionEmbedding(self.num_cells, name="cell_embedding")
        if variant == "tfm":
            self.modality_embedding = layers.Embedding(2, self.width, name="modality_embedding")
            self.fusion = [transformer(f"fusion_layer{i}") for i in range(self.fusion_layers)]
            self.image_head = layers.Dense(vocab_size, name="image_head")
        elif variant == "att":
            self.attention = layers.MultiHeadAttention(self.num_heads, self.width // self.num_heads,
                                                       name="masked_token_attention")
            # The MLP on [text; attended image] is as wide as the transformers' feed-forward layers.
            self.image_head = keras.Sequential([layers.Dense(self.intermediate_dim, activation="gelu", name="fuse"),
                                                layers.Dense(vocab_size, name="logits")], name="image_head")
        if variant != "text_only":
            self.tag_head = layers.Dense(len(self.concepts), name="tag_head")
        else:
            self.encoder.trainable = False  # the image is not used; the encoder stays at initialisation

        self.mlm_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.tag_loss = keras.losses.BinaryCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="masked_accuracy")
        self.text_accuracy_tracker = keras.metrics.Mean(name="masked_accuracy_text_only")
        self.tag_tracker = keras.metrics.Mean(name="tag_loss")
        self.unmaskable_tracker = keras.metrics.Sum(name="unmaskable_captions")

        # Build every layer now (a tiny forward pass), so the model is complete under any strategy.
        self.predict_masked(tf.zeros((1, *self.image_shape)), tf.ones((1, self.sequence_length), tf.int32),
                            tf.zeros((1,), tf.int32), tf.zeros((1,), tf.int32))

    # ------------------------------------------------------------ forward

    def call(self, images, training=False):
        return self.encoder(images, training=training)

    def build(self, input_shape=None):
        pass  # every layer is built in __init__

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)

    def tokenize(self, captions):
        """Captions [N] -> token ids [N, sequence_length] (padded with the pad id)."""
        tokens = self.tokenizer(captions)
        if self.bert is not None:
            tokens = self.packer(tokens)
        return tf.cast(tokens, tf.int32)

    def encode_text(self, tokens, training=False):
        """Language model: token ids [N, L] -> contextual features [N, L, width]."""
        padding = tokens != self.pad_id
        if self.bert is not None:
            # Frozen: always in inference mode (no dropout), a fixed text feature extractor.
            x = self.bert({"token_ids": tokens, "segment_ids": tf.zeros_like(tokens),
                           "padding_mask": tf.cast(padding, tf.int32)}, training=False)["sequence_output"]
            return x if self.text_projection is None else self.text_projection(x)
        x = self.embedding_norm(self.token_embedding(tokens))
        for layer in self.text_encoder:
            x = layer(x, padding_mask=padding, training=training)
        return x

    def visual_tokens(self, cells):
        """Feature map [B, h, w, C] -> [B, h*w, width] tokens with a learned cell position."""
        cells = tf.reshape(cells, [tf.shape(cells)[0], self.num_cells, cells.shape[-1]])
        x = self.visual_projection(cells)
        return x + self.cell_embedding(x)

    def predict_masked(self, images, masked_tokens, positions, caption_image, training=False):
        """Predict the masked token of each caption.

        Args:
            images: [B, H, W, C].
            masked_tokens: int [N, L] captions with one `[MASK]` each.
            positions: int [N] position of the mask.
            caption_image: int [N] row of each caption's image in `images`.

        Returns:
            dict: `text_logits` [N, vocab] (language model alone),
            `image_logits` [N, vocab] (image-conditioned; `tfm`/`att`),
            `attention` ([N, heads, 1, h*w] for `att`, the last fusion
            layer's [N, heads, h*w+L, h*w+L] for `tfm`), `tag_logits`
            [B, concepts] (from the pooled image features).
        """
        text = self.encode_text(masked_tokens, training=training)
        at_mask = tf.gather(text, positions, batch_dims=1)                         # [N, width]
        outputs = {"text_logits": self.text_head(at_mask)}
        if self.variant == "text_only":
            return outputs
        # One pass of the encoder serves the visual tokens and the pooled tag features.
        cells = self.feature_map(images, training=training)
        visual = tf.gather(self.visual_tokens(cells), caption_image)               # [N, cells, width]
        if self.variant == "tfm":
            x = tf.concat([visual + self.modality_embedding(tf.zeros_like(visual[..., 0], tf.int32)),
                           text + self.modality_embedding(tf.ones_like(masked_tokens))], axis=1)
            padding = tf.concat([tf.ones_like(visual[..., 0], tf.bool), masked_tokens != self.pad_id], axis=1)
            for layer in self.fusion:
                x, attention = layer(x, padding_mask=padding, training=training, return_attention_scores=True)
            fused = tf.gather(x, positions + self.num_cells, batch_dims=1)
            outputs["image_logits"] = self.image_head(fused)
        else:
            attended, attention = self.attention(at_mask[:, None], visual, return_attention_scores=True,
                                                 training=training)
            outputs["image_logits"] = self.image_head(tf.concat([at_mask, attended[:, 0]], axis=-1))
        outputs["attention"] = attention
        outputs["tag_logits"] = self.tag_head(self.encoder.layers[-1](cells))  # the encoder's own pooling
        return outputs

    # ------------------------------------------------------------ steps

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker, self.text_accuracy_tracker, self.tag_tracker,
                self.unmaskable_tracker]

    def tag_targets(self, tokens, caption_image, num_images):
        """Multi-hot [B, concepts]: the concepts any of an image's captions name."""
        index = tf.gather(self.concept_index, tokens)                               # [N, L], -1 elsewhere
        hot = tf.reduce_max(tf.one_hot(index, len(self.concepts)), axis=1)          # [N, concepts]
        return tf.maximum(tf.math.unsorted_segment_max(hot, caption_image, num_images), 0.0)  # no caption: 0

    def masked_batch(self, data, training=False, seed=None):
        """Tokenise and mask a batch, and predict. Returns (outputs, labels, valid, tag targets)."""
        images, captions = data["image"], data["captions"]
        per_image = tf.shape(captions)[1]
        captions = tf.reshape(captions, [-1])
        caption_image = tf.repeat(tf.range(tf.shape(images)[0]), per_image)
        tokens = self.tokenize(captions)
        masked, positions, labels, valid = mask_one_concept(
            tokens, tf.gather(self.concept_index, tokens) >= 0, self.mask_id, seed)
        outputs = self.predict_masked(images, masked, positions, caption_image, training=training)
        return outputs, labels, valid, self.tag_targets(tokens, caption_image, tf.shape(images)[0])

    def compute_losses(self, outputs, labels, valid, tags):
        weight = tf.cast(valid, tf.float32)
        text_loss = self.mlm_loss(labels, outputs["text_logits"], sample_weight=weight)
        if self.variant == "text_only":
            return text_loss, tf.constant(0.0)
        tag_loss = self.tag_loss(tags, outputs["tag_logits"])
        loss = (self.mlm_loss(labels, outputs["image_logits"], sample_weight=weight)
                + self.text_head_weight * text_loss + self.tag_weight * tag_loss)
        return loss, tag_loss

    def _track(self, loss, tag_loss, outputs, labels, valid):
        weight = tf.cast(valid, tf.float32)

        def correct(logits):
            return tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)

        text_correct = correct(outputs["text_logits"])
        self.loss_tracker.update_state(per_replica_mean(loss))
        self.tag_tracker.update_state(per_replica_mean(tag_loss))
        self.accuracy_tracker.update_state(correct(outputs.get("image_logits", outputs["text_logits"])),
                                           sample_weight=weight)
        self.text_accuracy_tracker.update_state(text_correct, sample_weight=weight)
        self.unmaskable_tracker.update_state(tf.reduce_sum(1.0 - weight))

    def train_step(self, data):
        with tf.GradientTape() as tape:
            outputs, labels, valid, tags = self.masked_batch(data, training=True)
            loss, tag_loss = self.compute_losses(outputs, labels, valid, tags)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self._track(loss, tag_loss, outputs, labels, valid)
        return step_logs(self.metrics)

    def test_step(self, data):
        outputs, labels, valid, tags = self.masked_batch(data, training=False, seed=EVAL_SEED)
        loss, tag_loss = self.compute_losses(outputs, labels, valid, tags)
        self._track(loss, tag_loss, outputs, labels, valid)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        vocabulary = None if self.bert_preset else self.vocabulary_source or list(self.vocabulary)
        config.update(image_shape=list(self.image_shape), vocabulary=vocabulary, bert_preset=self.bert_preset,
                      concepts=list(self.concepts), vocabulary_size=len(self.vocabulary), variant=self.variant,
                      backbone=self.backbone_spec, sequence_length=self.sequence_length, width=self.width,
                      num_heads=self.num_heads, intermediate_dim=self.intermediate_dim,
                      text_layers=self.text_layers, fusion_layers=self.fusion_layers, dropout=self.dropout,
                      tag_weight=self.tag_weight, text_head_weight=self.text_head_weight,
                      batchnorm_momentum=self.batchnorm_momentum)
        return config


def masked_accuracy_metrics(model, split, batch_size=None):
    """Masked-token accuracy on an evaluation split (`RetrievalSplit`): every
    caption of every image, one concept token masked (a fixed choice).

    Returns:
        {"masked_accuracy", "masked_accuracy_text_only", "masked_captions",
        "unmaskable_captions"}; for `text_only` both accuracies are the
        language model's.
    """
    import numpy as np

    by_image = [[] for _ in range(len(split))]
    for caption, row in zip(split.captions, split.caption_image):
        by_image[int(row)].append(caption)
    longest = max(len(c) for c in by_image)

    @tf.function
    def evaluate(images, captions):
        outputs, labels, valid, _ = model.masked_batch({"image": images, "captions": captions}, seed=EVAL_SEED)
        logits = outputs.get("image_logits", outputs["text_logits"])
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        text_predicted = tf.argmax(outputs["text_logits"], axis=-1, output_type=tf.int32)
        real = tf.reshape(captions, [-1]) != ""
        return predicted == labels, text_predicted == labels, valid, real

    totals = np.zeros(4)
    start = 0
    for images in split.images:
        rows = by_image[start:start + len(images)]
        start += len(images)
        captions = tf.constant([c + [""] * (longest - len(c)) for c in rows])
        correct, text_correct, valid, real = (np.asarray(t) for t in evaluate(images, captions))
        totals += [np.sum(correct & valid), np.sum(text_correct & valid), np.sum(valid), np.sum(real & ~valid)]
    masked = max(totals[2], 1)
    return {"masked_accuracy": float(totals[0] / masked), "masked_accuracy_text_only": float(totals[1] / masked),
            "masked_captions": int(totals[2]), "unmaskable_captions": int(totals[3])}


def caption_probe_metrics(encoder, probe_train, probe_test, min_images=10):
    """The shared frozen-encoder protocol on a classification split derived
    from captions: an image's class is the one shape word (`linear_top1`,
    `knn_top1`) or the one colour word (`linear_top1_colour`) its captions
    name (`caption_concepts.concept_labels`); images naming none or several
    are left out. The probe trains on `probe_train` (the val split) and is
    scored on `probe_test` (the test split), both `RetrievalSplit`s.

    Returns None values (with a warning) when the splits have no such images
    (e.g. captions of other data than captioned_shapes).
    """
    import logging

    import numpy as np

    from vislearn.data.caption_concepts import concept_labels
    from vislearn.data.captioned_shapes import COLOURS
    from vislearn.data.shapes import SHAPE_CLASSES
    from vislearn.evaluation.representation import knn_top1, linear_top1

    empty = {"linear_top1": None, "knn_top1": None, "linear_top1_colour": None, "probe_images": 0}
    if probe_train is None or probe_test is None:
        logging.getLogger("vislearn").warning("no val split: the caption-derived probe is not computed")
        return empty

    def features_and_captions(split):
        features = np.concatenate([np.asarray(encoder(images, training=False), np.float32)
                                   for images in split.images])
        by_image = [[] for _ in range(len(split))]
        for caption, row in zip(split.captions, split.caption_image):
            by_image[int(row)].append(caption)
        return features.reshape(len(features), -1), by_image

    train_features, train_captions = features_and_captions(probe_train)
    test_features, test_captions = features_and_captions(probe_test)
    metrics = dict(empty)
    for key, classes in (("shape", SHAPE_CLASSES), ("colour", list(COLOURS))):
        train_labels, test_labels = concept_labels(train_captions, classes), concept_labels(test_captions, classes)
        train_rows, test_rows = train_labels >= 0, test_labels >= 0
        if train_rows.sum() < min_images or test_rows.sum() < min_images or len(set(train_labels[train_rows])) < 2:
            logging.getLogger("vislearn").warning("too few images whose captions name one %s word: "
                                                  "the %s probe is not computed", key, key)
            continue
        args = (train_features[train_rows], train_labels[train_rows], test_features[test_rows], test_labels[test_rows])
        if key == "shape":
            metrics.update(linear_top1=linear_top1(*args), knn_top1=knn_top1(*args),
                           probe_images=int(train_rows.sum() + test_rows.sum()))
        else:
            metrics["linear_top1_colour"] = linear_top1(*args)
    return metrics
