"""Bi-directional max-margin ranking loss with neighbourhood constraints.

For image embeddings `x_i` and sentence embeddings `y_s` (L2-normalised) and
squared Euclidean distances `d`, every matching pair (s, i) should be closer
than any non-matching pair by a margin m:

    sentence -> image:  d(y_s, x_i) + m < d(y_s, x_j)   for every other image j
    image -> sentence:  d(y_s, x_i) + m < d(y_t, x_i)   for every sentence t of another image
    sentence -> sentence (within-modal neighbourhood constraint):
        max over siblings u of d(y_s, y_u) + m < d(y_s, y_t)   for t of another image

    image -> image (optional):
        max over neighbours j of d(x_i, x_j) + m < d(x_i, x_k)   for k not a neighbour

where the siblings of a sentence are the other sentences of the same image,
and the neighbours of an image are the other images that share a sentence
with it (the dual of siblings; the caller says which, see `y_true`). In
Flickr30K and COCO almost no two images share a sentence, which is why the
paper uses only the sentence constraint; in generated captions they often do.
Each constraint gives a hinge `max(0, m + d_pos - d_neg)`; per anchor the
hinges over its negatives are reduced (`negatives`), then averaged over anchors:

- `"top_k"` (the paper): the mean of the `top_k` largest hinges (the most
  violating negatives);
- `"hardest"` (VSE++, Faghri et al. 2018): the largest hinge only;
- `"sum"` (sum of hinges, as in VSE0 / Kiros et al.): the sum over all negatives.

The total is `sentence_to_image_weight * L(s->i) + image_to_sentence_weight *
L(i->s) + sentence_weight * L(s->s) + image_weight * L(i->i)`.

Reference:
    Wang, Li, Huang, Lazebnik, "Learning Two-Branch Neural Networks for
    Image-Text Matching Tasks", TPAMI 2018 (section 3.1; weights 1.5 and
    0.05, K=10 and m=0.05 as in the authors' code).
"""

import keras
import tensorflow as tf

NEGATIVES = ("top_k", "hardest", "sum")


def squared_distances(a, b):
    """[n, d] x [m, d] -> [n, m] squared Euclidean distances (clipped at 0
    against rounding)."""
    a_norms = tf.reduce_sum(tf.square(a), axis=1, keepdims=True)
    b_norms = tf.reduce_sum(tf.square(b), axis=1, keepdims=True)
    return tf.maximum(a_norms - 2.0 * tf.matmul(a, b, transpose_b=True) + tf.transpose(b_norms), 0.0)


def reduce_hinges(hinges, negative_mask, negatives="top_k", top_k=10):
    """Per anchor (row): reduce the hinges of its negatives (mask True) to one value.

    A row with fewer than `top_k` negatives averages over the ones it has.
    Returns float [rows].
    """
    mask = tf.cast(negative_mask, hinges.dtype)
    if negatives == "sum":
        return tf.reduce_sum(hinges * mask, axis=1)
    # Non-negatives get -1, below every hinge (>= 0), so top_k never picks them.
    masked = tf.where(negative_mask, hinges, -tf.ones_like(hinges))
    k = 1 if negatives == "hardest" else tf.minimum(top_k, tf.shape(hinges)[1])
    largest = tf.maximum(tf.math.top_k(masked, k=k).values, 0.0)
    count = tf.minimum(tf.cast(k, hinges.dtype), tf.reduce_sum(mask, axis=1))
    return tf.math.divide_no_nan(tf.reduce_sum(largest, axis=1), count)


def _masked_mean(values, mask):
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


