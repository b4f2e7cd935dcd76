"""Two-branch similarity network for image-text matching.

The same two branches as the embedding network (`TwoBranch`: an image branch
and a text branch, each an MLP ending in L2 normalisation), but the match of
a pair is not the cosine of the two embeddings: their element-wise product
goes through FC -> BatchNorm -> ReLU -> FC to one logit, trained as a binary
classifier with the logistic loss on positive pairs and sampled negatives.

Negatives come from the neighbourhood-sampled batch: for every positive pair
(sentence s, its image i), `negatives_per_positive` mismatched pairs, half
(s, another image of the batch) and half (a sentence of another image, i);
drawn uniformly (`negative_sampling="random"`) or the highest-scoring ones
under the current network (`"hardest"`, scored without gradient).

Retrieval scores every query x gallery pair (`score_matrix`, chunked so memory
stays bounded), and the ranks go through the same evaluation code as the
embedding network (`vislearn.evaluation.retrieval.rank_metrics`).

Reference:
    Wang, Li, Huang, Lazebnik, "Learning Two-Branch Neural Networks for
    Image-Text Matching Tasks", TPAMI 2018 (the similarity network, section 3.2).
"""

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from vislearn.backbones import BN_MOMENTUM
from vislearn.distribute import step_logs
from vislearn.evaluation.retrieval import RetrievalMonitor, embed_split, rank_metrics, text_to_text_r1
from vislearn.losses import per_replica_mean
from vislearn.models.two_branch import TwoBranch

NEGATIVE_SAMPLING = ("random", "hardest")


