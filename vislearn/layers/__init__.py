"""Public layers, one per file."""

from vislearn.layers.gradient_reversal import GradientReversal
from vislearn.layers.transformer_text_encoder import TransformerTextEncoder
from vislearn.layers.word_embedding import WordEmbedding, read_word_vectors, set_embedding_rows

__all__ = ["GradientReversal", "TransformerTextEncoder", "WordEmbedding", "read_word_vectors", "set_embedding_rows"]
