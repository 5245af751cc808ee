"""`python -m mst5_jax.evaluate` end to end, in a subprocess: the hash encoder on real data,
reference and compare tables, and a tiny random HF-format mT5 model checked against
HF PyTorch + scipy."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from mst5_jax.evals import sts
from mst5_jax.evals.hash_encoder import hash_encode

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "mst5_jax.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(md):
    """Markdown table -> {(task, metric): [cells after the metric]}."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("task", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def spearman_ref(emb1, emb2, gold):
    a = emb1 / np.maximum(np.linalg.norm(emb1, axis=1, keepdims=True), np.float32(1e-12))
    b = emb2 / np.maximum(np.linalg.norm(emb2, axis=1, keepdims=True), np.float32(1e-12))
    cos = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64)).astype(np.float32)
    return 100 * scipy.stats.spearmanr(cos, gold).statistic


@pytest.fixture(scope="module")
def hash_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "hash.json"
    stdout = run_cli("--encoder", "hash", "--tasks", "xsts,jsts,jsick_retrieval,bucc", "--data_dir", data_dir,
                     "--output", out)
    return json.loads(out.read_text()), stdout, out


def test_hash_cli_json_and_table(hash_run, data_dir):
    res, stdout, _ = hash_run
    assert list(res["results"]) == ["xsts", "jsts", "jsick_retrieval", "bucc"]
    meta = res["meta"]
    assert meta["model"].startswith("hash") and meta["tasks"] == list(res["results"])
    assert {"date", "versions", "device", "pooling", "dtype", "max_length", "batch_size"} <= set(meta)
    for track in sts.STS17_TRACKS:
        pairs, _ = sts.load_sts17_track(data_dir, track)
        ref = spearman_ref(hash_encode(pairs.s1), hash_encode(pairs.s2), pairs.gold)
        assert res["results"]["xsts"]["per_track"][track] == pytest.approx(ref, abs=1e-9)
    bucc = res["results"]["bucc"]
    assert bucc["langs_evaluated"] == ["zh"] and bucc["langs_missing"] == ["de", "fr", "ru"] and bucc["avg"] is None
    rows = table_rows(stdout)
    assert rows[("xsts", "avg")] == [f"{res['results']['xsts']['avg']:.2f}"]
    assert rows[("jsts", "spearman")] == [f"{res['results']['jsts']['spearman']:.2f}"]
    assert rows[("bucc", "avg")] == ["n/a"]
    assert ("jsick_retrieval", "en->ja") in rows and ("bucc", "zh F1 (oracle threshold)") in rows


def test_reference_and_compare_tables(hash_run, tmp_path):
    res, _, out = hash_run
    ref = {"xsts": {"per_track": {"en-en": 50.0}}, "jsts.spearman": 10.0}
    ref_path = tmp_path / "ref.json"
    ref_path.write_text(json.dumps(ref))
    stdout = run_cli("--encoder", "hash", "--tasks", "xsts,jsts", "--reference", ref_path, "--output", tmp_path / "r.json")
    rows = table_rows(stdout)
    en = res["results"]["xsts"]["per_track"]["en-en"]
    assert rows[("xsts", "en-en")] == [f"{en:.2f}", "50.00", f"{en - 50:+.2f}"]
    assert rows[("jsts", "spearman")][1:] == ["10.00", f"{res['results']['jsts']['spearman'] - 10:+.2f}"]
    assert rows[("xsts", "ar-ar")][1:] == ["", ""]

    # --compare: the second file is the first with one number changed.
    other = json.loads(out.read_text())
    other["results"]["xsts"]["avg"] += 1.5
    other_path = tmp_path / "b.json"
    other_path.write_text(json.dumps(other))
    rows = table_rows(run_cli("--compare", out, other_path))
    a = res["results"]["xsts"]["avg"]
    assert rows[("xsts", "avg")] == [f"{a:.2f}", f"{a + 1.5:.2f}", "+1.50"]
    assert rows[("xsts", "en-en")][2] == "+0.00"


def test_unknown_task_is_an_error():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mst5_jax.evaluate", "--encoder", "hash", "--tasks", "xsts,nope"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown task(s) ['nope']" in proc.stderr


