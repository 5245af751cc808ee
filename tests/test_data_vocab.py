"""mst5_jax.formats.vocab.default_vocab_path: MST5_VOCAB, cache keyed by sha256, clear errors."""
import hashlib
import logging

import numpy as np
import pytest
import sentencepiece as spm

from mst5_jax.formats import vocab


def _write_xnli(d, n=60):
    (d / "xnli").mkdir(parents=True)
    for lang, words in (("en", "the cat sat on a mat and then ran home"), ("fr", "le chat est assis sur un tapis")):
        w = words.split()
        with open(d / "xnli" / f"test-{lang}.tsv", "w", encoding="utf-8", newline="") as f:
            for i in range(n):
                f.write(f"{' '.join(w[i % 3:] + w[:i % 5])} {i}\t{' '.join(w[::-1][i % 4:])}\r\n")


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("MST5_VOCAB", "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model")
    assert vocab.default_vocab_path(tmp_path).startswith("gs://")


def test_no_data_and_no_env_names_both(monkeypatch, tmp_path):
    monkeypatch.delenv("MST5_VOCAB", raising=False)
    with pytest.raises(FileNotFoundError, match=r"MST5_VOCAB.*test-\*\.tsv"):
        vocab.default_vocab_path(tmp_path)


def test_builds_once_and_caches_by_content(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("MST5_VOCAB", raising=False)
    monkeypatch.setattr(vocab, "VOCAB_SIZE", 35)
    _write_xnli(tmp_path / "data")
    files = sorted((tmp_path / "data" / "xnli").glob("test-*.tsv"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    with caplog.at_level(logging.INFO):
        path = vocab.default_vocab_path(tmp_path / "data", cache_root=tmp_path / "cache")
    assert path == str(tmp_path / "cache" / f"{h.hexdigest()}-{vocab.RECIPE}" / "spiece.model")
    assert "training a 35-piece SentencePiece vocabulary" in caplog.text
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id(), sp.get_piece_size()) == (0, 1, 2, -1, 35)
    # Second call: cached, no training.
    monkeypatch.setattr(vocab, "train_sentencepiece", lambda *a, **k: pytest.fail("retrained"))
    assert vocab.default_vocab_path(tmp_path / "data", cache_root=tmp_path / "cache") == path
    # Changed data: a new key.
    with open(files[0], "a", encoding="utf-8") as f:
        f.write("one more line\tand its hypothesis\r\n")
    monkeypatch.undo()
    monkeypatch.delenv("MST5_VOCAB", raising=False)
    monkeypatch.setattr(vocab, "VOCAB_SIZE", 35)
    assert vocab.default_vocab_path(tmp_path / "data", cache_root=tmp_path / "cache") != path


def test_training_is_deterministic_and_the_sample_is_seeded(tmp_path):
    """Two builds from the same sentences give the same bytes (the demo's numbers depend on it)."""
    sentences = [f"sentence {i} {'abcdefgh'[i % 8] * (i % 5 + 1)} xnli {i * 7 % 13}" for i in range(400)]
    a = vocab.train_sentencepiece(sentences, tmp_path / "a" / "spiece.model", vocab_size=60)
    b = vocab.train_sentencepiece(list(sentences), tmp_path / "b" / "spiece.model", vocab_size=60)
    assert a.read_bytes() == b.read_bytes()
    sample = vocab.sample_sentences(sentences, size=100, seed=0)
    rng_pick = sorted(np.random.default_rng(0).choice(400, size=100, replace=False))
    assert sample == [sentences[i] for i in rng_pick]  # numpy's seeded choice, in input order
    assert vocab.sample_sentences(sentences, size=1000) == sentences
