"""Two-branch embedding network for image-text matching.

An image branch (a vislearn backbone, trained end to end, then an MLP) and a
text branch (word embeddings over a vocabulary of the training captions,
optionally started from pretrained word vectors, pooled by a mean, a GRU or
a small transformer, then an MLP) map both modalities into one
L2-normalised space. Each MLP is FC -> BatchNorm -> ReLU -> Dropout -> FC.
Training uses neighbourhood-sampled batches (several captions per image) and
the bi-directional ranking loss with the within-modal constraint
(`vislearn.losses.ranking`), so a caption is pulled towards its image and
towards the other captions of that image, and pushed from the rest.

Reference:
    Wang, Li, Huang, Lazebnik, "Learning Two-Branch Neural Networks for
    Image-Text Matching Tasks", TPAMI 2018 (the embedding network, section 3.1).
"""

import keras
import tensorflow as tf
from keras import layers

from vislearn.backbones import BN_MOMENTUM, build_backbone
from vislearn.distribute import build_optimizer_state, step_logs
from vislearn.features import features_backbone_dim
from vislearn.layers import TransformerTextEncoder, WordEmbedding, read_word_vectors, set_embedding_rows
from vislearn.losses import per_replica_mean
from vislearn.losses.ranking import BidirectionalRankingLoss

TEXT_ENCODERS = ("mean", "gru", "transformer")
STANDARDIZE = "lower_and_strip_punctuation"


def build_vocabulary(captions, max_tokens=20000):
    """Words of the training captions, most frequent first (the tokenizer's
    standardisation: lower case, punctuation stripped, split on whitespace)."""
    vectorizer = layers.TextVectorization(max_tokens=max_tokens, standardize=STANDARDIZE)
    vectorizer.adapt(tf.constant(list(captions)))
    return [str(word) for word in vectorizer.get_vocabulary() if word not in ("", "[UNK]")]


def embedding_mlp(input_dim, hidden_units, embed_dim, dropout, name, batchnorm_momentum=BN_MOMENTUM):
    """FC -> BN -> ReLU -> Dropout -> FC (the L2 normalisation follows in the model)."""
    mlp = keras.Sequential([
        layers.Dense(hidden_units, name=f"{name}_fc1"),
        layers.BatchNormalization(momentum=batchnorm_momentum, name=f"{name}_bn"),
        layers.ReLU(name=f"{name}_relu"),
        layers.Dropout(dropout, name=f"{name}_dropout"),
        layers.Dense(embed_dim, name=f"{name}_fc2"),
    ], name=name)
    mlp.build((None, input_dim))
    return mlp


