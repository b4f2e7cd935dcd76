"""vislearn: landmark methods of visual learning as Keras 3 models."""

__version__ = "0.1.0"