@keras.saving.register_keras_serializable(package="vislearn")
class BidirectionalRankingLoss(keras.losses.Loss):
    """Bi-directional ranking loss over the most violating negatives, with the
    within-modal (sentence-sentence) neighbourhood constraint.

    Args:
        margin: m, in squared-distance units (0.05 in the paper).
        top_k: K, negatives kept per anchor with `negatives="top_k"`.
        negatives: `"top_k"`, `"hardest"` or `"sum"` (see the module docstring).
        sentence_to_image_weight: weight of the sentence -> image term (1.5).
        image_to_sentence_weight: weight of the image -> sentence term (1.0).
        sentence_weight: weight of the sentence-sentence constraint (0.05; 0 turns it off).
        image_weight: weight of the image-image constraint (0, off, as in the paper).

    Call arguments:
        y_true: int [num_sentences]: the row, in the image batch, of each
            sentence's image. Images of a batch must be distinct (as the
            neighbourhood sampler makes them). Or a pair `(that, bool
            [num_images, num_images])`, the second saying which images are
            neighbours (the diagonal is ignored), for the image constraint.
        y_pred: `(image_embeddings [num_images, dim], sentence_embeddings
            [num_sentences, dim])`.

    Returns:
        A scalar.
    """

    def __init__(self, margin=0.05, top_k=10, negatives="top_k", sentence_to_image_weight=1.5,
                 image_to_sentence_weight=1.0, sentence_weight=0.05, image_weight=0.0, name="bidirectional_ranking",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives: expected one of {list(NEGATIVES)}, received {negatives!r}")
        if int(top_k) < 1:
            raise ValueError(f"top_k: expected a positive integer, received {top_k!r}")
        self.margin = float(margin)
        self.top_k = int(top_k)
        self.negatives = negatives
        self.sentence_to_image_weight = float(sentence_to_image_weight)
        self.image_to_sentence_weight = float(image_to_sentence_weight)
        self.sentence_weight = float(sentence_weight)
        self.image_weight = float(image_weight)

    def terms(self, sentence_image, image_embeddings, sentence_embeddings, image_neighbours=None):
        """The unweighted terms: {"sentence_to_image", "image_to_sentence",
        "sentence_sentence"}, and "image_image" when `image_neighbours` is given."""
        sentence_image = tf.cast(tf.reshape(sentence_image, [-1]), tf.int32)
        images = tf.cast(image_embeddings, tf.float32)
        sentences = tf.cast(sentence_embeddings, tf.float32)
        reduce = lambda hinges, mask: reduce_hinges(hinges, mask, self.negatives, self.top_k)  # noqa: E731

        distances = squared_distances(sentences, images)                       # [S, I]
        matches = tf.one_hot(sentence_image, tf.shape(images)[0], on_value=True, off_value=False)
        positive = tf.gather(distances, sentence_image, axis=1, batch_dims=1)  # d(y_s, x_{i(s)}) [S]

        # Sentence -> image: each sentence against the other images.
        to_image = reduce(tf.maximum(self.margin + positive[:, None] - distances, 0.0), ~matches)

        # Image -> sentence: each matching pair (s, i(s)) against the sentences
        # of other images, at their distance to i(s).
        to_own_image = tf.transpose(tf.gather(distances, sentence_image, axis=1))  # [S, S]: d(y_t, x_{i(s)})
        same_image = tf.equal(sentence_image[:, None], sentence_image[None, :])
        to_sentence = reduce(tf.maximum(self.margin + positive[:, None] - to_own_image, 0.0), ~same_image)

        # Sentence -> sentence: the farthest sibling should be nearer than any
        # sentence of another image; sentences without a sibling are skipped.
        within = squared_distances(sentences, sentences)
        siblings = same_image & ~tf.eye(tf.shape(sentences)[0], dtype=tf.bool)
        farthest_sibling = tf.reduce_max(tf.where(siblings, within, 0.0), axis=1)
        sentence_hinges = reduce(tf.maximum(self.margin + farthest_sibling[:, None] - within, 0.0), ~same_image)
        has_sibling = tf.reduce_any(siblings, axis=1)

        terms = {"sentence_to_image": tf.reduce_mean(to_image),
                 "image_to_sentence": tf.reduce_mean(to_sentence),
                 "sentence_sentence": _masked_mean(sentence_hinges, has_sibling)}

        if image_neighbours is not None:
            # Image -> image, the same shape of constraint over image neighbours;
            # images without a neighbour in the batch are skipped.
            between = squared_distances(images, images)
            itself = tf.eye(tf.shape(images)[0], dtype=tf.bool)
            neighbours = tf.cast(image_neighbours, tf.bool) & ~itself
            farthest_neighbour = tf.reduce_max(tf.where(neighbours, between, 0.0), axis=1)
            image_hinges = reduce(tf.maximum(self.margin + farthest_neighbour[:, None] - between, 0.0),
                                  ~neighbours & ~itself)
            terms["image_image"] = _masked_mean(image_hinges, tf.reduce_any(neighbours, axis=1))
        return terms

    def call(self, y_true, y_pred):
        image_embeddings, sentence_embeddings = y_pred
        sentence_image, image_neighbours = y_true if isinstance(y_true, (tuple, list)) else (y_true, None)
        terms = self.terms(sentence_image, image_embeddings, sentence_embeddings,
                           image_neighbours if self.image_weight else None)
        total = (self.sentence_to_image_weight * terms["sentence_to_image"]
                 + self.image_to_sentence_weight * terms["image_to_sentence"])
        if self.sentence_weight:
            total += self.sentence_weight * terms["sentence_sentence"]
        if self.image_weight:
            if image_neighbours is None:
                raise ValueError("image_weight is set: y_true must be (sentence_image, image_neighbours)")
            total += self.image_weight * terms["image_image"]
        return total

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin, top_k=self.top_k, negatives=self.negatives,
                      sentence_to_image_weight=self.sentence_to_image_weight,
                      image_to_sentence_weight=self.image_to_sentence_weight,
                      sentence_weight=self.sentence_weight, image_weight=self.image_weight)
        return config
