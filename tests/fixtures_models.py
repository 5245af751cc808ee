"""Shared tiny models for tests: random HF T5/mT5 encoders with a real SentencePiece vocabulary.

Import the fixtures into a test module with

    from fixtures_models import tiny_hf_model_dir, tiny_t5_model_dir  # noqa: F401

(`tests/` is on sys.path under pytest's rootdir conftest). Everything is built with
`transformers`/`torch` and `sentencepiece` only, never with mst5_jax, so the models are
independent references. They are cached under the `cache_dir` fixture, keyed by every
input, and written atomically (build in a temporary folder, then rename), so concurrent
test runs share them safely.

- `tiny_hf_model_dir`: a random 2-layer `MT5EncoderModel` (gated-GELU, d_model 32, 4 heads
  of 8, d_ff 64) with a 300-piece SentencePiece vocabulary trained on STS17 text, holding
  `config.json`, `model.safetensors`, `spiece.model` and a `tokenizer.json` made by
  transformers' own conversion (`T5Tokenizer(extra_ids=0)`), so AutoTokenizer and this
  project's tokenizer see the same vocabulary.
- `tiny_t5_model_dir`: the same, as a T5 v1.0 `T5EncoderModel` (ReLU feed-forward, the
  architecture of the released sentence-t5-* checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

TINY = dict(vocab_size=300, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2)
VOCAB_SOURCES = ("en-en", "es-es", "ar-ar", "en-tr", "en-de", "fr-en")


def _key(**parts) -> str:
    import tokenizers
    import transformers

    parts = dict(parts, transformers=transformers.__version__, tokenizers=tokenizers.__version__)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_tiny_model_dir(out: pathlib.Path, data_dir: pathlib.Path, *, model_type: str = "mt5",
                         feed_forward_proj: str = "gated-gelu", seed: int = 0) -> pathlib.Path:
    """Writes a random tiny HF encoder directory (weights, config, spiece.model, tokenizer.json)."""
    from hf_reference import hf_config, random_encoder, save_hf_dir
    from transformers import T5Tokenizer

    from mst5_jax.formats.vocab import train_sentencepiece
    from mst5_jax.utils.files import distinct_texts

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [data_dir / "sts17" / "STS2017-extended" / f"STS.{p}.txt" for p in VOCAB_SOURCES]
    train_sentencepiece(distinct_texts(files), out / "spiece.model", vocab_size=TINY["vocab_size"])
    config = hf_config(model_type=model_type, feed_forward_proj=feed_forward_proj, **TINY)
    save_hf_dir(random_encoder(config, seed=seed), out)
    tok = T5Tokenizer.from_pretrained(str(out), extra_ids=0)
    tok.save_pretrained(str(out))
    return out


def cached_tiny_model_dir(cache_dir: pathlib.Path, data_dir: pathlib.Path, **kw) -> pathlib.Path:
    """`build_tiny_model_dir` under `cache_dir/tiny_models/<key>`, built once."""
    key = _key(**TINY, sources=VOCAB_SOURCES, **kw)
    final = cache_dir / "tiny_models" / key
    if (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
    try:
        build_tiny_model_dir(tmp, data_dir, **kw)
        try:
            os.replace(tmp, final)
        except OSError:  # another run won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tiny_hf_model_dir(cache_dir, data_dir) -> pathlib.Path:
    """Random tiny mT5 encoder (gated-GELU) in HF format; see the module docstring."""
    return cached_tiny_model_dir(cache_dir, data_dir, model_type="mt5", feed_forward_proj="gated-gelu")


@pytest.fixture(scope="session")
def tiny_t5_model_dir(cache_dir, data_dir) -> pathlib.Path:
    """Random tiny T5 v1.0 encoder (ReLU) in HF format; see the module docstring."""
    return cached_tiny_model_dir(cache_dir, data_dir, model_type="t5", feed_forward_proj="relu")
