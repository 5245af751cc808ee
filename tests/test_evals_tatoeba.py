"""Tatoeba accuracy on all 112 real languages against a row-by-row numpy argmax."""
import pathlib

import numpy as np
import pytest

from mst5_jax.evals.hash_encoder import hash_encode
from mst5_jax.evals.tatoeba import LANGS_112, TATOEBA14, TATOEBA36, tatoeba


def raw_lines(path):
    """Independent reader: bytes -> text, split on b'\\n' only, drop one trailing '\\r'."""
    data = path.read_bytes().decode("utf-8")
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln.removesuffix("\r") for ln in lines]


def row_by_row_accuracy(q, t):
    """Percent of rows i with argmax_j cos(q_i, t_j) == i, one query at a time.

    Cosine as defined by the project: float32 L2 normalisation, float32 dot (accumulated
    exactly, then rounded to float32); np.argmax takes the first maximum.
    """
    qn = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.float32(1e-12))).astype(np.float32)
    tn = (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), np.float32(1e-12))).astype(np.float32)
    t64 = tn.astype(np.float64)
    hits = 0
    for i in range(len(qn)):
        sims = (t64 @ qn[i].astype(np.float64)).astype(np.float32)
        hits += int(np.argmax(sims)) == i
    return 100 * hits / len(qn)


@pytest.fixture(scope="module")
def tatoeba_hash(data_dir):
    return tatoeba(hash_encode, data_dir, max_length=32, batch_size=8, device="cpu")


def test_tatoeba_matches_row_by_row_argmax_on_all_112(tatoeba_hash, data_dir):
    res = tatoeba_hash
    assert list(res["per_lang"]) == list(LANGS_112) and res["langs_missing"] == []
    folder = data_dir / "tatoeba"
    total = 0
    for lang in LANGS_112:
        xx = raw_lines(folder / f"tatoeba.{lang}-eng.{lang}")
        en = raw_lines(folder / f"tatoeba.{lang}-eng.eng")
        ex, ee = hash_encode(xx), hash_encode(en)
        got = res["per_lang"][lang]
        assert got["n"] == len(xx) == len(en)
        assert got["xx2en"] == pytest.approx(row_by_row_accuracy(ex, ee), abs=1e-9), lang
        assert got["en2xx"] == pytest.approx(row_by_row_accuracy(ee, ex), abs=1e-9), lang
        assert got["mean"] == pytest.approx((got["xx2en"] + got["en2xx"]) / 2)
        total += len(xx)
    assert total == 88_877  # README count
    for name, group in (("tatoeba14", TATOEBA14), ("tatoeba36", TATOEBA36), ("all", LANGS_112)):
        want = np.mean([res["per_lang"][l]["mean"] for l in group])
        assert res["avg"][name] == pytest.approx(want) and res["avg_present"][name] == pytest.approx(want)
    assert len(TATOEBA14) == 14 and len(set(TATOEBA36)) == 36 and len(set(LANGS_112)) == 112
    # The hash encoder is a floor, not a model, but it is not trivial either.
    assert 1 < res["avg"]["all"] < 50


def test_tatoeba_meta(tatoeba_hash, data_dir):
    meta = tatoeba_hash["meta"]
    assert len(meta["data_files"]) == 224
    assert meta["max_length"] == 32 and meta["batch_size"] == 8 and meta["device"] == "cpu"
    sums = dict(line.split("  ")[::-1] for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line)
    for f in meta["data_files"][:6]:
        rel = str(pathlib.Path(f["path"]).relative_to(data_dir.resolve()))
        assert sums[rel] == f["sha256"]
    assert {"python", "numpy"} <= set(meta["versions"]) and meta["date"]


def test_tatoeba_hand_checked_and_partial_averages(tmp_path):
    d = tmp_path / "tatoeba"
    d.mkdir()
    # deu: line 2 duplicates line 1 in both files -> ties go to line 1, so line 2 misses.
    (d / "tatoeba.deu-eng.deu").write_text("a\nb\nb\n", encoding="utf-8")
    (d / "tatoeba.deu-eng.eng").write_text("A\nB\nB\n", encoding="utf-8")
    (d / "tatoeba.afr-eng.afr").write_text("x\r\ny\r\n", encoding="utf-8")  # CRLF
    (d / "tatoeba.afr-eng.eng").write_text("X\nY", encoding="utf-8")  # no final newline
    table = {"a": [1, 0], "A": [1, 0.1], "b": [0, 1], "B": [0.1, 1], "x": [1, 1], "X": [1, 1], "y": [1, -1], "Y": [1, -1]}
    seen = []

    def encode(sents):
        seen.extend(sents)
        return np.array([table[s] for s in sents], np.float32)

    res = tatoeba(encode, tmp_path, langs=["deu", "afr", "fra"])
    assert set(seen) == set(table)  # CR stripped, nothing else
    assert res["per_lang"]["deu"]["xx2en"] == pytest.approx(200 / 3)
    assert res["per_lang"]["deu"]["en2xx"] == pytest.approx(200 / 3)
    assert res["per_lang"]["afr"]["mean"] == 100.0
    assert res["langs_missing"] == ["fra"] and res["langs_evaluated"] == ["deu", "afr"]
    assert res["avg"] == {"tatoeba14": None, "tatoeba36": None, "all": None}
    assert res["avg_present"]["tatoeba14"] == pytest.approx(200 / 3)  # only deu is in the 14
    assert res["avg_present"]["tatoeba36"] == pytest.approx((200 / 3 + 100) / 2)
    assert res["meta"]["max_length"] is None and res["meta"]["device"] is None


def test_tatoeba_missing_folder_names_both_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        tatoeba(hash_encode, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "tatoeba" / "tatoeba.afr-eng.afr") in msg and str(tmp_path / "tatoeba.afr-eng.afr") in msg
