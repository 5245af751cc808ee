"""Loaders on the real files: pair counts from ../shared/data/README.md, every format quirk,
and clear errors for missing files."""
import csv

import numpy as np
import pytest

from mst5_jax import evals
from mst5_jax.evals import sts
from mst5_jax.evals.bucc import read_bucc_corpus, read_bucc_gold
from mst5_jax.evals.data import read_lines, resolve_dataset_dir
from mst5_jax.evals.hash_encoder import hash_encode
from mst5_jax.evals.retrieval import XNLI_LANGS, jsick_parallel, load_xnli_premises

# (loader, split, count) exactly as in ../shared/data/README.md
COUNTS = [
    (sts.load_stsb_en, "train", 5749), (sts.load_stsb_en, "dev", 1500), (sts.load_stsb_en, "test", 1379),
    (sts.load_korsts, "train", 5749), (sts.load_korsts, "dev", 1500), (sts.load_korsts, "test", 1379),
    (sts.load_jsts, "train", 12451), (sts.load_jsts, "valid", 1457), (sts.load_jsts, "test", 1589),
    (sts.load_jsick, "test", 4927),  # train.tsv (5,000 rows) has no relatedness scores
    (sts.load_stsb_zh, "train", 5231), (sts.load_stsb_zh, "valid", 1458), (sts.load_stsb_zh, "test", 1361),
    (sts.load_lcqmc, "dev", 8802), (sts.load_lcqmc, "test", 12500),
    (sts.load_bq, "dev", 10000), (sts.load_bq, "test", 10000),
    (sts.load_atec, "dev", 10000), (sts.load_atec, "test", 10000),
]


@pytest.mark.parametrize("loader,split,count", COUNTS, ids=[f"{l.__name__}-{s}" for l, s, _ in COUNTS])
def test_pair_counts_match_readme(data_dir, loader, split, count):
    pairs, files = loader(data_dir, split)
    assert len(pairs) == len(pairs.s1) == len(pairs.s2) == count
    assert all(isinstance(g, float) and np.isfinite(g) for g in pairs.gold)
    for s in pairs.s1 + pairs.s2:
        assert "\r" not in s and "\n" not in s
    assert not pairs.s1[0].startswith("\ufeff")  # a file BOM is not text (LCQMC has one mid-file: kept)
    if loader in (sts.load_lcqmc, sts.load_bq, sts.load_atec):
        assert set(pairs.gold) == {0.0, 1.0}
    else:
        assert 0 <= min(pairs.gold) and max(pairs.gold) <= 5


@pytest.mark.parametrize("track", list(sts.STS17_TRACKS))
def test_sts17_tracks_verbatim(data_dir, track):
    pairs, (inp, gs) = sts.load_sts17_track(data_dir, track)
    assert len(pairs) == 250
    raw = inp.read_bytes().split(b"\n")
    for i in range(250):
        a, b = raw[i].decode("utf-8").split("\t")
        assert (pairs.s1[i], pairs.s2[i]) == (a, b)  # stray spaces kept
    assert pairs.gold == [float(x) for x in gs.read_text().split()]


def test_sts17_stray_spaces_survive(data_dir):
    pairs, _ = sts.load_sts17_track(data_dir, "ar-ar")
    assert sum(s != s.strip() for s in pairs.s1 + pairs.s2) >= 28


def test_sts17_track6_first_250_lines_equal_extended_en_tr(data_dir):
    pairs, (inp, _) = sts.load_sts17_track(data_dir, "tr-en")
    assert len(read_lines(inp)) == 500
    ext, _ = sts.load_sts17_extended(data_dir, "en-tr")
    assert (pairs.s1, pairs.s2, pairs.gold) == (ext.s1, ext.s2, ext.gold)


def test_sts17_extended_counts(data_dir):
    for pair in sts.STS17_EXTENDED:
        assert len(sts.load_sts17_extended(data_dir, pair)[0]) == 250


def test_stsb_extra_columns(data_dir):
    pairs, (path,) = sts.load_stsb_en(data_dir, "test")
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    long = [i for i, ln in enumerate(lines) if len(ln.split("\t")) > 7]
    assert len(long) == 284  # README: 284 test lines carry two extra fields
    for i in long[:20]:
        f = lines[i].split("\t")
        assert (pairs.s1[i], pairs.s2[i], pairs.gold[i]) == (f[5], f[6], float(f[4]))


def test_csv_quoting_bom_and_literal_quotes(data_dir):
    bq, (bq_path,) = sts.load_bq(data_dir, "test")
    assert bq_path.read_bytes().startswith(b"\xef\xbb\xbf")
    i = bq.s1.index("请问日息是多少？")
    assert bq.s2[i] == "如果我用22000,日利息多少"  # quoted field with a comma
    atec, _ = sts.load_atec(data_dir, "test")
    assert '"没有""花呗"' in atec.s1  # csv-escaped quotes decoded once
    kor, _ = sts.load_korsts(data_dir, "test")
    assert '"다이빙 금지"라고 적힌 수영장에 뛰어든 한 어린 소년.' in kor.s1  # QUOTE_NONE: kept verbatim


