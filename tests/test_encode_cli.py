"""`python -m mst5_jax.encode` (mst5_jax.encode_cli) on 10k real Tatoeba lines with a tiny model.

References: HF PyTorch `MT5EncoderModel` + AutoTokenizer + masked mean for the values;
an uninterrupted run for the resume tests (what the issue asks: interrupting and
resuming gives the same file).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from hf_reference import rel_err

REPO = pathlib.Path(__file__).resolve().parents[1]
LANGS = ("deu", "fra", "spa", "rus", "cmn", "ara", "jpn", "ita", "por", "nld", "tur", "heb")
N_LINES = 10_000
COMMON = ("--shard_size", "1000", "--max_length", "128", "--batch_size", "64", "--no_progress")


def cli(*args, check=True, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-m", "mst5_jax.encode", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory):
    """10k Tatoeba lines (non-English sides of 12 languages), written to a temporary file."""
    lines = []
    for lang in LANGS:
        with open(data_dir / "tatoeba" / f"tatoeba.{lang}-eng.{lang}", encoding="utf-8", newline="") as f:
            lines += f.read().split("\n")[:-1]
    lines = lines[:N_LINES]
    assert len(lines) == N_LINES
    path = tmp_path_factory.mktemp("corpus") / "tatoeba.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


@pytest.fixture(scope="module")
def full_run(tiny_hf_model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "emb.npy"
    cli("--model", tiny_hf_model_dir, "--input", corpus[0], "--output", out, *COMMON)
    return np.load(out)


def test_values_match_hf_torch(full_run, tiny_hf_model_dir, corpus):
    import torch
    import transformers

    _, lines = corpus
    assert full_run.shape == (N_LINES, 32) and full_run.dtype == np.float32
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    model = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    rows = list(range(0, N_LINES, 97))  # every shard, many languages
    batch = tok([lines[i] for i in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = ((h * m).sum(1) / m.sum(1)).numpy()
    assert rel_err(full_run[rows], ref) < 1e-4


def test_max_shards_then_resume_equals_uninterrupted(full_run, tiny_hf_model_dir, corpus, tmp_path):
    out = tmp_path / "emb.npy"
    args = ("--model", tiny_hf_model_dir, "--input", corpus[0], "--output", out, *COMMON)
    cli(*args, "--max_shards", "3")
    parts = tmp_path / "emb.npy.parts"
    assert sorted(p.name for p in parts.glob("shard_*.npy")) == [f"shard_{i:05d}.npy" for i in range(3)]
    assert not out.exists()
    # A half-written shard from a crash is a .tmp file; it is ignored and redone.
    (parts / "shard_00003.npy.tmp").write_bytes(b"\x93NUMPY garbage")
    proc = cli(*args)
    assert "3 already done" in proc.stderr
    np.testing.assert_array_equal(np.load(out), full_run)
    assert not parts.exists()


def test_sigkill_then_resume_equals_uninterrupted(full_run, tiny_hf_model_dir, corpus, tmp_path):
    out = tmp_path / "emb"
    args = ["--model", tiny_hf_model_dir, "--input", corpus[0], "--output", out, "--sharded", *COMMON]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.Popen([sys.executable, "-m", "mst5_jax.encode", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "shard_00000.npy").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job finished before it could be interrupted"
    done = sorted(out.glob("shard_*.npy"))
    assert 1 <= len(done) < 10 and not (out / "index.json").exists()
    cli(*args)
    index = json.loads((out / "index.json").read_text())
    assert index["num_sentences"] == N_LINES and index["dim"] == 32 and len(index["shards"]) == 10
    assert [(s["start"], s["end"]) for s in index["shards"]] == [(i * 1000, (i + 1) * 1000) for i in range(10)]
    from mst5_jax.encode import load_embeddings

    np.testing.assert_array_equal(load_embeddings(out), full_run)


def test_jsonl_field_and_precision(full_run, tiny_hf_model_dir, corpus, tmp_path):
    from sentence_transformers.util.quantization import quantize_embeddings

    _, lines = corpus
    n = 300
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "meta": {"text": s}}, ensure_ascii=False) + "\r\n"
                           for i, s in enumerate(lines[:n])), encoding="utf-8")
    out = tmp_path / "b.npy"
    cli("--model", tiny_hf_model_dir, "--input", src, "--field", "meta.text", "--output", out, *COMMON,
        "--precision", "ubinary", "--normalize")
    ref = quantize_embeddings(full_run[:n], precision="ubinary")
    np.testing.assert_array_equal(np.load(out), ref)


def test_errors_name_the_problem(tiny_hf_model_dir, corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    proc = cli("--model", tiny_hf_model_dir, "--input", bad, "--field", "text", "--output", tmp_path / "x.npy",
               *COMMON, check=False)
    assert proc.returncode != 0 and "bad.jsonl:2: no field 'text'" in proc.stderr
    out = tmp_path / "y.npy"
    cli("--model", tiny_hf_model_dir, "--input", corpus[0], "--output", out, *COMMON, "--max_shards", "1")
    proc = cli("--model", tiny_hf_model_dir, "--input", corpus[0], "--output", out, *COMMON, "--normalize",
               check=False)
    assert proc.returncode != 0 and "normalize" in proc.stderr and "manifest.json" in proc.stderr
    proc = cli("--model", tiny_hf_model_dir, "--input", corpus[0], "--output", out, *COMMON, "--precision", "int8",
               check=False)
    assert proc.returncode != 0 and "quantize the finished float32 file" in proc.stderr


# --- outputs never destroyed or blocked, inputs checked (docs/PUBLIC_API.md §4b) -------------------------------

def _refused(proc, *needles):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-3000:])


def test_failed_run_leaves_nothing_and_overwrite_keeps_old_until_done(tiny_hf_model_dir, corpus, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n".join(corpus[1][:50]) + "\n", encoding="utf-8")
    out = tmp_path / "e.npy"
    _refused(cli("--model", tmp_path / "no_such_model", "--input", small, "--output", out, *COMMON, check=False),
             "no_such_model")
    assert not out.exists() and not (tmp_path / "e.npy.parts").exists()
    cli("--model", tiny_hf_model_dir, "--input", small, "--output", out, *COMMON)
    first = np.load(out)
    # A failing --overwrite job leaves the finished file as it was.
    _refused(cli("--model", tmp_path / "no_such_model", "--input", small, "--output", out, *COMMON, "--overwrite",
                 check=False), "no_such_model")
    np.testing.assert_array_equal(np.load(out), first)
    cli("--model", tiny_hf_model_dir, "--input", small, "--output", out, *COMMON, "--overwrite", "--normalize")
    again = np.load(out)
    ref = first / np.linalg.norm(first, axis=1, keepdims=True)
    assert rel_err(again, ref) < 1e-5


def test_output_equal_to_input_and_empty_input(tiny_hf_model_dir, tmp_path):
    same = tmp_path / "same.npy"
    same.write_text("a\nb\n")
    _refused(cli("--model", tiny_hf_model_dir, "--input", same, "--output", same, *COMMON, check=False),
             "is the --input file")
    assert same.read_text() == "a\nb\n"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "empty.npy"
    _refused(cli("--model", tiny_hf_model_dir, "--input", empty, "--output", out, *COMMON, check=False),
             "is empty", "--allow_empty")
    assert not out.exists() and not (tmp_path / "empty.npy.parts").exists()
    cli("--model", tiny_hf_model_dir, "--input", empty, "--output", out, *COMMON, "--allow_empty")
    assert np.load(out).shape == (0, 32)


def test_resume_detects_an_edit_past_the_first_mib(tiny_hf_model_dir, tmp_path):
    inp = tmp_path / "big.txt"
    inp.write_bytes(b"hello\n" + b"x" * (3 << 19) + b"\n")  # 1.5 MiB second line
    out = tmp_path / "big.npy"
    args = ("--model", tiny_hf_model_dir, "--input", inp, "--output", out, "--shard_size", "1", "--max_length", "16",
            "--no_progress")
    cli(*args, "--max_shards", "1")
    data = bytearray(inp.read_bytes())
    data[-2:-1] = b"y"  # same size, edited after the first MiB
    inp.write_bytes(bytes(data))
    _refused(cli(*args, check=False), "manifest.json", "input")
