"""mst5_jax: Multilingual Sentence-T5 in JAX/Flax.

`from mst5_jax import SentenceEncoder` is the entry point for encoding; the modules
(config, model, lora, losses, partitioning, train_step, train, encode, evals, checkpoints)
are importable on their own. Importing this package never imports TensorFlow, seqio, gin
or torch.
"""
__version__ = "0.1.0"

__all__ = ["SentenceEncoder", "EncoderConfig"]


def __getattr__(name):
    if name == "SentenceEncoder":
        from mst5_jax.inference.encoder import SentenceEncoder
        return SentenceEncoder
    if name == "EncoderConfig":
        from mst5_jax.core.config import EncoderConfig
        return EncoderConfig
    raise AttributeError(f"module 'mst5_jax' has no attribute {name!r}")
