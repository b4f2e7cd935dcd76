"""Small transformer text encoder pooled to one vector per sentence."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="vislearn")
class TransformerTextEncoder(keras.layers.Layer):
    """Position embeddings, a stack of `keras_hub.layers.TransformerEncoder`
    blocks (pre-layer-norm, then a final layer norm) and the mean over the
    words present.

    Padding positions are masked out of every block's attention and out of
    the mean, so a sentence's vector does not depend on how much padding
    follows it. A sentence without words pools to the zero vector.

    Args:
        sequence_length: the longest input (rows of the position embedding).
        num_layers: transformer blocks.
        num_heads: attention heads (the word width must be divisible by it).
        intermediate_dim: width of each block's feed-forward layer.
        dropout: dropout rate inside the blocks.

    Call arguments:
        words: float [batch, length, width] word embeddings, length at most
            `sequence_length`.
        padding_mask: bool [batch, length], True where a word is present.
        training: Python bool.

    Returns:
        float [batch, width].

    Reference:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    """

    def __init__(self, sequence_length, num_layers=2, num_heads=4, intermediate_dim=128, dropout=0.1, **kwargs):
        import keras_hub  # imported here: `import vislearn.layers` stays free of keras-hub's import cost

        super().__init__(**kwargs)
        self.sequence_length, self.num_layers, self.num_heads = int(sequence_length), int(num_layers), int(num_heads)
        self.intermediate_dim, self.dropout = int(intermediate_dim), float(dropout)
        self.position_embedding = keras_hub.layers.PositionEmbedding(self.sequence_length, name="position_embedding")
        # Pre-layer-norm blocks train without a learning-rate warm-up, which recipes do not all have.
        self.blocks = [keras_hub.layers.TransformerEncoder(self.intermediate_dim, self.num_heads, self.dropout,
                                                           activation="gelu", normalize_first=True, name=f"block{i}")
                       for i in range(self.num_layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")

    def build(self, words_shape, padding_mask_shape=None):
        width = words_shape[-1]
        if width % self.num_heads:
            raise ValueError(f"transformer text encoder: the word width {width} is not divisible by "
                             f"num_heads={self.num_heads}")
        shape = (None, self.sequence_length, width)
        self.position_embedding.build(shape)
        for block in self.blocks:
            block.build(shape)
        self.final_norm.build(shape)
        self.built = True

    def call(self, words, padding_mask, training=None):
        x = words + self.position_embedding(words)
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask, training=training)
        x = self.final_norm(x)
        present = tf.cast(padding_mask, x.dtype)[..., None]
        return tf.math.divide_no_nan(tf.reduce_sum(x * present, axis=1), tf.reduce_sum(present, axis=1))

    def compute_output_shape(self, words_shape, padding_mask_shape=None):
        return (words_shape[0], words_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(sequence_length=self.sequence_length, num_layers=self.num_layers, num_heads=self.num_heads,
                      intermediate_dim=self.intermediate_dim, dropout=self.dropout)
        return config
