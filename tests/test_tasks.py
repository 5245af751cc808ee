"""Triplet construction and local sources (TF-free), checked against the raw XNLI files.

The reference parser below is deliberately independent of `tasks.sources`: it splits the
raw bytes on CRLF and tabs and undoes csv quoting by hand, and keys triplets by the
3-row block (line // 3), as docs/DATA.md describes the files.
"""
import collections
import csv
import json
import logging

import numpy as np
import pytest
import scipy.stats

import tasks
from tasks import registry, settings
from tasks.triplets import XNLI_LANGUAGES, cross_language_draws, pair_by_key

DOC_COUNTS = {"dev": 830, "test": 1670}  # docs/DATA.md: per language


@pytest.fixture(autouse=True)
def _fresh_settings():
    settings.reset()
    yield
    settings.reset()


def _unquote(field: str) -> str:
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def raw_xnli(data_dir, split, lang):
    """[(premise, hypothesis, label)] parsed by hand from the raw bytes."""
    raw = (data_dir / "xnli" / f"{split}-{lang}.tsv").read_bytes().decode("utf-8")
    lines = raw.split("\r\n")
    assert lines[-1] == ""
    rows = [[_unquote(f) for f in line.split("\t")] for line in lines[:-1]]
    n_cols = 3 if split == "dev" else 2
    assert all(len(r) == n_cols for r in rows), "a field holds a tab; the hand parser would be wrong"
    if split == "test":
        labels = (data_dir / "xnli" / "test-labels.txt").read_text().split("\n")[: len(rows)]
        rows = [(p, h, lab) for (p, h), lab in zip(rows, labels)]
    return [tuple(r) for r in rows]


