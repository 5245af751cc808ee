"""mst5_jax.evals.mteb_adapter under real mteb 2: mteb's own task classes and evaluators, local data.

Each task subclasses mteb's `AbsTaskSTS` / `AbsTaskBitextMining` with a `TaskMetadata`
and a `load_data` that reads the files under the data dir (read here with plain Python,
independently of `mst5_jax.evals`' loaders) into `datasets` objects, so mteb never
calls `datasets.load_dataset`. It runs through `mteb.evaluate(MTEBEncoder(...), ...)`
with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and every socket connect refused and
recorded; no result cache is written. The scores are compared with `mst5_jax.evals`
(`xsts`, `tatoeba`, the BUCC readers and `mining.top1`) on the same data and the same
embeddings. `HashEncoder` keeps the full files fast; the tiny random mT5 encoder runs
one STS subset through mteb against an HF PyTorch reference.

What is comparable, and the tolerance of each comparison:
- STS: mteb's `cosine_spearman` is scipy's Spearman of sklearn's `1 -
  paired_cosine_distances`, which for float32 embeddings stays float32 and computes
  1 - |a/|a| - b/|b||^2 / 2 (min-max normalised gold: a monotone map, ranks unchanged).
  Ours is the Spearman of the float32 dot of unit rows. Both round at ~1e-7, and
  cosines that close can swap or merge into ties: with the hashed n-gram encoder, whose
  near-duplicate pairs crowd cosines near 1, ar-ar has 245 distinct mteb cosines, 247
  of ours and 247 exact (float64) ones, and the scores differ by 0.011 (x 100). Hence
  |mteb `cosine_spearman` x 100 - ours| <= STS_TOL = 0.05. The rank-correlation step
  alone is exact: our `spearman` on mteb's own cosines equals mteb's score to 1e-9.
- STS `spearman` (mteb's score with the model's own `similarity_pairwise`, which the
  adapter implements with our `mining.paired_cosine`) equals ours to 1e-9.
- Bitext (Tatoeba, BUCC accuracy): mteb's `accuracy` is top-1 over
  `model.similarity` (the adapter's: our `mining.cosine_matrix`) taken with `torch.topk`, which
  does not promise the lowest index on ties; ours breaks ties to the lowest index
  (LASER). The scores may differ only on queries whose best cosine is tied: the
  tolerance is 100 x (tied queries) / n, counted by brute-force numpy. Beyond the
  accuracy, mteb's saved top-1 predictions must equal `mining.top1`'s on every untied
  query, and its top-1 similarity our best cosine to 1e-6.
- mteb's bitext `f1`/`precision`/`recall` (its main score) are sklearn's class-weighted
  scores with every gold target as a class: no mst5_jax counterpart; not compared.
- BUCC: mteb (the superseded `BUCC` task, whose loader this mirrors) takes only the
  source sentences that are in the gold, retrieves each one's cosine top-1 among all
  English sentences and scores accuracy against the gold target. Ours mines every
  source sentence with margin-ratio scoring (k=4), then a tuned threshold and F1: a
  different quantity. Compared: mteb's accuracy against the same accuracy computed from
  `mst5_jax.evals.bucc`'s readers and `mining.top1` on the same embeddings.
"""
import json
import socket

import datasets
import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics.pairwise import paired_cosine_distances

import mteb
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax.evals import HashEncoder, tatoeba, xsts
from mst5_jax.evals.bucc import read_bucc_corpus, read_bucc_gold
from mst5_jax.evals.metrics import spearman
from mst5_jax.evals.mining import cosine_matrix, l2_normalize, top1
from mst5_jax.evals.mteb_adapter import MTEBEncoder
from mst5_jax.evals.sts import Pairs, pair_spearman
from mst5_jax.inference.encoder import SentenceEncoder

STS_TOL = 0.05  # Spearman x 100; float32 cosine rounding, see the docstring
STS17_TRACKS = {  # subset -> (file track id, language pair in the file name)
    "ar-ar": ("1", "ar-ar"), "ar-en": ("2", "ar-en"), "es-es": ("3", "es-es"), "es-en": ("4a", "es-en"),
    "es-en-wmt": ("4b", "es-en"), "en-en": ("5", "en-en"), "tr-en": ("6", "tr-en"),
}
STS17_EXTENDED = ("en-de", "fr-en", "it-en", "nl-en")
TATOEBA_LANGS = {"deu": "deu-Latn", "cmn": "cmn-Hans"}
_LANG_SCRIPT = {"ar": "ara-Arab", "en": "eng-Latn", "es": "spa-Latn", "tr": "tur-Latn", "de": "deu-Latn",
                "fr": "fra-Latn", "it": "ita-Latn", "nl": "nld-Latn"}


