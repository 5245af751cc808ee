"""XNLI and JSICK retrieval against brute-force numpy, plus hand-checked tiny cases."""
import numpy as np
import pytest

from mst5_jax.evals.hash_encoder import hash_encode
from mst5_jax.evals.retrieval import XNLI_LANGS, jsick_parallel, jsick_retrieval, load_xnli_premises, xnli_retrieval


def unit64(texts):
    e = hash_encode(texts).astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def brute_hits(q_texts, t_texts, gold_sets, q=None, t=None):
    """float64 cosine matrix, argmax per query, a hit if the retrieved text is gold."""
    q = unit64(q_texts) if q is None else q
    t = unit64(t_texts) if t is None else t
    best = (q @ t.T).argmax(axis=1)
    return sum(t_texts[j] in g for j, g in zip(best, gold_sets))


def test_xnli_retrieval_matches_brute_force(data_dir):
    calls = []

    def encode(sents):
        calls.append(len(sents))
        return hash_encode(sents)

    res = xnli_retrieval(encode, data_dir)
    assert calls == [830] * 15  # each language encoded once
    assert res["n_premises"] == 830 and res["langs"] == list(XNLI_LANGS)
    prem = {l: load_xnli_premises(data_dir, l)[0] for l in XNLI_LANGS}
    emb = {l: unit64(prem[l]) for l in XNLI_LANGS}
    for s in ("ar", "de", "en", "ur", "zh"):
        for t in XNLI_LANGS:
            ref = 100 * brute_hits(prem[s], prem[t], [{x} for x in prem[t]], emb[s], emb[t]) / 830
            assert res["matrix"][s][t] == pytest.approx(ref, abs=1e-9), (s, t)
    off = [res["matrix"][s][t] for s in XNLI_LANGS for t in XNLI_LANGS if s != t]
    assert len(off) == 210 and res["avg_all"] == pytest.approx(np.mean(off))
    assert len(res["xx2en"]) == 14
    assert res["avg_xx2en"] == pytest.approx(np.mean([res["matrix"][s]["en"] for s in XNLI_LANGS if s != "en"]))
    # ur has 829 distinct premise texts: retrieving either copy of the duplicate is a hit.
    assert len(set(prem["ur"])) == 829 and res["matrix"]["ur"]["ur"] == 100.0


def test_xnli_retrieval_subset_for_training_demo(data_dir):
    res = xnli_retrieval(hash_encode, data_dir, langs=["en", "de", "fr"], max_premises=50)
    assert res["n_premises"] == 50 and set(res["xx2en"]) == {"de", "fr"}
    prem = {l: load_xnli_premises(data_dir, l)[0][:50] for l in ("en", "de")}
    assert res["matrix"]["de"]["en"] == pytest.approx(2 * brute_hits(prem["de"], prem["en"], [{x} for x in prem["en"]]))
    no_en = xnli_retrieval(hash_encode, data_dir, langs=["de", "fr"], max_premises=10)
    assert no_en["avg_xx2en"] is None and no_en["xx2en"] == {}
    with pytest.raises(ValueError, match="unknown languages"):
        xnli_retrieval(hash_encode, data_dir, langs=["xx"])


def test_xnli_retrieval_hand_checked(tmp_path):
    d = tmp_path / "xnli"
    d.mkdir()
    # Two premises; in "fr" both translate to the same text, so any retrieval of it is a hit.
    rows = {"en": ["P one", "P two"], "fr": ["Q", "Q"], "de": ['"quoted"\tx', "R"]}
    for lang, prem in rows.items():
        with open(d / f"dev-{lang}.tsv", "w", encoding="utf-8", newline="") as f:
            for p in prem:
                cell = '"""quoted""\tx"' if p.startswith('"') else p  # csv.writer quoting
                f.write("".join(f"{cell}\thyp\t{lab}\r\n" for lab in ("entailment", "neutral", "contradiction")))
    table = {"P one": [1, 0], "P two": [0, 1], "Q": [1, 1], '"quoted"\tx': [0, 1], "R": [1, 0]}
    res = xnli_retrieval(lambda s: np.array([table[x] for x in s], np.float32), tmp_path, langs=["en", "fr", "de"])
    m = res["matrix"]
    assert m["fr"]["en"] == 50.0  # both queries tie: lowest index, "P one", right for the first only
    assert m["en"]["fr"] == 100.0  # any "Q" is a hit
    assert m["de"]["en"] == 0.0 and m["en"]["de"] == 0.0  # swapped
    assert res["xx2en"] == {"fr": 50.0, "de": 0.0} and res["avg_xx2en"] == 25.0


def test_jsick_retrieval_matches_brute_force(data_dir):
    res = jsick_retrieval(hash_encode, data_dir)
    en, ja, gold_ja, gold_en, _ = jsick_parallel(data_dir)
    assert (res["n_en"], res["n_ja"]) == (len(en), len(ja))
    assert res["en2ja"] == pytest.approx(100 * brute_hits(en, ja, gold_ja) / len(en), abs=1e-9)
    assert res["ja2en"] == pytest.approx(100 * brute_hits(ja, en, gold_en) / len(ja), abs=1e-9)


def test_jsick_retrieval_hand_checked(tmp_path):
    d = tmp_path / "jsick"
    d.mkdir()
    header = ["pair_ID", "sentence_A_En", "sentence_B_En", "sentence_A_Ja", "sentence_B_Ja", "relatedness_score_Ja"]
    rows = [["1", "dog", "cat", "犬", "猫", "3"], ["2", "dog", "puppy", "犬", "子犬", "4"],
            ["3", "dog", "cat", "ワンコ", "猫", "2"]]
    (d / "test.tsv").write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n", encoding="utf-8")
    # Gold: dog <-> {犬, ワンコ}, cat <-> 猫, puppy <-> 子犬 (many-to-many for dog).
    table = {"dog": [1, 0, 0], "cat": [0, 1, 0], "puppy": [0, 0, 1],
             "犬": [1, .2, 0], "猫": [0, 1, 0], "子犬": [1, 0, .1], "ワンコ": [1, 0, 0]}
    res = jsick_retrieval(lambda s: np.array([table[x] for x in s], np.float32), tmp_path)
    assert (res["n_en"], res["n_ja"]) == (3, 4)
    # dog -> ワンコ (a gold translation, not the first one), cat -> 猫, puppy -> 子犬: all hits.
    assert res["en2ja"] == 100.0
    # 犬 -> dog, 猫 -> cat, ワンコ -> dog hit; 子犬 -> dog (cos .995 > .0995) misses.
    assert res["ja2en"] == 75.0 and res["mean"] == 87.5