@keras.saving.register_keras_serializable(package="vislearn")
class TwoBranch(keras.Model):
    """Image-text embedding network.

    Args:
        image_shape: (height, width, channels) of the images.
        vocabulary: the text branch's words (filled in from the training
            captions by recipes; `build_vocabulary` makes one). Unknown words
            map to one out-of-vocabulary token; a caption with no words (an
            empty string) embeds as the all-zero word vector's image.
        backbone: name or `{"name": ..., **kwargs}` of a vislearn backbone, or
            `{"name": "features", "dim": N}`: no backbone, the image MLP takes
            cached feature vectors of width N (`vislearn features extract`;
            batches carry `features` instead of `image`).
        text_encoder: `"mean"` (mean of word embeddings), `"gru"` (last
            state) or `"transformer"` (position embeddings and transformer
            blocks over the words, then their mean; `TransformerTextEncoder`).
        word_dim: word embedding width (and GRU / transformer width).
        max_words: captions are cut to this many words.
        transformer_layers, transformer_heads, transformer_intermediate_dim,
        transformer_dropout: the transformer encoder's blocks, heads (must
            divide `word_dim`), feed-forward width (default `4 * word_dim`)
            and dropout; unused by the other encoders.
        word_vectors: optional path of a GloVe / word2vec text file; the rows
            of vocabulary words found in it start from its vectors (the rest
            stay randomly initialised). Read once, when the model is
            constructed: a model rebuilt by `from_config` (e.g.
            `keras.models.load_model`) gets the rows from its weights and
            does not read the file.
        train_word_vectors: False keeps the rows taken from `word_vectors`
            fixed (the other rows still train).
        hidden_units: width of each branch's first FC layer (2048 in the paper).
        embed_dim: width of the joint space (512 in the paper).
        dropout: dropout rate after the first FC layer.
        batchnorm_momentum: momentum of every batch-norm layer, the
            backbone's included. Keras' 0.99 leaves the moving statistics far
            from the batch statistics for the first few hundred steps, and
            retrieval, evaluated with the moving statistics, then scored a
            third of what the same weights scored with batch statistics.
        margin, top_k, negatives, sentence_to_image_weight,
        image_to_sentence_weight, sentence_weight, image_weight: the ranking
            loss's arguments (`BidirectionalRankingLoss`); `sentence_weight: 0`
            trains without the within-modal constraint; `image_weight > 0`
            adds the image-image one, an image's neighbours being the
            images of the batch that share one of its captions.

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        Image embeddings (batch, embed_dim), L2-normalised. `embed_text(strings)`
        gives caption embeddings in the same space.

    Training data:
        Dicts of `image` [B, H, W, C] and `captions` string [B, C_per_image],
        row i of `captions` describing image i (`vislearn.data.captions`).
    """

    def __init__(self, image_shape=(64, 64, 3), vocabulary=None, backbone="small_cnn", text_encoder="mean",
                 word_dim=300, max_words=32, transformer_layers=2, transformer_heads=4,
                 transformer_intermediate_dim=None, transformer_dropout=0.1, word_vectors=None,
                 train_word_vectors=True, hidden_units=2048, embed_dim=512, dropout=0.5,
                 batchnorm_momentum=BN_MOMENTUM, margin=0.05,
                 top_k=10, negatives="top_k", sentence_to_image_weight=1.5, image_to_sentence_weight=1.0,
                 sentence_weight=0.05, image_weight=0.0, **kwargs):
        super().__init__(**kwargs)
        if not vocabulary:
            raise ValueError("model.vocabulary: expected a non-empty list of words "
                             "(recipes fill it in from the training captions)")
        if text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"model.text_encoder: expected one of {list(TEXT_ENCODERS)}, received {text_encoder!r}")
        self.image_shape = tuple(image_shape)
        self.vocabulary = [str(word) for word in vocabulary]
        self.backbone_spec = backbone
        self.text_encoder = text_encoder
        self.word_dim, self.max_words = int(word_dim), int(max_words)
        self.transformer_layers, self.transformer_heads = int(transformer_layers), int(transformer_heads)
        self.transformer_intermediate_dim = int(transformer_intermediate_dim or 4 * self.word_dim)
        self.transformer_dropout = float(transformer_dropout)
        if text_encoder == "transformer" and (self.transformer_heads < 1 or self.word_dim % self.transformer_heads):
            raise ValueError(f"model.transformer_heads: expected a divisor of word_dim={self.word_dim}, "
                             f"received {transformer_heads!r}")
        self.word_vectors = None if word_vectors is None else str(word_vectors)
        self.train_word_vectors = bool(train_word_vectors)
        self.hidden_units, self.embed_dim, self.dropout = int(hidden_units), int(embed_dim), float(dropout)
        self.batchnorm_momentum = float(batchnorm_momentum)
        self.loss_fn = BidirectionalRankingLoss(
            margin=margin, top_k=top_k, negatives=negatives, sentence_to_image_weight=sentence_to_image_weight,
            image_to_sentence_weight=image_to_sentence_weight, sentence_weight=sentence_weight,
            image_weight=image_weight)

        self.feature_dim = features_backbone_dim(backbone)  # None: a CNN on images
        if self.feature_dim == 0:
            raise ValueError("model.backbone: 'features' needs the feature width, {name: features, dim: N} "
                             "(recipes fill it in from data.features)")
        self.encoder = None if self.feature_dim else build_backbone(backbone, self.image_shape)
        for layer in self.encoder.layers if self.encoder is not None else []:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = self.batchnorm_momentum
        self.image_mlp = embedding_mlp(self.feature_dim or self.encoder.output_shape[-1], hidden_units, embed_dim,
                                       dropout, "image_branch", self.batchnorm_momentum)
        self.tokenizer = layers.TextVectorization(
            vocabulary=self.vocabulary, standardize=STANDARDIZE, output_sequence_length=self.max_words,
            name="tokenizer")
        # +2: index 0 is padding, 1 the out-of-vocabulary token.
        # A plain Embedding unless pretrained rows must stay fixed: checkpoints
        # name a layer by its class, so runs saved before WordEmbedding existed
        # (and every run that trains its word vectors) keep loading.
        if self.train_word_vectors:
            self.word_embedding = layers.Embedding(len(self.vocabulary) + 2, self.word_dim, name="word_embedding")
        else:
            self.word_embedding = WordEmbedding(len(self.vocabulary) + 2, self.word_dim, freeze_pretrained=True,
                                                name="word_embedding")
        self.word_embedding.build((None, self.max_words))
        if self.word_vectors is not None:
            rows, vectors = read_word_vectors(self.word_vectors, self.vocabulary, self.word_dim)
            set_embedding_rows(self.word_embedding, rows + 2, vectors)
        self.gru = self.transformer = None
        if text_encoder == "gru":
            self.gru = layers.GRU(self.word_dim, name="text_gru")
            self.gru.build((None, self.max_words, self.word_dim))
        elif text_encoder == "transformer":
            self.transformer = TransformerTextEncoder(
                self.max_words, self.transformer_layers, self.transformer_heads, self.transformer_intermediate_dim,
                self.transformer_dropout, name="text_transformer")
            self.transformer.build((None, self.max_words, self.word_dim))
        self.text_mlp = embedding_mlp(self.word_dim, hidden_units, embed_dim, dropout, "text_branch",
                                      self.batchnorm_momentum)

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.recall_tracker = keras.metrics.Mean(name="batch_t2i_r1")

    def embed_image(self, images, training=False):
        if self.encoder is None:  # backbone "features": the inputs are the cached feature vectors
            if len(images.shape) != 2:
                raise ValueError(f"TwoBranch with backbone 'features' embeds feature vectors [batch, "
                                 f"{self.feature_dim}], received shape {tuple(images.shape)}; for images put the "
                                 "extraction backbone in front (vislearn.features.WithExtractor)")
            features = images
        else:
            features = self.encoder(images, training=training)
        return tf.math.l2_normalize(tf.cast(self.image_mlp(features, training=training), tf.float32), axis=-1)

    def embed_text(self, texts, training=False):
        tokens = self.tokenizer(tf.reshape(texts, [-1]))
        words = self.word_embedding(tokens)
        present = tf.cast(tokens > 0, words.dtype)[..., None]
        if self.gru is not None:
            pooled = self.gru(words, mask=tokens > 0, training=training)
        elif self.transformer is not None:  # masked mean of the blocks' outputs; no words: the zero vector
            pooled = self.transformer(words, padding_mask=tokens > 0, training=training)
        else:
            # Mean over the words present; a caption without words stays the zero vector.
            pooled = tf.math.divide_no_nan(tf.reduce_sum(words * present, axis=1), tf.reduce_sum(present, axis=1))
        return tf.math.l2_normalize(tf.cast(self.text_mlp(pooled, training=training), tf.float32), axis=-1)

    def call(self, images, training=False):
        return self.embed_image(images, training=training)

    def build(self, input_shape=None):
        pass  # every layer is built in __init__

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build_optimizer_state(self)  # every layer is built in __init__

    @property
    def metrics(self):
        return [self.loss_tracker, self.recall_tracker]

    def _embed_batch(self, data, training):
        """A neighbourhood batch -> (image row of each sentence, image and sentence embeddings)."""
        images, captions = data["features" if self.encoder is None else "image"], data["captions"]
        sentence_image = tf.repeat(tf.range(tf.shape(images)[0]), tf.shape(captions)[1])
        return (sentence_image, self.embed_image(images, training=training),
                self.embed_text(tf.reshape(captions, [-1]), training=training))

    def _loss_targets(self, data, sentence_image):
        """The ranking loss's `y_true`: with the image constraint on, also which
        images of the batch are neighbours (they share a caption, compared
        after lower-casing and dropping punctuation, as the tokenizer does)."""
        if not self.loss_fn.image_weight:
            return sentence_image
        captions = tf.strings.strip(tf.strings.regex_replace(
            tf.strings.lower(data["captions"]), r"[!-/:-@\[-`{-~]", ""))        # [B, C]
        same = tf.equal(captions[:, :, None, None], captions[None, None, :, :])  # [B, C, B, C]
        return sentence_image, tf.reduce_any(same, axis=[1, 3])

    def _track(self, loss, sentence_image, image_embeddings, sentence_embeddings):
        self.loss_tracker.update_state(per_replica_mean(loss))
        nearest = tf.argmax(tf.matmul(sentence_embeddings, image_embeddings, transpose_b=True), axis=1,
                            output_type=tf.int32)
        self.recall_tracker.update_state(tf.cast(tf.equal(nearest, sentence_image), tf.float32))

    def train_step(self, data):
        with tf.GradientTape() as tape:
            sentence_image, image_embeddings, sentence_embeddings = self._embed_batch(data, training=True)
            loss = self.loss_fn(self._loss_targets(data, sentence_image), (image_embeddings, sentence_embeddings))
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self._track(loss, sentence_image, image_embeddings, sentence_embeddings)
        return step_logs(self.metrics)

    def test_step(self, data):
        sentence_image, image_embeddings, sentence_embeddings = self._embed_batch(data, training=False)
        loss = self.loss_fn(self._loss_targets(data, sentence_image), (image_embeddings, sentence_embeddings))
        self._track(loss, sentence_image, image_embeddings, sentence_embeddings)
        return step_logs(self.metrics)

    def get_config(self):
        config = super().get_config()
        loss = self.loss_fn
        config.update(image_shape=list(self.image_shape), vocabulary=list(self.vocabulary),
                      backbone=self.backbone_spec, text_encoder=self.text_encoder, word_dim=self.word_dim,
                      max_words=self.max_words, **self._text_config(), hidden_units=self.hidden_units,
                      embed_dim=self.embed_dim, dropout=self.dropout, batchnorm_momentum=self.batchnorm_momentum,
                      margin=loss.margin,
                      top_k=loss.top_k, negatives=loss.negatives,
                      sentence_to_image_weight=loss.sentence_to_image_weight,
                      image_to_sentence_weight=loss.image_to_sentence_weight,
                      sentence_weight=loss.sentence_weight, image_weight=loss.image_weight)
        return config

    def _text_config(self):
        """The text encoder's and word vectors' config keys (shared with `TwoBranchSimilarity`)."""
        return dict(transformer_layers=self.transformer_layers, transformer_heads=self.transformer_heads,
                    transformer_intermediate_dim=self.transformer_intermediate_dim,
                    transformer_dropout=self.transformer_dropout, word_vectors=self.word_vectors,
                    train_word_vectors=self.train_word_vectors)

    @classmethod
    def from_config(cls, config):
        # The word-vector rows come back with the weights (load_model restores them
        # after this): the file is not read again, and need not exist any more.
        config = dict(config)
        word_vectors = config.pop("word_vectors", None)
        model = super().from_config(config)
        model.word_vectors = word_vectors
        return model
