"""two_branch text branch: the transformer encoder (padding mask, gradients,
empty captions, training, export) and pretrained word vectors (rows, frozen
rows, config round trip without the file, one-line errors)."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from vislearn import recipes
from vislearn.export import export_text_image_embedder
from vislearn.layers import TransformerTextEncoder, read_word_vectors
from vislearn.models.two_branch import TwoBranch
from vislearn.models.two_branch_similarity import TwoBranchSimilarity

VOCAB = ["a", "red", "blue", "green", "circle", "star", "cross", "on", "the", "left", "of", "small", "large"]
IMAGE_SHAPE = (16, 16, 3)
TINY = dict(image_shape=IMAGE_SHAPE, vocabulary=VOCAB, backbone={"name": "small_cnn", "width": 4, "depth": 1},
            word_dim=16, max_words=8, hidden_units=32, embed_dim=16, dropout=0.0, top_k=3)
TRANSFORMER = dict(TINY, text_encoder="transformer", transformer_layers=2, transformer_heads=4,
                   transformer_intermediate_dim=32, transformer_dropout=0.0)
CAPTIONS = [["a red circle", "a small red circle on the left"], ["a blue star", "the blue star"],
            ["a green cross", ""], ["a large red star", "a red star left of a circle"]]


def make(cls=TwoBranch, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = cls(**{**TRANSFORMER, **kwargs})
    model.build((None, *IMAGE_SHAPE))
    return model


def batch():
    images = tf.random.stateless_uniform([len(CAPTIONS), *IMAGE_SHAPE], seed=[1, 2])
    return {"image": images, "captions": tf.constant(CAPTIONS)}


def fit(model, steps, optimizer):
    model.compile(optimizer=optimizer)
    dataset = tf.data.Dataset.from_tensors(batch()).repeat()
    return model.fit(dataset, steps_per_epoch=1, epochs=steps, verbose=0).history["loss"]


def vector_file(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def vector_line(word, values):
    return " ".join([word, *(f"{v:.6f}" for v in values)])


# ---------------------------------------------------------------- transformer encoder


def test_transformer_vector_does_not_depend_on_padding():
    short, long = make(max_words=8), make(max_words=12, seed=1)
    for a, b in zip(short.weights, long.weights):  # same weights; the longer position table extends the shorter
        value = np.asarray(a)
        if a.shape != b.shape:
            value = np.concatenate([value, np.asarray(b)[a.shape[0]:]])
        b.assign(value)
    texts = tf.constant(["a red circle", "a small red circle on the left", "blue", ""])
    np.testing.assert_allclose(short.embed_text(texts), long.embed_text(texts), atol=1e-5)

    # Layer level: the same words padded to 5 and to 8 positions.
    encoder = short.transformer
    words = short.word_embedding(short.tokenizer(texts))
    present = short.tokenizer(texts) > 0
    np.testing.assert_allclose(encoder(words[:, :7], present[:, :7]), encoder(words, present), atol=1e-5)

    # Not vacuous: words and their order change the vector.
    changed = short.embed_text(tf.constant(["a red circle", "a blue circle", "circle red a"])).numpy()
    assert np.abs(changed[0] - changed[1]).max() > 1e-3 and np.abs(changed[0] - changed[2]).max() > 1e-3


def test_transformer_empty_caption_is_finite_and_fixed():
    model = make()
    vectors = model.embed_text(tf.constant(["", "zebra xylophone", "", "a red circle"])).numpy()
    assert np.isfinite(vectors).all()
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert np.linalg.norm(vectors[3]) == pytest.approx(1.0, rel=1e-5)


def test_training_the_transformer_alone_moves_every_weight_and_lowers_the_loss():
    model = make()
    for part in (model.encoder, model.image_mlp, model.word_embedding, model.text_mlp):
        part.trainable = False  # what learns is the transformer alone
    before = [np.asarray(w) for w in model.transformer.trainable_weights]
    assert len(before) == 2 * 16 + 1 + 2  # per block: attention q/k/v/o + 2 norms + 2 dense; positions; final norm
    losses = fit(model, 10, keras.optimizers.Adam(3e-3))  # the batch holds an empty caption
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
    for weight, old in zip(model.transformer.trainable_weights, before):
        assert np.abs(np.asarray(weight) - old).max() > 0, weight.path


def test_export_embed_text_matches_the_model(tmp_path):
    model = make()
    path = export_text_image_embedder(model, tmp_path / "tb" / "1", IMAGE_SHAPE)
    texts = ["a red circle", "", "zebra", "a small red circle on the left of a blue star and more words"]
    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures["embed_text"](texts=tf.constant(texts))["embeddings"]
    np.testing.assert_allclose(out, model.embed_text(tf.constant(texts)), atol=1e-5)
    # Stock TF Serving: every op of the graph is a core TensorFlow op.
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    ops = {op.name for graph in saved.meta_graphs for op in graph.meta_info_def.stripped_op_list.op}
    assert ops and not ops - set(dir(tf.raw_ops)), ops - set(dir(tf.raw_ops))


def test_transformer_options_validated_and_in_recipes():
    with pytest.raises(ValueError, match=r"model.transformer_heads: expected a divisor of word_dim=16, received 3"):
        TwoBranch(**{**TRANSFORMER, "transformer_heads": 3})
    with pytest.raises(ValueError, match=r"'transformer'\], received 'lstm'"):
        TwoBranch(**{**TINY, "text_encoder": "lstm"})
    recipe, _ = recipes.load_recipe("two_branch_shapes", ["model.text_encoder=transformer",
                                                          "model.transformer_layers=1", "model.word_vectors=x.txt",
                                                          "model.train_word_vectors=false"])
    assert recipe["model"]["transformer_layers"] == 1 and recipe["model"]["train_word_vectors"] is False
    layer = TransformerTextEncoder(6, num_layers=1, num_heads=2, intermediate_dim=8, name="t")
    assert TransformerTextEncoder.from_config(layer.get_config()).get_config() == layer.get_config()


# ---------------------------------------------------------------- pretrained word vectors


@pytest.fixture
def vectors(tmp_path):
    """A word2vec-style file: header, a cased duplicate, a word outside the vocabulary."""
    rng = np.random.default_rng(0)
    table = {w: rng.normal(size=16).astype(np.float32) for w in ("Red", "red", "circle", "zebra", "STAR")}
    path = vector_file(tmp_path / "vectors.txt", ["5 16", *(vector_line(w, v) for w, v in table.items())])
    return path, table


def test_word_vectors_initialise_found_rows(vectors, caplog):
    path, table = vectors
    with caplog.at_level(logging.INFO, logger="vislearn"):
        model = make(word_vectors=str(path))
    assert f"word vectors: 3 of {len(VOCAB)} vocabulary words found in {path}" in caplog.text
    rows = np.asarray(model.word_embedding.embeddings)
    row = {word: i + 2 for i, word in enumerate(VOCAB)}
    np.testing.assert_allclose(rows[row["red"]], table["red"], atol=1e-6)  # own spelling wins over "Red"
    np.testing.assert_allclose(rows[row["circle"]], table["circle"], atol=1e-6)
    np.testing.assert_allclose(rows[row["star"]], table["STAR"], atol=1e-6)  # other case when no exact match
    others = np.delete(rows, [row["red"], row["circle"], row["star"]], axis=0)
    assert np.abs(others).max() <= 0.05  # Keras' uniform(-0.05, 0.05) initialisation


def test_frozen_word_vectors_stay_fixed(vectors):
    path, table = vectors
    model = make(word_vectors=str(path), train_word_vectors=False, text_encoder="mean")
    ids = tf.constant([VOCAB.index(w) + 2 for w in ("red", "circle", "blue")])
    before = np.asarray(model.word_embedding(ids))
    fit(model, 2, keras.optimizers.AdamW(0.05, weight_decay=0.1))  # weight decay: not even it moves them
    after = np.asarray(model.word_embedding(ids))
    assert np.abs(after[2] - before[2]).max() > 1e-3  # "blue" is not in the file: it trains
    np.testing.assert_array_equal(after[:2], before[:2])
    np.testing.assert_allclose(after[0], table["red"], atol=1e-6)


def test_config_round_trip_and_load_without_the_file(vectors, tmp_path):
    path, _ = vectors
    model = make(word_vectors=str(path), train_word_vectors=False)
    config = model.get_config()
    assert {k: config[k] for k in ("text_encoder", "transformer_layers", "transformer_heads",
                                   "transformer_intermediate_dim", "transformer_dropout", "word_vectors",
                                   "train_word_vectors")} == dict(
        text_encoder="transformer", transformer_layers=2, transformer_heads=4, transformer_intermediate_dim=32,
        transformer_dropout=0.0, word_vectors=str(path), train_word_vectors=False)
    similarity = make(TwoBranchSimilarity, text_encoder="gru", word_vectors=str(path), train_word_vectors=False,
                      transformer_layers=1)
    model.save(tmp_path / "model.keras")
    path.unlink()  # the weights hold the rows; the file is not needed any more
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.get_config() == config
    texts = tf.constant(["a red circle", "the blue star", ""])
    np.testing.assert_allclose(loaded.embed_text(texts), model.embed_text(texts), atol=1e-6)

    config = similarity.get_config()
    assert config["word_vectors"] == str(path) and config["transformer_layers"] == 1
    assert TwoBranchSimilarity.from_config(config).get_config() == config


def test_similarity_network_uses_the_transformer(vectors):
    path, table = vectors
    model = make(TwoBranchSimilarity, word_vectors=str(path), negatives_per_positive=2)
    assert model.transformer is not None
    np.testing.assert_allclose(np.asarray(model.word_embedding.embeddings)[VOCAB.index("red") + 2], table["red"],
                               atol=1e-6)
    assert np.isfinite(model.embed_text(tf.constant(["a red circle", ""]))).all()


@pytest.mark.parametrize("lines, expected", [
    (None, "model.word_vectors: {path}: no such file"),
    (["red " + "0.1 " * 15 + "0.1", "circle " + "0.1 " * 14 + "0.1", "star 1"],
     "model.word_vectors: {path}:2: 15 values after the word, the first line has 16"),
    (["4 8", "red " + "0.1 " * 8],
     "model.word_vectors: {path}:2: the vectors have 8 values, but model.word_dim is 16"),
    (["zebra " + "0.1 " * 16, "xylophone " + "0.1 " * 16],
     f"model.word_vectors: {{path}}: none of the {len(VOCAB)} vocabulary words is in the file"),
    (["red " + "0.1 " * 5 + "x " + "0.1 " * 10],
     "model.word_vectors: {path}:1: field 7 ('x') is not a number"),
])
def test_word_vector_errors_are_one_line(tmp_path, lines, expected):
    path = tmp_path / "vectors.txt"
    if lines is not None:
        vector_file(path, lines)
    expected = expected.format(path=path)
    with pytest.raises(ValueError) as error:
        read_word_vectors(path, VOCAB, 16)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value), str(error.value)


def test_word_vector_error_through_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"model.word_vectors: .*missing.txt: no such file"):
        TwoBranch(**{**TINY, "word_vectors": str(tmp_path / "missing.txt")})
