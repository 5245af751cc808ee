"""mst5_jax.mine: chunked exact mining vs a direct full-matrix numpy implementation, faiss vs
exact, and the CLI's TSV (threshold, dedup) on real BUCC zh-en text with a tiny model.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from mst5_jax.inference import mining as mine

REPO = pathlib.Path(__file__).resolve().parents[1]


def direct_mine(x, y, k):
    """The textbook algorithm on the full similarity matrix, written from the paper's definition."""
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    yu = y / np.linalg.norm(y, axis=1, keepdims=True)
    sim = xu.astype(np.float64) @ yu.astype(np.float64).T  # [nx, ny]
    nn_xy = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    nn_yx = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
    knn_x = np.take_along_axis(sim, nn_xy, 1).mean(1)
    knn_y = np.take_along_axis(sim.T, nn_yx, 1).mean(1)
    margin = sim / ((knn_x[:, None] + knn_y[None, :]) / 2)
    cands = {}
    for i in range(len(x)):
        j = max(nn_xy[i], key=lambda j: margin[i, j])
        cands[(i, j)] = margin[i, j]
    for j in range(len(y)):
        i = max(nn_yx[j], key=lambda i: margin[i, j])
        cands[(i, j)] = margin[i, j]
    used_x, used_y, out = set(), set(), []
    for (i, j), s in sorted(cands.items(), key=lambda kv: -kv[1]):
        if i not in used_x and j not in used_y:
            used_x.add(i)
            used_y.add(j)
            out.append((i, j, s))
    return out


