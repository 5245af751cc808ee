"""SentenceEncoder: parity with HF PyTorch through the tokenizer, round trips, compiles, bad input."""
import math

import numpy as np
import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax.inference.encoder import MIN_ROWS, TOKENS_PER_SENTENCE, SentenceEncoder, batch_rows

SENTENCES = ["A man is playing a guitar.", "Un homme joue de la guitare.", "", "   ",
             "رجل يعزف على الجيتار", "x" * 3, "Ein Mann spielt Gitarre. " * 20]


def _hf_embed(model_dir, sentences, max_length=512):
    """Reference: AutoTokenizer ids + transformers MT5EncoderModel + masked mean, fp32."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.MT5EncoderModel.from_pretrained(str(model_dir)).float().eval()
    batch = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()


def test_encode_matches_hf_pytorch_end_to_end(tiny_hf_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    ours = enc.encode(SENTENCES, batch_size=3)
    ref = _hf_embed(tiny_hf_model_dir, SENTENCES)
    err = rel_err(ours, ref)
    print(f"SentenceEncoder vs HF PyTorch: rel_err={err:.2e}")
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), 32)
    assert err <= 1e-4
    single = enc.encode(SENTENCES[0])
    assert single.shape == (32,) and rel_err(single, ref[0]) <= 1e-4


def test_truncation_warns_once_and_matches_hf(tiny_hf_model_dir, caplog):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    with caplog.at_level("WARNING", logger="mst5_jax.inference.encoder"):
        ours = enc.encode(SENTENCES, max_length=8)
    assert caplog.text.count("truncated") == 1
    assert rel_err(ours, _hf_embed(tiny_hf_model_dir, SENTENCES, max_length=8)) <= 1e-4


def test_save_pretrained_round_trip(tiny_hf_model_dir, tmp_path):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    out = enc.save_pretrained(tmp_path / "saved")
    assert (out / "spiece.model").is_file() and (out / "config.json").is_file()
    again = SentenceEncoder.from_pretrained(out).encode(SENTENCES)
    np.testing.assert_array_equal(again, enc.encode(SENTENCES))
    assert rel_err(_hf_embed(out, SENTENCES), _hf_embed(tiny_hf_model_dir, SENTENCES)) == 0.0


def test_compiles_once_per_bucket_shape(tiny_hf_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "x"]
    sentences = [" ".join(rng.choice(words, size=n)) for n in range(1, 301, 3)]
    sentences += sentences[::-1]
    emb = enc.encode(sentences, batch_size=16, max_length=512)
    assert emb.shape == (200, 32)
    shapes = enc.compiled_shapes
    print("compiled shapes:", shapes)
    budget = 16 * TOKENS_PER_SENTENCE  # encode's default token budget for batch_size=16
    allowed = set(enc.batch_shapes(512, budget))
    assert len(shapes) == len(set(shapes)) and set(shapes) <= allowed
    assert all(rows * length <= budget for rows, length in allowed)
    assert batch_rows(16, budget) == 8 * batch_rows(128, budget) == 8 * 16  # short buckets take more
    # Stats: padding counted independently from the token lengths and the shapes run.
    stats = enc.last_stats
    real = sum(len(x) for x in enc.tokenize(sentences, 512))
    assert stats.sentences == 200 and stats.real_tokens == real and stats.truncated == 106
    assert stats.padded_tokens >= real and stats.padding_fraction == pytest.approx(1 - real / stats.padded_tokens)
    # Padding bound, from the token lengths alone: a sentence is padded to under 1.5x its length
    # (or 16), and each bucket pads fewer than MIN_ROWS rows of its longest length.
    lengths = [len(x) for x in enc.tokenize(sentences, 512)]
    per_sentence = sum(max(16, math.ceil(1.5 * n)) for n in lengths)
    assert stats.padded_tokens <= per_sentence + (MIN_ROWS - 1) * sum({max(16, math.ceil(1.5 * n)) for n in lengths})
    enc.encode(sentences[:37], batch_size=16, max_length=512)  # a partial batch: padded, no new shapes
    assert set(enc.compiled_shapes) <= allowed
    # Input order is kept although batches are sorted by length.
    np.testing.assert_array_equal(enc.encode(sentences[5:9], batch_size=16), emb[5:9])


def test_threads_share_one_encoder(tiny_hf_model_dir):
    """Concurrent calls (as a server makes) give the rows a single call gives."""
    from concurrent.futures import ThreadPoolExecutor

    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "x"]
    sentences = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 40, size=64)]
    ref = _hf_embed(tiny_hf_model_dir, sentences, max_length=16)
    chunks = [sentences[i::8] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda c: enc.encode(c, max_length=16, batch_size=4), chunks * 3))
    for k, part in enumerate(parts):
        assert rel_err(part, ref[k % 8::8]) <= 1e-4


def test_bad_input(tiny_hf_model_dir, tmp_path):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    assert enc.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="item 1 is int"):
        enc.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size=0"):
        enc.encode(["ok"], batch_size=0)
    from mst5_jax.formats.huggingface import CheckpointError

    with pytest.raises(CheckpointError, match="no such directory"):
        SentenceEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        SentenceEncoder.from_pretrained(tmp_path / "empty")


def test_quantized_precisions_match_sentence_transformers(tiny_hf_model_dir):
    from sentence_transformers.quantization import quantize_embeddings

    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    f32 = enc.encode(SENTENCES)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        ours = enc.encode(SENTENCES, precision=precision)
        ref = quantize_embeddings(f32, precision=precision)
        np.testing.assert_array_equal(ours, ref)
    normed = enc.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)
