"""Word embedding with rows from pretrained word vectors (GloVe / word2vec text files)."""

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger("vislearn")


def read_word_vectors(path, words, dim, option="model.word_vectors"):
    """Vectors of `words` from a GloVe / word2vec text file (`word v1 v2 ...`
    per line; word2vec's first line `N D` is skipped).

    A word matches its own spelling first, else its first case-insensitive
    spelling in the file (word2vec files are cased, caption vocabularies
    lower case). Only matched lines are parsed as numbers, so a large file
    costs little more than a read; every line's dimension is checked.

    Args:
        path: the text file.
        words: the vocabulary, a list of strings.
        dim: the expected vector width (the model's `word_dim`).
        option: the recipe key named in error messages.

    Returns:
        (indices into `words` found, float32 array [found, dim]).

    Raises:
        ValueError, one line naming the file (and line): the file is missing,
        a line's dimension differs from the first line's, the dimension is
        not `dim`, a matched value is not a number, or no word is found.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{option}: {path}: no such file")
    index = {word: i for i, word in enumerate(words)}
    lower = {}
    for i, word in enumerate(words):
        lower.setdefault(word.lower(), i)
    exact, folded = {}, {}  # vocabulary index -> (line number, value fields)
    first_dim = None
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                fields = raw.decode("utf-8").rstrip("\r\n").rstrip().split(" ")
            except UnicodeDecodeError:
                raise ValueError(f"{option}: {path}:{number}: not UTF-8 text") from None
            if fields == [""]:
                continue
            if number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                continue  # word2vec header "N D"
            width = len(fields) - 1
            if first_dim is None:
                first_dim = width
                if width != dim:
                    raise ValueError(f"{option}: {path}:{number}: the vectors have {width} values, "
                                     f"but model.word_dim is {dim} (set word_dim: {width} or use other vectors)")
            elif width != first_dim:
                raise ValueError(f"{option}: {path}:{number}: {width} values after the word, "
                                 f"the first line has {first_dim}")
            word = fields[0]
            if word in index and index[word] not in exact:
                exact[index[word]] = (number, fields[1:])
            elif word.lower() in lower and lower[word.lower()] not in folded:
                folded[lower[word.lower()]] = (number, fields[1:])
    found = {**folded, **exact}  # a word's own spelling wins over another case
    if not found:
        raise ValueError(f"{option}: {path}: none of the {len(words)} vocabulary words is in the file")
    rows = sorted(found)
    vectors = np.empty((len(rows), dim), np.float32)
    for row, i in enumerate(rows):
        number, values = found[i]
        for field, value in enumerate(values, start=2):
            try:
                vectors[row, field - 2] = float(value)
            except ValueError:
                raise ValueError(f"{option}: {path}:{number}: field {field} ({value!r}) is not a number") from None
    log.info("word vectors: %d of %d vocabulary words found in %s", len(rows), len(words), path)
    return np.asarray(rows, np.int64), vectors


def set_embedding_rows(layer, rows, vectors):
    """Set rows `rows` of a built `keras.layers.Embedding` or `WordEmbedding`
    (kept fixed when it freezes them) to `vectors` [len(rows), dim]."""
    if isinstance(layer, WordEmbedding):
        layer.set_pretrained(rows, vectors)
        return
    table = keras.ops.convert_to_numpy(layer.embeddings).copy()
    table[rows] = vectors
    layer.embeddings.assign(table)


@keras.saving.register_keras_serializable(package="vislearn")
class WordEmbedding(keras.layers.Layer):
    """A word embedding (like `keras.layers.Embedding`, the same weights)
    whose rows can be set from pretrained vectors and, optionally, kept fixed
    while the other rows train.

    Args:
        input_dim: vocabulary size (rows).
        output_dim: vector width.
        freeze_pretrained: keep the rows given to `set_pretrained` fixed.
            They are copied to a non-trainable table (so no optimizer, weight
            decay included, moves them) and selected by a non-trainable row
            flag; the layer then holds two tables.

    Call arguments:
        inputs: int token ids of any shape.

    Returns:
        The ids' vectors, shape `inputs.shape + (output_dim,)`.
    """

    def __init__(self, input_dim, output_dim, freeze_pretrained=False, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.freeze_pretrained = bool(freeze_pretrained)

    def build(self, input_shape=None):
        # Keras' Embedding initialisation; "embeddings" first keeps checkpoints of a plain Embedding loadable.
        self.embeddings = self.add_weight(shape=(self.input_dim, self.output_dim), initializer="uniform",
                                          name="embeddings")
        if self.freeze_pretrained:
            self.pretrained = self.add_weight(shape=(self.input_dim, self.output_dim), initializer="zeros",
                                              name="pretrained", trainable=False)
            self.pretrained_rows = self.add_weight(shape=(self.input_dim,), initializer="zeros",
                                                   name="pretrained_rows", trainable=False)
        self.built = True

    def set_pretrained(self, rows, vectors):
        """Set rows `rows` (int [n]) to `vectors` (float [n, output_dim])."""
        if not self.built:
            self.build()
        table = keras.ops.convert_to_numpy(self.embeddings).copy()
        table[rows] = vectors
        self.embeddings.assign(table)
        if self.freeze_pretrained:
            fixed = keras.ops.convert_to_numpy(self.pretrained).copy()
            fixed[rows] = vectors
            flags = keras.ops.convert_to_numpy(self.pretrained_rows).copy()
            flags[rows] = 1.0
            self.pretrained.assign(fixed)
            self.pretrained_rows.assign(flags)

    def call(self, inputs):
        ids = tf.cast(inputs, tf.int32)
        vectors = tf.gather(self.embeddings, ids)
        if self.freeze_pretrained:
            vectors = tf.where(tf.gather(self.pretrained_rows, ids)[..., None] > 0,
                               tf.gather(self.pretrained, ids), vectors)
        return tf.cast(vectors, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim, freeze_pretrained=self.freeze_pretrained)
        return config
