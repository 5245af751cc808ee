"""A deterministic, weight-free sentence encoder for tests: hashed character n-grams.

Each sentence is wrapped in boundary marks (U+0002 ... U+0003); every character 1-, 2-
and 3-gram is hashed (FNV-1a over Unicode code points, then MurmurHash3's finaliser, in
wrapping uint64 arithmetic) into one of ``dim`` buckets with a +1/-1 sign taken from another hash bit.
The embedding is the float32 vector of signed bucket counts. Same input, same output on
any machine, and sentences sharing surface strings (names, numbers, cognates) land close
together, so retrieval and STS scores are non-trivial without any model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads every input bit over every output bit."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def hash_encode(sentences: Sequence[str], dim: int = 256, ngrams: Sequence[int] = (1, 2, 3)) -> np.ndarray:
    """Embed sentences as signed hashed character n-gram counts.

    Args:
      sentences: n strings.
      dim: embedding width.
      ngrams: n-gram lengths to count.
    Returns:
      float32 [n, dim].
    """
    n = len(sentences)
    out = np.zeros((n, dim), np.float64)
    if n == 0:
        return out.astype(np.float32)
    texts = ["\x02" + s + "\x03" for s in sentences]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    sent = np.repeat(np.arange(n, dtype=np.int64), lengths)
    pos = np.arange(len(codes), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    for g in ngrams:
        m = len(codes) - g + 1
        if m <= 0:
            continue
        valid = pos[:m] + g <= lengths[sent[:m]]
        h = np.full(m, _FNV_OFFSET ^ np.uint64(g), dtype=np.uint64)
        for o in range(g):
            h = (h ^ codes[o : o + m]) * _FNV_PRIME
        h = _fmix64(h[valid])
        bucket = ((h >> np.uint64(32)) % np.uint64(dim)).astype(np.int64)
        sign = ((h >> np.uint64(17)) & np.uint64(1)).astype(np.float64) * 2 - 1
        out += np.bincount(sent[:m][valid] * dim + bucket, weights=sign, minlength=n * dim).reshape(n, dim)
    return out.astype(np.float32)


class HashEncoder:
    """`hash_encode` behind the `SentenceEncoder.encode` signature (batch_size/max_length ignored)."""

    def __init__(self, dim: int = 256, ngrams: Sequence[int] = (1, 2, 3)):
        self.dim = dim
        self.ngrams = tuple(ngrams)

    def encode(self, sentences: Sequence[str], batch_size: int | None = None, max_length: int | None = None, **_) -> np.ndarray:
        return hash_encode(list(sentences), self.dim, self.ngrams)

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        return self.encode(sentences)