def _lines(path) -> list[str]:
    """The file's lines without line endings (a final newline does not start a line)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _metadata(name: str, task_type: str, eval_langs: dict, main_score: str) -> TaskMetadata:
    return TaskMetadata(
        name=name, dataset={"path": f"local/{name}", "revision": "local"},
        description=f"{name} read from the local data dir (tests/test_mteb_adapter.py).",
        type=task_type, category="t2t", modalities=["text"], eval_splits=["test"],
        eval_langs=eval_langs, main_score=main_score,
    )


def _sts17_pairs(folder, subset: str):
    """(s1, s2, gold) of a track or an extended pair, read directly from the files."""
    if subset in STS17_TRACKS:
        num, lp = STS17_TRACKS[subset]
        gold = [float(x) for x in _lines(folder / "STS2017.gs" / f"STS.gs.track{num}.{lp}.txt")]
        rows = [l.split("\t") for l in _lines(folder / "STS2017.eval.v1.1" / f"STS.input.track{num}.{lp}.txt")]
        rows = rows[: len(gold)]  # track 6 ships 500 input lines; the gold scores the first 250
    else:
        rows = [l.split("\t") for l in _lines(folder / "STS2017-extended" / f"STS.{subset}.txt")]
        gold = [float(r[2]) for r in rows]
    return [r[0] for r in rows], [r[1] for r in rows], gold


def make_sts17_task(folder, subsets):
    langs = {s: [_LANG_SCRIPT[s[:2]], _LANG_SCRIPT[s[3:5]]] for s in subsets}

    class LocalSTS17(AbsTaskSTS):
        metadata = _metadata("LocalSTS17", "STS", langs, "cosine_spearman")

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {}
            for s in self.hf_subsets:
                s1, s2, gold = _sts17_pairs(folder, s)
                ds = datasets.Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": gold})
                self.dataset[s] = datasets.DatasetDict({"test": ds})
            self.data_loaded = True

    return LocalSTS17()


def make_tatoeba_task(folder):
    """Subsets "xxx-eng" (xx queries, English targets) and "eng-xxx" (the reverse)."""
    langs = {}
    for code, script in TATOEBA_LANGS.items():
        langs[f"{code}-eng"] = [script, "eng-Latn"]
        langs[f"eng-{code}"] = ["eng-Latn", script]

    class LocalTatoeba(AbsTaskBitextMining):
        metadata = _metadata("LocalTatoeba", "BitextMining", langs, "f1")

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {}
            for s in self.hf_subsets:
                code = s[:3] if s.endswith("-eng") else s[4:]
                xx = _lines(folder / f"tatoeba.{code}-eng.{code}")
                en = _lines(folder / f"tatoeba.{code}-eng.eng")
                s1, s2 = (xx, en) if s.endswith("-eng") else (en, xx)
                self.dataset[s] = datasets.DatasetDict(
                    {"test": datasets.Dataset.from_dict({"sentence1": s1, "sentence2": s2})})
            self.data_loaded = True

    return LocalTatoeba()


def make_bucc_task(folder):
    """mteb's BUCC layout: gold source sentences vs every English sentence, gold target index."""

    class LocalBUCC(AbsTaskBitextMining):
        metadata = _metadata("LocalBUCC", "BitextMining", {"zh-en": ["cmn-Hans", "eng-Latn"]}, "f1")

        def load_data(self, num_proc=None, **kwargs):
            zh = dict(l.split("\t", 1) for l in _lines(folder / "zh-en.dev.zh"))
            en_rows = [l.split("\t", 1) for l in _lines(folder / "zh-en.dev.en")]
            en_index = {i: n for n, (i, _) in enumerate(en_rows)}
            gold = sorted(tuple(l.split("\t")) for l in _lines(folder / "zh-en.dev.gold"))
            # A plain dict, as mteb's own BUCC.dataset_transform leaves it: the two sides differ in length.
            self.dataset = {"zh-en": {"test": {
                "sentence1": [zh[z] for z, _ in gold],
                "sentence2": [t for _, t in en_rows],
                "gold": [(q, en_index[e]) for q, (_, e) in enumerate(gold)],
            }}}
            self.data_loaded = True

    return LocalBUCC()


@pytest.fixture(scope="module")
def offline():
    """HF offline mode plus a socket guard: every connect attempt is recorded and refused."""
    import huggingface_hub.constants

    attempts = []

    def refuse(sock, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"tests/test_mteb_adapter.py: network access to {address} during an offline mteb run")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield attempts


