"""Concept words of captions, for image-conditioned masked language modelling.

- `wordpiece_vocabulary`: a WordPiece vocabulary computed from the training
  captions with keras-hub's `compute_word_piece_vocabulary` (lower-cased; ids
  0, 1, 2 are `[PAD]`, `[UNK]`, `[MASK]`).
- `read_vocabulary`: a vocabulary given as a list or a file (one token a
  line, BERT's `vocab.txt` layout), checked against what a model expects.
- `concept_vocabulary`: the words that may be masked. ICMLM masks nouns and
  adjectives; without a part-of-speech tagger (no network, no NLTK data) the
  rule is: a word of the captions (letters only, lower-cased) is a concept
  when it is not in `STOP_WORDS` (a closed list of English function words:
  articles, determiners, pronouns, prepositions, conjunctions, auxiliaries,
  numerals and a few adverbs), appears in at least `min_count` training
  captions, and is one whole token of the vocabulary. What is left in
  descriptive captions is overwhelmingly nouns and adjectives (on
  captioned_shapes: shape, colour and size words, the photo's subject,
  position words, "shape(s)" and "photo/picture/image").
- `mask_one_concept`: one concept token per caption, picked uniformly at
  random, replaced by `[MASK]`; the label is the original token id. A caption
  without any concept token is not masked and has `valid = False` (its
  prediction gets weight 0 and is counted).
- `concept_labels`: image-level class labels from captions (the probe split
  of the frozen-encoder protocol on captioned_shapes).

Reference:
    Sariyildiz, Perez, Larlus, "Learning Visual Representations with Caption
    Annotations", ECCV 2020 (section 3: concepts, one masked token per caption).
"""

import collections
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from vislearn.config import ConfigError

PAD, UNK, MASK = "[PAD]", "[UNK]", "[MASK]"
RESERVED_TOKENS = (PAD, UNK, MASK)  # ids 0, 1, 2

STOP_WORDS = frozenset("""
a an the this that these those some any each every all both either neither no another other such
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what where when why how there here
of in on at to from by with without into onto over under above below behind beside besides between
among through across along around near next off out up down upon against toward towards within
about after before during until since than as like via per
and or but nor so yet if then because while although though
is are was were be been being am has have had having do does did doing can could will would shall
should may might must
one two three four five six seven eight nine ten eleven twelve first second third
not very too also just only more most less least much many few several own same again still even
""".split())


def caption_words(text):
    """Lower-cased words of a caption (letters only)."""
    return re.findall(r"[a-z]+", str(text).lower())


def wordpiece_vocabulary(captions, vocabulary_size=1000):
    """A WordPiece vocabulary of the captions (keras-hub's trainer), reserved tokens first."""
    from keras_hub.tokenizers import compute_word_piece_vocabulary

    captions = [str(c) for c in captions]
    if not captions:
        raise ConfigError("data: no training captions to compute the WordPiece vocabulary from")
    dataset = tf.data.Dataset.from_tensor_slices(captions).batch(1024)
    return list(compute_word_piece_vocabulary(dataset, int(vocabulary_size), lowercase=True,
                                              reserved_tokens=list(RESERVED_TOKENS)))


def read_vocabulary(vocabulary, vocabulary_size=None, where="model.vocabulary"):
    """The token list of `vocabulary` (a list, or a file with one token a line).

    Raises:
        ConfigError (a ValueError, one line) when the file is missing, the reserved tokens are
        not ids 0-2, or the size differs from `vocabulary_size` (the size the
        model's embedding and output layers were built for).
    """
    source = "the list"
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary)
        if not path.is_file():
            raise ConfigError(f"{where}: vocabulary file {path} not found")
        source = str(path)
        vocabulary = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not vocabulary:
        raise ConfigError(f"{where}: expected a non-empty list of WordPiece tokens or a vocabulary file "
                         "(recipes compute one from the training captions)")
    vocabulary = [str(token) for token in vocabulary]
    if tuple(vocabulary[:len(RESERVED_TOKENS)]) != RESERVED_TOKENS:
        raise ConfigError(f"{where}: {source} starts with {vocabulary[:3]}; expected the reserved tokens "
                         f"{list(RESERVED_TOKENS)} as ids 0, 1, 2")
    if vocabulary_size is not None and len(vocabulary) != int(vocabulary_size):
        raise ConfigError(f"{where}: {source} holds {len(vocabulary)} tokens but the model was built for "
                         f"vocabulary_size {vocabulary_size}; use the vocabulary the model was trained with")
    return vocabulary


def concept_vocabulary(captions, vocabulary, min_count=5):
    """Concept words of the captions (the rule of the module docstring), most frequent first."""
    counts = collections.Counter(word for caption in captions for word in set(caption_words(caption)))
    tokens = set(vocabulary)
    concepts = [word for word, count in counts.most_common()
                if count >= min_count and word not in STOP_WORDS and word in tokens]
    return concepts


def check_concepts(concepts, vocabulary, where="model.concepts"):
    """Every concept must be one whole token of the vocabulary; returns their token ids."""
    if not concepts:
        raise ConfigError(f"{where}: expected a non-empty list of concept words "
                         "(recipes derive one from the training captions)")
    index = {token: i for i, token in enumerate(vocabulary)}
    missing = [word for word in concepts if word not in index]
    if missing:
        raise ConfigError(f"{where}: {missing[:5]} are not whole tokens of the vocabulary "
                         f"({len(vocabulary)} tokens); the vocabulary does not match the concepts")
    return [index[word] for word in concepts]


def unmaskable(captions, concepts):
    """Captions that contain no concept word (they cannot be masked)."""
    concepts = set(concepts)
    return [caption for caption in captions if not concepts.intersection(caption_words(caption))]


def mask_one_concept(tokens, is_concept, mask_id, seed=None):
    """Mask one concept token per caption.

    Args:
        tokens: int [N, L] token ids.
        is_concept: bool [N, L], true at concept tokens.
        mask_id: id of `[MASK]`.
        seed: optional stateless seed (int pair) for a reproducible choice
            (evaluation); without it the choice is fresh every call.

    Returns:
        (masked tokens [N, L], positions int32 [N], labels [N] (the original
        ids at the positions), valid bool [N]). A row without a concept token
        is returned unmasked with `valid = False` (position 0, label its first token).
    """
    shape = tf.shape(tokens)
    scores = (tf.random.stateless_uniform(shape, seed=seed) if seed is not None
              else tf.random.uniform(shape))
    scores = tf.where(is_concept, scores, -1.0)
    positions = tf.argmax(scores, axis=1, output_type=tf.int32)
    valid = tf.reduce_any(is_concept, axis=1)
    labels = tf.gather(tokens, positions, batch_dims=1)
    at_position = tf.logical_and(tf.one_hot(positions, shape[1], on_value=True, off_value=False), valid[:, None])
    masked = tf.where(at_position, tf.cast(mask_id, tokens.dtype), tokens)
    return masked, positions, labels, valid


def concept_labels(captions_per_image, classes):
    """Class of each image from its captions: the one word of `classes` they
    name (an image whose captions name none or several gets -1).

    Args:
        captions_per_image: [[caption, ...], ...], one list per image.
        classes: class words (e.g. captioned_shapes' shape names).

    Returns:
        int64 array [images] of class indices or -1.
    """
    index = {word: i for i, word in enumerate(classes)}
    labels = []
    for captions in captions_per_image:
        named = {index[w] for caption in captions for w in caption_words(caption) if w in index}
        labels.append(named.pop() if len(named) == 1 else -1)
    return np.asarray(labels, dtype=np.int64)