def planted(nx, ny, d, n_pairs, seed):
    """Random corpora where n_pairs target rows are noisy copies of source rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nx, d)).astype(np.float32)
    y = rng.standard_normal((ny, d)).astype(np.float32)
    src = rng.choice(nx, n_pairs, replace=False)
    trg = rng.choice(ny, n_pairs, replace=False)
    y[trg] = x[src] + 0.8 * rng.standard_normal((n_pairs, d)).astype(np.float32)
    return x, y, dict(zip(src.tolist(), trg.tolist()))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_chunked_exact_equals_direct_2k_x_3k(precision):
    x, y, gold = planted(2000, 3000, 64, 500, seed=0)
    ref = direct_mine(x, y, k=4)
    got = mine.mine(x, y, k=4, backend="exact", block_elems=300_000, precision=precision)  # 20+ blocks
    assert [(i, j) for i, j, _ in ref] == list(zip(got.src.tolist(), got.trg.tolist()))
    np.testing.assert_allclose(got.score, [s for _, _, s in ref], rtol=1e-6)
    top = set(zip(got.src[:500].tolist(), got.trg[:500].tolist()))
    assert len(top & set(gold.items())) >= 450  # the planted pairs score highest


def test_faiss_flat_equals_exact_5k_x_5k():
    x, y, _ = planted(5000, 5000, 96, 1500, seed=1)
    exact = mine.mine(x, y, k=4, backend="exact")
    fast = mine.mine(x, y, k=4, backend="faiss", faiss_index="Flat")
    assert np.array_equal(exact.src, fast.src) and np.array_equal(exact.trg, fast.trg)
    np.testing.assert_array_equal(fast.score, exact.score)


def test_faiss_ivf_runs_and_finds_planted_pairs():
    x, y, gold = planted(3000, 3000, 32, 1000, seed=2)
    got = mine.mine(x, y, k=4, backend="faiss", faiss_index="IVF16,Flat", nprobe=16)  # nprobe = all lists: exact
    exact = mine.mine(x, y, k=4, backend="exact")
    assert np.array_equal(exact.src, got.src) and np.array_equal(exact.trg, got.trg)


def read_tsv(path):
    lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
    assert lines[0] == "score\tsrc_line\ttgt_line\tsrc\ttgt" and lines[-1] == ""
    return [r.split("\t") for r in lines[1:-1]]


def test_cli_tsv_threshold_and_dedup(tiny_hf_model_dir, data_dir, tmp_path):
    """Real BUCC zh-en lines; embeddings given as .npy so the CLI's file handling is what is tested."""
    zh = [r.split("\t", 1)[1] for r in (data_dir / "bucc2018" / "zh-en.dev.zh").read_text("utf-8").splitlines()[:400]]
    en = [r.split("\t", 1)[1] for r in (data_dir / "bucc2018" / "zh-en.dev.en").read_text("utf-8").splitlines()[:500]]
    zh += zh[:50]  # duplicates for --dedup
    rng = np.random.default_rng(3)
    x = rng.standard_normal((len(zh), 16)).astype(np.float32)
    x[400:] = x[:50]
    y = rng.standard_normal((len(en), 16)).astype(np.float32)
    y[:200] = x[:200] + 0.3 * rng.standard_normal((200, 16)).astype(np.float32)
    for name, lines, emb in (("src", zh, x), ("tgt", en, y)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        np.save(tmp_path / f"{name}.npy", emb)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*extra):
        out = tmp_path / "pairs.tsv"
        out.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "mst5_jax.mine", "--src", tmp_path / "src.txt", "--tgt",
                        tmp_path / "tgt.txt", "--src_emb", tmp_path / "src.npy", "--tgt_emb", tmp_path / "tgt.npy",
                        "--output", out, *extra], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        return read_tsv(out)

    rows = run()
    ref = direct_mine(x, y, 4)
    assert run("--screen", "float32") == run("--screen", "bfloat16") == rows  # the screen decides no pair
    assert [(int(r[1]), int(r[2])) for r in rows] == [(i, j) for i, j, _ in ref]
    assert all(abs(float(r[0]) - s) < 2e-6 for r, (_, _, s) in zip(rows, ref))
    assert all(r[3] == zh[int(r[1])] and r[4] == en[int(r[2])] for r in rows)

    thr = sorted(s for _, _, s in ref)[len(ref) // 2]
    rows_t = run("--threshold", str(thr), "--backend", "faiss")
    assert [(int(r[1]), int(r[2])) for r in rows_t] == [(i, j) for i, j, s in ref if s >= thr]

    rows_d = run("--dedup")
    first = {}
    for i, s in enumerate(zh):
        first.setdefault(s, i)
    keep = np.array(sorted(first.values()))
    ref_d = [(int(keep[i]), j) for i, j, _ in direct_mine(x[keep], y, 4)]
    assert [(int(r[1]), int(r[2])) for r in rows_d] == ref_d
    assert len({r[3] for r in rows_d}) == len(rows_d) and max(int(r[1]) for r in rows_d) < 400


def _cli(tmp_path, *extra, x=None, y=None):
    """Runs the CLI on 30 x 40 lines with the given embeddings; returns the CompletedProcess."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 8)).astype(np.float32) if x is None else x
    y = rng.standard_normal((40, 8)).astype(np.float32) if y is None else y
    for name, emb in (("src", x), ("tgt", y)):
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} {i}\n" for i in range(len(emb))), encoding="utf-8")
        np.save(tmp_path / f"{name}.npy", emb)
    args = ["--src", tmp_path / "src.txt", "--tgt", tmp_path / "tgt.txt", "--src_emb", tmp_path / "src.npy",
            "--tgt_emb", tmp_path / "tgt.npy"]
    return subprocess.run([sys.executable, "-m", "mst5_jax.mine", *map(str, args), *map(str, extra)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)


def test_cli_refuses_output_equal_to_an_input(tmp_path):
    for target in ("src.txt", "tgt.npy"):
        r = _cli(tmp_path, "--output", tmp_path / target, "--overwrite")
        assert r.returncode != 0 and "is the --" in r.stderr and target.split(".")[0] in r.stderr


def test_cli_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "pairs.tsv"
    out.write_text("old\n")
    r = _cli(tmp_path, "--output", out)
    assert r.returncode != 0 and "--overwrite" in r.stderr and out.read_text() == "old\n"
    # A failing run (NaN input) with --overwrite keeps the old file untouched.
    bad = np.ones((30, 8), np.float32)
    bad[7, 3] = np.nan
    r = _cli(tmp_path, "--output", out, "--overwrite", x=bad)
    assert r.returncode != 0 and out.read_text() == "old\n"
    r = _cli(tmp_path, "--output", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("score\tsrc_line") and not list(tmp_path.glob(".pairs.tsv.*"))


def test_cli_names_file_and_first_bad_row(tmp_path):
    bad = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    bad[[12, 30], 2] = [np.inf, np.nan]
    r = _cli(tmp_path, "--output", tmp_path / "o.tsv", y=bad)
    assert r.returncode != 0 and "tgt.npy: row 12 " in r.stderr and "NaN or Inf" in r.stderr


def test_cli_refuses_packed_binary_wrong_shape_and_width(tmp_path):
    ub = np.packbits(np.random.default_rng(0).standard_normal((30, 64)) > 0, axis=1)  # uint8 [30, 8]
    r = _cli(tmp_path, "--output", tmp_path / "o.tsv", x=ub)
    assert r.returncode != 0 and "src.npy" in r.stderr and "ubinary" in r.stderr and "uint8" in r.stderr
    r = _cli(tmp_path, "--output", tmp_path / "o.tsv", x=np.zeros((30, 2, 4), np.float32))
    assert r.returncode != 0 and "src.npy" in r.stderr and "not 2-D" in r.stderr
    r = _cli(tmp_path, "--output", tmp_path / "o.tsv", y=np.ones((40, 6), np.float32))
    assert r.returncode != 0 and "widths differ" in r.stderr and "8" in r.stderr and "6" in r.stderr


def test_faiss_flat_advice_does_not_suggest_flat():
    """An exhaustive index returning -1 (NaN rows) must not be told to switch to a Flat index."""
    x = np.full((20, 8), np.nan, np.float32)
    with pytest.raises(RuntimeError) as e:
        mine.knn_faiss(x, x, 4, index="Flat")
    assert "use --faiss_index Flat" not in str(e.value) and "NaN" in str(e.value)