# --- tiny random model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(data_dir, tmp_path_factory):
    """A random 2-layer mT5 encoder in HF format with a 300-piece SentencePiece vocabulary."""
    sys.path.insert(0, str(REPO / "tests"))
    from hf_reference import hf_config, random_encoder, save_hf_dir

    from mst5_jax.formats.vocab import train_sentencepiece
    from mst5_jax.utils.files import distinct_texts

    d = tmp_path_factory.mktemp("tiny_mt5")
    files = [data_dir / "sts17" / "STS2017-extended" / f"STS.{p}.txt" for p in ("en-en", "es-es", "ar-ar", "en-tr")]
    train_sentencepiece(distinct_texts(files), d / "spiece.model", vocab_size=300)
    save_hf_dir(random_encoder(hf_config(vocab_size=300, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2)), d)
    return d


def test_tiny_model_cli_matches_hf_torch(tiny_model_dir, data_dir, tmp_path):
    import sentencepiece as spm
    import torch
    import transformers

    out = tmp_path / "tiny.json"
    stdout = run_cli("--model", tiny_model_dir, "--tasks", "xsts", "--data_dir", data_dir, "--output", out,
                     "--max_length", 128, "--batch_size", 64)
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert meta["model_fingerprint"]["exists"] and meta["max_length"] == 128 and meta["batch_size"] == 64
    assert meta["dtype"] == "float32" and meta["pooling"] == "mean" and "jax" in meta["versions"]
    assert res["results"]["xsts"]["meta"]["max_length"] == 128
    assert ("xsts", "avg") in table_rows(stdout)

    # Reference: HF PyTorch encoder, SentencePiece ids + EOS, masked mean, scipy Spearman.
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "spiece.model"))
    model = transformers.MT5EncoderModel.from_pretrained(tiny_model_dir).float().eval()

    def embed(sents):
        out = []
        for s in sents:
            ids = (sp.encode(s) + [1])[:128]
            with torch.no_grad():
                h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            out.append(h.mean(0).numpy())
        return np.stack(out).astype(np.float32)

    for track in ("en-en", "ar-ar", "tr-en"):
        pairs, _ = sts.load_sts17_track(data_dir, track)
        ref = spearman_ref(embed(pairs.s1), embed(pairs.s2), pairs.gold)
        # Ranks of float32 cosines can swap where two pairs are within ~1e-6: allow a little.
        assert res["results"]["xsts"]["per_track"][track] == pytest.approx(ref, abs=0.05), track


# --- outputs are never destroyed, failures keep finished tasks (docs/PUBLIC_API.md §4b) ----------------------

def _cli_proc(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mst5_jax.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_existing_output_is_refused_without_overwrite(data_dir, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    proc = _cli_proc("--encoder", "hash", "--tasks", "jsts", "--data_dir", data_dir, "--output", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--output {out} exists" in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_text() == "keep me"
    proc = _cli_proc("--encoder", "hash", "--tasks", "jsts", "--data_dir", data_dir, "--output", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["results"]["jsts"]["spearman"] is not None


def test_a_failing_task_keeps_the_finished_ones(data_dir, tmp_path):
    # A data root with the STS17 files only: xsts runs, jsts cannot find its data.
    root = tmp_path / "data"
    root.mkdir()
    (root / "sts17").symlink_to(data_dir / "sts17", target_is_directory=True)
    out = tmp_path / "r.json"
    proc = _cli_proc("--encoder", "hash", "--tasks", "xsts,jsts", "--data_dir", root, "--output", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "task jsts failed" in proc.stderr and "1 of 2 task(s) failed" in proc.stderr
    res = json.loads(out.read_text())
    assert list(res["results"]) == ["xsts"] and list(res["meta"]["failed_tasks"]) == ["jsts"]
    ref = _cli_proc("--encoder", "hash", "--tasks", "xsts", "--data_dir", data_dir, "--output", tmp_path / "x.json")
    assert ref.returncode == 0, ref.stderr
    assert res["results"]["xsts"]["avg"] == json.loads((tmp_path / "x.json").read_text())["results"]["xsts"]["avg"]


def test_unknown_task_has_no_traceback():
    proc = _cli_proc("--encoder", "hash", "--tasks", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown task(s) ['nope']" in proc.stderr
