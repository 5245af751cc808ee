"""A loaded model as the evaluators see it: an ``encode(list[str]) -> float32 [n, d]`` callable.

`mst5_jax.evals` knows only that callable; this module loads a `SentenceEncoder`, fixes
its batch size and max_length, and describes the device and pooling for the results' meta.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from mst5_jax.inference.encoder import SentenceEncoder


@dataclasses.dataclass
class LoadedEncoder:
    """`encode` plus what the result files record about it."""

    encoder: SentenceEncoder
    encode: Callable[[list[str]], np.ndarray]
    device: str
    pooling: Optional[str]


def device_description() -> str:
    """"platform:kind xN" of the devices JAX runs on, e.g. "cpu:cpu x8"."""
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def pooling_of(enc) -> Optional[str]:
    """The encoder's pooling name, where it or its config states one."""
    for obj in (enc, getattr(enc, "config", None)):
        value = getattr(obj, "pooling", None)
        if isinstance(value, str):
            return value
    return None


def load_for_evaluation(model: str, adapter: Optional[str] = None, dtype: str = "float32", *,
                        batch_size: int = 64, max_length: int = 512) -> LoadedEncoder:
    """`SentenceEncoder.from_pretrained(model, adapter, dtype)` wrapped as an evaluators' `encode`."""
    enc = SentenceEncoder.from_pretrained(model, adapter=adapter, dtype=dtype)

    def encode(sentences: list[str]) -> np.ndarray:
        return enc.encode(sentences, batch_size=batch_size, max_length=max_length)

    return LoadedEncoder(enc, encode, device_description(), pooling_of(enc))