@keras.saving.register_keras_serializable(package="vislearn")
class PairLogisticLoss(keras.losses.Loss):
    """Logistic loss of pair logits: `log(1 + exp(-y s))` with y = +1 for a
    matching pair and -1 for a mismatched one, averaged over the pairs.

    Call arguments:
        y_true: float [pairs], 1 for a matching pair, 0 for a mismatched one.
        y_pred: float [pairs], the pairs' logits.
    """

    def __init__(self, name="pair_logistic", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        sign = 2.0 * tf.cast(y_true, tf.float32) - 1.0
        return tf.math.softplus(-sign * tf.cast(y_pred, tf.float32))


@keras.saving.register_keras_serializable(package="vislearn")
class TwoBranchSimilarity(TwoBranch):
    """Image-text similarity network.

    Args:
        image_shape, vocabulary, backbone, text_encoder, word_dim, max_words,
        transformer_layers, transformer_heads, transformer_intermediate_dim,
        transformer_dropout, word_vectors, train_word_vectors, hidden_units,
        embed_dim, dropout, batchnorm_momentum: the two branches, as in
            `TwoBranch`.
        similarity_units: width of the FC layer after the element-wise product.
        negatives_per_positive: mismatched pairs sampled per matching pair
            (at least 1; half replace the image, half the sentence).
        negative_sampling: `"random"` (uniform over the batch's mismatched
            pairs) or `"hardest"` (the highest-scoring ones).

    Call arguments:
        images: float tensor (batch, height, width, channels) in [0, 1].

    Returns:
        Image branch embeddings (batch, embed_dim), L2-normalised.
        `embed_text(strings)` gives the text branch's; `score_pairs` /
        `score_matrix` turn them into match logits (higher: better match).

    Training data:
        As `TwoBranch`: dicts of `image` [B, H, W, C] and `captions` string
        [B, C_per_image], row i of `captions` describing image i.
    """

    def __init__(self, image_shape=(64, 64, 3), vocabulary=None, backbone="small_cnn", text_encoder="mean",
                 word_dim=300, max_words=32, transformer_layers=2, transformer_heads=4,
                 transformer_intermediate_dim=None, transformer_dropout=0.1, word_vectors=None,
                 train_word_vectors=True, hidden_units=2048, embed_dim=512, dropout=0.5,
                 batchnorm_momentum=BN_MOMENTUM, similarity_units=512, negatives_per_positive=4,
                 negative_sampling="random", **kwargs):
        super().__init__(image_shape=image_shape, vocabulary=vocabulary, backbone=backbone,
                         text_encoder=text_encoder, word_dim=word_dim, max_words=max_words,
                         transformer_layers=transformer_layers, transformer_heads=transformer_heads,
                         transformer_intermediate_dim=transformer_intermediate_dim,
                         transformer_dropout=transformer_dropout, word_vectors=word_vectors,
                         train_word_vectors=train_word_vectors, hidden_units=hidden_units, embed_dim=embed_dim,
                         dropout=dropout, batchnorm_momentum=batchnorm_momentum, **kwargs)
        if int(negatives_per_positive) < 1:
            raise ValueError(f"model.negatives_per_positive: expected a positive integer, "
                             f"received {negatives_per_positive!r}")
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"model.negative_sampling: expected one of {list(NEGATIVE_SAMPLING)}, "
                             f"received {negative_sampling!r}")
        self.negative_sampling = negative_sampling
        self.similarity_units = int(similarity_units)
        self.negatives_per_positive = int(negatives_per_positive)
        self.loss_fn = PairLogisticLoss()
        self.similarity_head = keras.Sequential([
            layers.Dense(self.similarity_units, name="similarity_fc1"),
            layers.BatchNormalization(momentum=self.batchnorm_momentum, name="similarity_bn"),
            layers.ReLU(name="similarity_relu"),
            layers.Dense(1, name="similarity_logit"),
        ], name="similarity_head")
        self.similarity_head.build((None, self.embed_dim))
        self.pair_accuracy_tracker = keras.metrics.Mean(name="pair_accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.pair_accuracy_tracker]

    def score_pairs(self, image_embeddings, text_embeddings, training=False):
        """Logits of row-aligned pairs: [n, dim] x [n, dim] -> [n]."""
        return self.similarity_head(image_embeddings * text_embeddings, training=training)[:, 0]

    def score_matrix(self, image_embeddings, text_embeddings, max_chunk_values=2 ** 24):
        """Logits of every image x text pair, [n_images, n_texts] (numpy).

        The first FC layer of a product is `(x * y) W = y (diag(x) W)`, so a
        chunk of images is one batched matmul against all texts; chunks hold
        at most `max_chunk_values` hidden activations."""
        images = tf.convert_to_tensor(image_embeddings, tf.float32)
        texts = tf.convert_to_tensor(text_embeddings, tf.float32)
        fc1, rest = self.similarity_head.layers[0], self.similarity_head.layers[1:]
        rows = max(1, max_chunk_values // max(1, int(texts.shape[0]) * self.similarity_units))
        scores = []
        for start in range(0, int(images.shape[0]), rows):
            weighted = images[start:start + rows, :, None] * fc1.kernel[None]       # [rows, dim, units]
            hidden = tf.einsum("td,idu->itu", texts, weighted) + fc1.bias           # [rows, texts, units]
            hidden = tf.reshape(hidden, [-1, self.similarity_units])
            for layer in rest:
                hidden = layer(hidden, training=False)
            scores.append(tf.reshape(hidden, [-1, int(texts.shape[0])]).numpy())
        return np.concatenate(scores) if scores else np.zeros((0, int(texts.shape[0])), np.float32)

    def _sampled_pairs(self, sentence_image, num_images, image_embeddings=None, sentence_embeddings=None):
        """(image row, sentence row, label) of the positives and the sampled
        negatives (the embeddings are needed for `"hardest"`)."""
        sentences = tf.shape(sentence_image)[0]
        per_image = sentences // num_images
        n = self.negatives_per_positive
        own = tf.range(sentences)
        if self.negative_sampling == "random":
            other = (sentence_image[:, None] + tf.random.uniform([sentences, n], 1, num_images, tf.int32)) % num_images
            other_sentence = other * per_image + tf.random.uniform([sentences, n], 0, per_image, tf.int32)
        else:  # the top scores of s against other images, and of i(s) against other images' sentences
            half = (n + 1) // 2  # column k of the negatives takes the (k // 2)-th hardest of its side
            if image_embeddings.shape[0] is not None and image_embeddings.shape[0] <= half:
                raise ValueError(f"negative_sampling 'hardest': a batch of {image_embeddings.shape[0]} images "
                                 f"has fewer than {half} other images (negatives_per_positive={n})")
            pairs = tf.stop_gradient(sentence_embeddings)[:, None, :] * tf.stop_gradient(image_embeddings)[None]
            scores = tf.reshape(self.similarity_head(tf.reshape(pairs, [-1, self.embed_dim]), training=False),
                                [sentences, num_images])                                  # [S, I]
            mismatched = tf.not_equal(sentence_image[:, None], tf.range(num_images)[None, :])
            hardest = tf.math.top_k(tf.where(mismatched, scores, -np.inf), k=half).indices  # images for s
            other = tf.repeat(hardest, 2, axis=1)[:, :n]
            same = tf.equal(sentence_image[:, None], sentence_image[None, :])
            against_own = tf.gather(tf.transpose(scores), sentence_image)                # [S, S]: (t, i(s))
            hardest = tf.math.top_k(tf.where(same, -np.inf, against_own), k=half).indices
            other_sentence = tf.repeat(hardest, 2, axis=1)[:, :n]
        replace_image = tf.range(n)[None, :] % 2 == 0
        negative_image = tf.where(replace_image, other, sentence_image[:, None])
        negative_sentence = tf.where(replace_image, own[:, None], other_sentence)
        image_rows = tf.concat([sentence_image, tf.reshape(negative_image, [-1])], 0)
        sentence_rows = tf.concat([own, tf.reshape(negative_sentence, [-1])], 0)
        labels = tf.concat([tf.ones([sentences]), tf.zeros([sentences * n])], 0)
        return image_rows, sentence_rows, labels

    def _pair_loss(self, data, training):
        sentence_image, image_embeddings, sentence_embeddings = self._embed_batch(data, training=training)
        image_rows, sentence_rows, labels = self._sampled_pairs(sentence_image, tf.shape(image_embeddings)[0],
                                                                image_embeddings, sentence_embeddings)
        logits = self.score_pairs(tf.gather(image_embeddings, image_rows),
                                  tf.gather(sentence_embeddings, sentence_rows), training=training)
        return self.loss_fn(labels, logits), labels, logits

    def _track(self, loss, labels, logits):
        self.loss_tracker.update_state(per_replica_mean(loss))
        correct = tf.equal(tf.cast(logits > 0, tf.float32), labels)
        self.pair_accuracy_tracker.update_state(tf.cast(correct, tf.float32))

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss, labels, logits = self._pair_loss(data, training=True)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self._track(loss, labels, logits)
        return step_logs(self.metrics)

    def test_step(self, data):
        self._track(*self._pair_loss(data, training=False))
        return step_logs(self.metrics)

    def get_config(self):
        config = keras.Model.get_config(self)  # not TwoBranch's: no ranking-loss arguments here
        config.update(image_shape=list(self.image_shape), vocabulary=list(self.vocabulary),
                      backbone=self.backbone_spec, text_encoder=self.text_encoder, word_dim=self.word_dim,
                      max_words=self.max_words, **self._text_config(), hidden_units=self.hidden_units,
                      embed_dim=self.embed_dim, dropout=self.dropout, batchnorm_momentum=self.batchnorm_momentum,
                      similarity_units=self.similarity_units, negatives_per_positive=self.negatives_per_positive,
                      negative_sampling=self.negative_sampling)
        return config


def scored_retrieval_metrics(model, split, fold_size=1000):
    """The retrieval metrics (`rank_metrics` keys, `t2t_r1` of the text
    branch's embeddings, and the COCO 1K folds from 5,000 images) of a model
    that scores pairs (`TwoBranchSimilarity`) on a `RetrievalSplit`."""
    images, captions = embed_split(model, split)
    caption_image = np.asarray(split.caption_image, np.int64)
    similarity = model.score_matrix(images, captions)
    metrics = rank_metrics(similarity, caption_image)
    metrics["t2t_r1"] = text_to_text_r1(captions, caption_image)
    if len(images) >= 5 * fold_size and len(images) % fold_size == 0:
        folds = []
        for start in range(0, len(images), fold_size):
            keep = (caption_image >= start) & (caption_image < start + fold_size)
            folds.append(rank_metrics(similarity[start:start + fold_size][:, keep], caption_image[keep] - start))
        metrics.update({f"1k_{key}": float(np.mean([f[key] for f in folds])) for key in folds[0]})
    return metrics


class ScoredRetrievalMonitor(RetrievalMonitor):
    """`RetrievalMonitor` for a pair-scoring model: `val_rsum`, `val_t2t_r1` per epoch."""

    def on_epoch_end(self, epoch, logs=None):
        metrics = scored_retrieval_metrics(self.model, self.split)
        if logs is not None:
            logs.update(val_rsum=metrics["rsum"], val_t2t_r1=metrics["t2t_r1"])


def export_text_image_scorer(model, path, image_shape, description=""):
    """Export a pair-scoring image-text model (`TwoBranchSimilarity`).

    Signatures:
        serving_default, score: `images` string [n] of encoded images and
            `texts` string [m] -> `scores` float32 [n, m], match logits.
        embed_image / embed_text: each branch's L2-normalised embeddings
            (their cosine is NOT the model's score; use `score`).
    """
    from vislearn.export import decode_batch, write_metadata

    def embed_image(images):
        return {"embeddings": model.embed_image(decode_batch(images, image_shape), training=False)}

    def embed_text(texts):
        return {"embeddings": model.embed_text(texts, training=False)}

    def score(images, texts):
        image_embeddings = model.embed_image(decode_batch(images, image_shape), training=False)
        text_embeddings = model.embed_text(texts, training=False)
        n, m = tf.shape(image_embeddings)[0], tf.shape(text_embeddings)[0]
        pairs = tf.repeat(image_embeddings, m, axis=0) * tf.tile(text_embeddings, [n, 1])
        return {"scores": tf.reshape(model.similarity_head(pairs, training=False)[:, 0], [n, m])}

    archive = keras.export.ExportArchive()
    archive.track(model)
    images_spec = tf.TensorSpec([None], tf.string, name="images")
    texts_spec = tf.TensorSpec([None], tf.string, name="texts")
    archive.add_endpoint("serving_default", score, input_signature=[images_spec, texts_spec])
    archive.add_endpoint("score", score, input_signature=[images_spec, texts_spec])
    archive.add_endpoint("embed_image", embed_image, input_signature=[images_spec])
    archive.add_endpoint("embed_text", embed_text, input_signature=[texts_spec])
    archive.write_out(str(path), verbose=False)
    write_metadata(path, kind="text_image_scorer", image_shape=list(image_shape), embedding_dim=int(model.embed_dim),
                   description=description,
                   signatures={"serving_default": "images, texts -> scores [images, texts]",
                               "score": "images, texts -> scores [images, texts]",
                               "embed_image": "images -> branch embeddings (not cosine-comparable)",
                               "embed_text": "texts -> branch embeddings (not cosine-comparable)"})
    return Path(path)