def run_mteb(model, task, offline, prediction_folder=None) -> dict:
    """{hf_subset: mteb's score dict} for one task, run by `mteb.evaluate` with no result cache.

    With `prediction_folder`, mteb also writes its raw predictions there (for bitext
    mining: each query's top-1 {"corpus_id", "score"}); `mteb_predictions` reads them.
    """
    res = mteb.evaluate(model, [task], cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 256},
                        prediction_folder=prediction_folder)
    assert not res.exceptions, res.exceptions
    assert offline == [], f"mteb tried to reach the network: {offline}"
    [task_result] = res.task_results
    assert res.model_name == model.name
    return {s["hf_subset"]: s for s in task_result.scores["test"]}


def mteb_predictions(prediction_folder, task, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """mteb's bitext top-1 (corpus index [n] int, similarity [n] float) for one subset."""
    with open(task._predictions_path(prediction_folder), encoding="utf-8") as f:
        hits = json.load(f)[subset]["test"]["sentence1-sentence2"]
    return np.array([h["corpus_id"] for h in hits]), np.array([h["score"] for h in hits])


def check_same_top1(mteb_pred, mteb_score, query: np.ndarray, target: np.ndarray, what: str) -> int:
    """mteb's top-1 equals `mining.top1` of our embeddings except on tied queries; returns the tie count.

    The best cosine itself agrees on every query (1e-6: mteb stores it as a Python float).
    """
    sim = cosine_matrix(l2_normalize(query), l2_normalize(target))
    ours = top1(l2_normalize(query), l2_normalize(target))
    tied = (sim == sim.max(axis=1, keepdims=True)).sum(axis=1) > 1
    differ = np.flatnonzero(mteb_pred != ours)
    assert not np.any(~tied[differ]), f"{what}: untied queries {differ[~tied[differ]][:10]} differ"
    np.testing.assert_allclose(mteb_score, sim.max(axis=1), atol=1e-6, err_msg=what)
    return int(tied.sum())


def test_sts17_mteb_equals_xsts(data_dir, offline):
    hash_enc = HashEncoder()
    folder = data_dir / "sts17"
    subsets = list(STS17_TRACKS) + list(STS17_EXTENDED)
    got = run_mteb(MTEBEncoder(hash_enc, name="mst5_jax/hash256"), make_sts17_task(folder, subsets), offline)
    ours = xsts(hash_enc, data_dir)
    ours_all = {**ours["per_track"], **ours["extended"]}
    assert sorted(got) == sorted(ours_all)
    for s in subsets:
        # mteb's `spearman` uses the model's similarity_pairwise, which is our paired cosine: exact.
        assert got[s]["spearman"] * 100 == pytest.approx(ours_all[s], abs=1e-9), s
        assert got[s]["cosine_spearman"] * 100 == pytest.approx(ours_all[s], abs=STS_TOL), s
        assert got[s]["main_score"] == got[s]["cosine_spearman"]
        # The correlation step alone, on mteb's own cosines of the same embeddings: exact.
        s1, s2, gold = _sts17_pairs(folder, s)
        mteb_cos = 1 - paired_cosine_distances(hash_enc.encode(s1), hash_enc.encode(s2))
        assert spearman(mteb_cos, gold) == pytest.approx(got[s]["cosine_spearman"] * 100, abs=1e-9), s
    # Not a degenerate comparison: the hashed n-grams correlate with the gold on en-en.
    assert ours_all["en-en"] > 30


@pytest.fixture(scope="module")
def tatoeba_runs(data_dir, offline, tmp_path_factory):
    hash_enc = HashEncoder()
    task = make_tatoeba_task(data_dir / "tatoeba")
    pred_dir = tmp_path_factory.mktemp("mteb_tatoeba")
    got = run_mteb(MTEBEncoder(hash_enc, name="mst5_jax/hash256"), task, offline, pred_dir)
    ours = tatoeba(hash_enc, data_dir, langs=sorted(TATOEBA_LANGS))
    return got, ours, hash_enc, task, pred_dir


@pytest.mark.parametrize("lang", sorted(TATOEBA_LANGS))
def test_tatoeba_mteb_accuracy_equals_ours(data_dir, tatoeba_runs, lang):
    got, ours, hash_enc, task, pred_dir = tatoeba_runs
    folder = data_dir / "tatoeba"
    xx = hash_enc.encode(_lines(folder / f"tatoeba.{lang}-eng.{lang}"))
    en = hash_enc.encode(_lines(folder / f"tatoeba.{lang}-eng.eng"))
    n = len(xx)
    assert ours["per_lang"][lang]["n"] == n
    for subset, key, (q, t) in ((f"{lang}-eng", "xx2en", (xx, en)), (f"eng-{lang}", "en2xx", (en, xx))):
        n_tied = check_same_top1(*mteb_predictions(pred_dir, task, subset), q, t, subset)
        tol = 100 * n_tied / n
        assert abs(got[subset]["accuracy"] * 100 - ours["per_lang"][lang][key]) <= tol + 1e-9, (subset, tol)


def test_bucc_mteb_accuracy_equals_top1_of_ours(data_dir, offline, tmp_path):
    hash_enc = HashEncoder()
    folder = data_dir / "bucc2018"
    task = make_bucc_task(folder)
    got = run_mteb(MTEBEncoder(hash_enc, name="mst5_jax/hash256"), task, offline, tmp_path)["zh-en"]
    # Ours: the mst5_jax.evals.bucc readers, the gold source sentences, mining.top1 (lowest index on ties).
    zh_ids, zh_sents = read_bucc_corpus(folder / "zh-en.dev.zh")
    en_ids, en_sents = read_bucc_corpus(folder / "zh-en.dev.en")
    gold = sorted(read_bucc_gold(folder / "zh-en.dev.gold"))
    assert len(gold) == 257  # the whole zh-en sample
    zh_pos, en_pos = {i: n for n, i in enumerate(zh_ids)}, {i: n for n, i in enumerate(en_ids)}
    q = hash_enc.encode([zh_sents[zh_pos[z]] for z, _ in gold])
    t = hash_enc.encode(en_sents)
    # Hashed character n-grams barely link Chinese to English (accuracy ~0), so the
    # predicted indices themselves are compared, not just the accuracy.
    n_tied = check_same_top1(*mteb_predictions(tmp_path, task, "zh-en"), q, t, "bucc zh-en")
    ours = 100 * float(np.mean(top1(l2_normalize(q), l2_normalize(t)) == np.array([en_pos[e] for _, e in gold])))
    tol = 100 * n_tied / len(gold)
    assert abs(got["accuracy"] * 100 - ours) <= tol + 1e-9, (got["accuracy"], ours, tol)


def test_tiny_sentence_encoder_through_mteb_sts_matches_hf(tiny_hf_model_dir, data_dir, offline):
    """The JAX encoder behind mteb's DataLoader path; reference: HF PyTorch + mean pooling + scipy."""
    import transformers

    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    model = MTEBEncoder(enc, name="mst5_jax/tiny", batch_size=32)
    task = make_sts17_task(data_dir / "sts17", ["en-en"])
    task.load_data()
    task.dataset["en-en"]["test"] = task.dataset["en-en"]["test"].select(range(64))
    got = run_mteb(model, task, offline)["en-en"]
    ds = task.dataset["en-en"]["test"]
    s1, s2, gold = list(ds["sentence1"]), list(ds["sentence2"]), list(ds["score"])

    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    hf = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()

    def hf_embed(texts):
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = hf(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        return ((h * m).sum(1) / m.sum(1)).numpy().astype(np.float64)

    a, b = hf_embed(s1), hf_embed(s2)
    assert rel_err(enc.encode(s1), a) < 1e-4
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    ref = 100 * scipy.stats.spearmanr(cos, gold).statistic
    assert got["cosine_spearman"] * 100 == pytest.approx(ref, abs=STS_TOL)
    ours = pair_spearman(enc.encode, Pairs(s1, s2, gold))
    assert got["cosine_spearman"] * 100 == pytest.approx(ours, abs=STS_TOL)


def test_similarity_against_scipy_and_non_text_batches():
    import scipy.spatial.distance

    model = MTEBEncoder(HashEncoder(dim=64))
    a = model.encode(["a cat sat", "dogs bark loudly", "x"], task_name="t")
    b = model.encode(["the cat sat", "a dog barks", "y z", "cats"], task_name="t")
    ref = 1 - scipy.spatial.distance.cdist(a.astype(np.float64), b.astype(np.float64), "cosine")
    assert rel_err(model.similarity(a, b), ref) < 1e-5
    assert rel_err(model.similarity_pairwise(a, b[:3]), np.diag(ref)) < 1e-5
    with pytest.raises(TypeError, match="no 'text' entry"):
        model.encode([{"image": [1]}], task_metadata=None, hf_split="test", hf_subset="x")


def test_mteb_model_meta_names_the_model():
    meta = MTEBEncoder(HashEncoder(), name="org/m-st5", revision="abc").mteb_model_meta
    assert (meta.name, meta.revision) == ("org/m-st5", "abc")