def expected_blocks(en_rows, lang_rows):
    """{block: (entailment line, contradiction line)} for blocks usable in the language."""
    out = {}
    for b in range(len(en_rows) // 3):
        labels = {en_rows[i][2]: i for i in range(3 * b, 3 * b + 3)}
        if "entailment" in labels and "contradiction" in labels:
            e, c = labels["entailment"], labels["contradiction"]
            if all(lang_rows[i][0].strip() and lang_rows[i][1].strip() for i in (e, c)):
                out[b] = (e, c)
    return out


@pytest.mark.parametrize("split", ["dev", "test"])
def test_counts_and_sampled_contents_match_raw_files(data_dir, split):
    reg_split = "validation" if split == "dev" else "train"  # offline: test serves as train
    en = raw_xnli(data_dir, split, "en")
    rng = np.random.default_rng(0)
    counts = {}
    for lang in XNLI_LANGUAGES:
        raw = raw_xnli(data_dir, split, lang)
        blocks = expected_blocks(en, raw)
        got = registry.get_triplets(f"mst5_xnli_mono_{lang}", reg_split, data_dir)
        counts[lang] = len(got)
        assert len(got) == len(blocks) == DOC_COUNTS[split], lang
        assert [t.group_id for t in got] == sorted(blocks)
        for k in rng.choice(len(got), size=15, replace=False):
            t = got[k]
            e, c = blocks[t.group_id]
            assert (t.anchor, t.positive, t.negative) == (raw[e][0], raw[e][1], raw[c][1]), (lang, t.group_id)
    print(f"\n{split}: triplets per language {counts}")


def test_cross_lingual_recipe_exact_language_counts(data_dir):
    seed = 1234
    got = registry.get_triplets("mst5_xnli_cross", "validation", data_dir, seed=seed)
    raws = {lang: raw_xnli(data_dir, "dev", lang) for lang in XNLI_LANGUAGES}
    blocks = expected_blocks(raws["en"], raws["en"])
    L, T = len(XNLI_LANGUAGES), len(blocks)
    assert len(got) == T * L
    # The recipe: premise in each language a; positive and negative languages drawn
    # independently and uniformly per (English triplet, a).
    draws = np.random.default_rng(seed).integers(0, L, size=(T, L, 2))
    expected = collections.Counter((XNLI_LANGUAGES[a], XNLI_LANGUAGES[draws[t, a, 0]], XNLI_LANGUAGES[draws[t, a, 1]])
                                   for t in range(T) for a in range(L))
    observed = collections.Counter(t.langs for t in got)
    assert observed == expected
    # ... and the texts really are in those languages.
    for ex in got[:: 37]:
        e, c = blocks[ex.group_id]
        la, lp, ln = ex.langs
        assert (ex.anchor, ex.positive, ex.negative) == (raws[la][e][0], raws[lp][e][1], raws[ln][c][1])
    # Anchors: exactly T per language; positives/negatives uniform and independent.
    assert collections.Counter(t.langs[0] for t in got) == {lang: T for lang in XNLI_LANGUAGES}
    pos = collections.Counter(t.langs[1] for t in got)
    neg = collections.Counter(t.langs[2] for t in got)
    assert scipy.stats.chisquare([pos[x] for x in XNLI_LANGUAGES]).pvalue > 1e-3
    assert scipy.stats.chisquare([neg[x] for x in XNLI_LANGUAGES]).pvalue > 1e-3
    table = np.zeros((L, L))
    for t in got:
        table[XNLI_LANGUAGES.index(t.langs[1]), XNLI_LANGUAGES.index(t.langs[2])] += 1
    assert scipy.stats.chi2_contingency(table).pvalue > 1e-3
    print(f"\ncross (seed {seed}): {len(got)} examples; positive-language counts {dict(pos)}")
    assert got != registry.get_triplets("mst5_xnli_cross", "validation", data_dir, seed=seed + 1)
    np.testing.assert_array_equal(cross_language_draws(T, L, seed), draws)


def test_parallel_pairs_and_mixtures(data_dir):
    raws = {lang: raw_xnli(data_dir, "dev", lang) for lang in XNLI_LANGUAGES}
    got = registry.get_triplets("mst5_xnli_parallel", "validation", data_dir, seed=5)
    assert len(got) == 830 * len(XNLI_LANGUAGES)
    for ex in got[:: 53]:
        la, lb, ln = ex.langs
        assert la != lb == ln
        assert ex.anchor == raws[la][3 * ex.group_id][0] and ex.positive == raws[lb][3 * ex.group_id][0]
        assert ex.negative != ex.positive and ex.negative in {r[0] for r in raws[lb]}
    mono = registry.get_triplets("mst5_xnli_mono", "validation", data_dir)
    assert len(mono) == 830 * 15 and {t.group_id for t in mono} == set(range(830))  # translations share ids
    assert registry.get_triplets("mst5_nli_en_xnli", "validation", data_dir) == \
        registry.get_triplets("mst5_xnli_mono_en", "validation", data_dir)
    assert set(tasks.task_names()) >= {"mst5_xnli_cross", "mst5_xnli_mono", "mst5_nli_en", "mst5_nli_en_xnli",
                                       "mst5_msimcse_cross_all", "mst5_xnli_parallel",
                                       *(f"mst5_xnli_mono_{x}" for x in XNLI_LANGUAGES)}


def test_pairing_extra_rows_in_file_order():
    keys = ["a", "a", "a", "b", "a", "b", "c"]
    labels = ["entailment", "contradiction", "entailment", "contradiction", "contradiction", "neutral", "entailment"]
    index, stats = pair_by_key(keys, labels)
    assert index == [(0, 0, 1), (0, 2, 4)]
    assert (stats.extra_entailments, stats.extra_contradictions, stats.keys_without_triplet) == (1, 1, 2)


def _write_xtreme(d, rows_by_lang, split="dev"):
    (d / "xnli").mkdir(parents=True, exist_ok=True)
    for lang, rows in rows_by_lang.items():
        with open(d / "xnli" / f"{split}-{lang}.tsv", "wb") as f:
            for r in rows:
                f.write(r if isinstance(r, bytes) else r.encode("utf-8"))


def test_bad_rows_are_counted_and_an_all_bad_file_is_an_error(tmp_path, caplog):
    good = ["P{b}\tH{b}e\tentailment\r\n", "P{b}\tH{b}n\tneutral\r\n", "P{b}\tH{b}c\tcontradiction\r\n"]
    en = [g.format(b=b) for b in range(4) for g in good]
    fr = list(en)
    fr[0] = "P0\tmissing column\r\n"                 # line 1
    fr[5] = "P1\t\tcontradiction\r\n"                # line 6: empty text
    fr[6] = b"P2\tbroken \xff bytes\tentailment\r\n"  # line 7
    fr[9] = "P3\tH3e\tmaybe\r\n"                     # line 10: unknown label
    _write_xtreme(tmp_path, {"en": en, "fr": fr})
    from tasks import sources
    from tasks.triplets import mono_triplets
    with caplog.at_level(logging.WARNING):
        data = sources.read_xtreme_xnli(tmp_path, "dev", langs=("en", "fr"))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 of 12 rows" in msg and "[1]" in msg and "[6]" in msg and "[7]" in msg and "[10]" in msg
    assert len(mono_triplets(data, "en")) == 4 and len(mono_triplets(data, "fr")) == 0

    _write_xtreme(tmp_path / "allbad", {"en": ["only one column\r\n"] * 3})
    with pytest.raises(ValueError, match="every one of its 3 rows is unusable"):
        sources.read_xtreme_xnli(tmp_path / "allbad", "dev", langs=("en",))
    with pytest.raises(FileNotFoundError, match="dev-de.tsv"):
        sources.read_xtreme_xnli(tmp_path, "dev", langs=("en", "de"))


def test_xnli_mt_source_keys_by_english_premise(tmp_path, data_dir):
    """XNLI-MT-1.0 layout (not on hand): a synthetic 15-language file set."""
    d = tmp_path / "XNLI-MT-1.0" / "multinli"
    d.mkdir(parents=True)
    # English premise "A" appears in two non-contiguous runs; its pairs still join.
    en = [("A", "a-ent", "entailment"), ("B", "b-con", "contradictory"), ("A", "a-con", "contradictory"),
          ("B", "b-ent", "entailment"), ("C", "c-neu", "neutral")]
    for lang in XNLI_LANGUAGES:
        with open(d / f"multinli.train.{lang}.tsv", "w", encoding="utf-8") as f:
            f.write("premise\thypo\tlabel\n")
            for p, h, lab in en:
                f.write(f"{p}-{lang}\t{h}-{lang}\t{lab}\n")
    settings.configure(train_source="xnli_mt")
    got = registry.get_triplets("mst5_xnli_mono_de", "train", tmp_path)
    assert [(t.anchor, t.positive, t.negative, t.group_id) for t in got] == [
        ("A-de", "a-ent-de", "a-con-de", 0), ("B-de", "b-ent-de", "b-con-de", 1)]
    # Validation under xnli_mt is the local XNLI dev set (here: absent -> names the paths).
    with pytest.raises(FileNotFoundError, match="dev-ar.tsv"):
        registry.get_triplets("mst5_xnli_mono_de", "validation", tmp_path)
    (d / "multinli.train.sw.tsv").unlink()
    sources_mod = __import__("tasks.sources", fromlist=["x"])
    sources_mod._read_xnli_mt_cached.cache_clear()
    with pytest.raises(FileNotFoundError, match="multinli.train.sw.tsv"):
        registry.get_triplets("mst5_xnli_mono_de", "train", tmp_path)


def test_xnli1_jsonl_and_english_nli_sources(tmp_path, monkeypatch):
    d = tmp_path / "XNLI-1.0"
    d.mkdir()
    with open(d / "xnli.dev.jsonl", "w", encoding="utf-8") as f:
        for pid, (h, lab) in enumerate([("e", "entailment"), ("n", "neutral"), ("c", "contradiction")]):
            for lang in XNLI_LANGUAGES:
                f.write(json.dumps({"pairID": str(pid), "language": lang, "sentence1": f"P-{lang}",
                                    "sentence2": f"{h}-{lang}", "gold_label": lab}) + "\n")
    settings.configure(train_source="xnli1_local")
    got = registry.get_triplets("mst5_xnli_mono_th", "validation", tmp_path)
    assert [(t.anchor, t.positive, t.negative) for t in got] == [("P-th", "e-th", "c-th")]

    # mst5_nli_en from local SNLI/MNLI files; a missing one is named.
    settings.configure(nli_en_source="local")
    with pytest.raises(FileNotFoundError, match="snli_1.0_train.jsonl"):
        registry.get_triplets("mst5_nli_en", "train", tmp_path)
    for sub, name in (("snli", "snli_1.0_train.jsonl"), ("multinli", "multinli_1.0_train.jsonl")):
        (tmp_path / sub).mkdir()
        with open(tmp_path / sub / name, "w") as f:
            for h, lab in (("x", "entailment"), ("y", "contradiction"), ("z", "-")):
                f.write(json.dumps({"sentence1": f"{sub} P", "sentence2": f"{sub} {h}", "gold_label": lab}) + "\n")
    got = registry.get_triplets("mst5_nli_en", "train", tmp_path)
    assert [(t.anchor, t.positive, t.negative, t.group_id) for t in got] == [
        ("snli P", "snli x", "snli y", 0), ("multinli P", "multinli x", "multinli y", 1)]
    # TFDS chosen but not installed: the error names the source and the alternatives.
    settings.configure(nli_en_source="tfds")
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
    with pytest.raises(FileNotFoundError, match=r"TFDS 'snli'.*mst5_nli_en_xnli"):
        registry.get_triplets("mst5_nli_en", "train", tmp_path)


def test_user_registered_task(tmp_path):
    """The docs/DATA.md snippet, verbatim in spirit: a tsv of premise/hypothesis/label."""
    path = tmp_path / "my_nli" / "train.tsv"
    path.parent.mkdir()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sentence1", "sentence2", "gold_label"])
        w.writerows([["Ein Hund rennt.", "Ein Tier bewegt sich.", "entailment"],
                     ["Ein Hund rennt.", "Eine Katze schläft.", "contradiction"],
                     ["Es regnet.", "Das Wetter ist nass.", "entailment"]])

    def build(split, data_dir, seed):
        rows = tasks.read_nli_file(data_dir / "my_nli" / f"{split}.tsv")
        return tasks.triplets_from_rows(rows)[0]

    tasks.register_triplet_task("my_nli_test_task", build, splits=("train",))
    try:
        got = tasks.get_triplets("my_nli_test_task", "train", tmp_path)
        assert [(t.anchor, t.positive, t.negative) for t in got] == [
            ("Ein Hund rennt.", "Ein Tier bewegt sich.", "Eine Katze schläft.")]
        with pytest.raises(ValueError, match="already registered"):
            tasks.register_triplet_task("my_nli_test_task", build)
        if tasks.SEQIO_REGISTERED:  # mirrored into seqio as well
            import seqio
            assert "my_nli_test_task" in seqio.TaskRegistry.names()
            seqio.TaskRegistry.remove("my_nli_test_task")
    finally:
        registry.TASKS.pop("my_nli_test_task", None)


def test_tasks_import_and_numpy_path_without_tensorflow(data_dir):
    """The GPU image has no TF/seqio/gin: `import tasks` must still work, TF-free."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'seqio', 'tensorflow_datasets', 'tensorflow_text', 'gin', 'torch', 'transformers'):\n"
        "    sys.modules[m] = None\n"
        "import tasks, mst5_jax.formats.tokenizer, mst5_jax.formats.vocab, tasks.pipeline\n"
        "assert not tasks.SEQIO_REGISTERED\n"
        f"print(len(tasks.get_triplets('mst5_xnli_mono_fr', 'validation', {str(data_dir)!r})))\n"
        "assert not any(m in sys.modules and sys.modules[m] is not None for m in ('tensorflow', 'seqio', 'torch'))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MST5_NO_SEQIO"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "830"