def test_jsick_train_has_rows_but_no_scores(data_dir):
    rows, (path,) = sts.read_jsick(data_dir, "train")
    assert len(rows) == 5000
    with pytest.raises(ValueError, match=r"train.tsv:2: expected a number"):
        sts.load_jsick(data_dir, "train")


def test_jsick_uses_japanese_columns(data_dir):
    pairs, (path,) = sts.load_jsick(data_dir, "test")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert pairs.s1 == [r["sentence_A_Ja"] for r in rows]
    assert pairs.gold == [float(r["relatedness_score_Ja"]) for r in rows]


def test_jsick_parallel_dedup(data_dir):
    en, ja, gold_ja, gold_en, _ = jsick_parallel(data_dir, "test")
    pairs, _ = sts.load_jsick(data_dir, "test")
    rows, _ = sts.read_jsick(data_dir, "test")
    all_pairs = {(r[f"sentence_{s}_En"], r[f"sentence_{s}_Ja"]) for r in rows for s in "AB"}
    assert set(en) == {e for e, _ in all_pairs} and set(ja) == {j for _, j in all_pairs}
    assert len(en) == len(set(en)) and len(ja) == len(set(ja))
    assert {(e, j) for e, js in zip(en, gold_ja) for j in js} == all_pairs
    assert {(e, j) for j, es in zip(ja, gold_en) for e in es} == all_pairs


@pytest.mark.parametrize("split,count", [("dev", 830), ("test", 1670)])
def test_xnli_premises(data_dir, split, count):
    en, _ = load_xnli_premises(data_dir, "en", split)
    assert len(en) == count
    for lang in XNLI_LANGS:
        prem, path = load_xnli_premises(data_dir, lang, split)
        assert len(prem) == count
        assert not any("\r" in p for p in prem)
    # csv.reader on a CRLF file (newline=''): same premises as a manual split of the rows.
    rows = [ln.split("\t") for ln in (data_dir / "xnli" / f"{split}-de.tsv").read_text(encoding="utf-8").split("\r\n")[:-1]]
    manual = [r[0] for r in rows[::3]]
    prem, _ = load_xnli_premises(data_dir, "de", split)
    unquoted = [i for i, m in enumerate(manual) if not m.startswith('"')]
    assert [prem[i] for i in unquoted] == [manual[i] for i in unquoted]


def test_bucc_counts(data_dir):
    folder = data_dir / "bucc2018"
    assert len(read_bucc_corpus(folder / "zh-en.dev.zh")[0]) == 8624
    assert len(read_bucc_corpus(folder / "zh-en.dev.en")[0]) == 13589
    assert len(read_bucc_gold(folder / "zh-en.dev.gold")) == 257
    for lang, n in (("de", 1038), ("fr", 929), ("ru", 2374)):
        assert len(read_bucc_gold(folder / f"{lang}-en.dev.gold")) == n


def test_read_lines_quirks(tmp_path):
    p = tmp_path / "f.txt"
    p.write_bytes("\ufeff a \r\nb\x85c\u2028d\t\r\n\r\nlast".encode("utf-8"))
    assert read_lines(p) == [" a ", "b\x85c\u2028d\t", "", "last"]


def test_data_dir_may_be_dataset_folder(data_dir):
    assert resolve_dataset_dir(data_dir, "chinese_sts/LCQMC", "test.txt") == data_dir / "chinese_sts" / "LCQMC"
    assert resolve_dataset_dir(data_dir / "chinese_sts", "chinese_sts/LCQMC", "test.txt") == data_dir / "chinese_sts" / "LCQMC"
    assert resolve_dataset_dir(data_dir / "tatoeba", "tatoeba", "tatoeba.afr-eng.afr") == data_dir / "tatoeba"
    r = evals.stsb_en(hash_encode, data_dir / "stsbenchmark")
    assert r["n"] == 1379


@pytest.mark.parametrize("task", list(evals.EVALUATORS))
def test_missing_files_name_the_paths_tried(tmp_path, task):
    with pytest.raises(FileNotFoundError) as e:
        evals.EVALUATORS[task](hash_encode, tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tried" in msg, msg
    assert msg.count(str(tmp_path)) >= 2, msg  # the data root and the dataset folder


def test_missing_file_inside_dataset_is_named(tmp_path, data_dir):
    d = tmp_path / "sts17" / "STS2017.gs"
    d.mkdir(parents=True)
    (d / "STS.gs.track5.en-en.txt").write_text("1.0\n")
    with pytest.raises(FileNotFoundError, match="STS.input.track1.ar-ar.txt"):
        evals.xsts(hash_encode, tmp_path)
