"""Margin mining, kNN and the BUCC threshold sweep against slow direct implementations.

The slow references follow the LASER/XTREME recipe line by line in plain Python (sorted()
neighbour lists, explicit loops and sets), sharing no code with mst5_jax.evals.mining
beyond the definition of the cosine (float32 L2 normalisation, float32 dot).
"""
import sys

import numpy as np
import pytest

from mst5_jax.evals.bucc import bucc, read_bucc_corpus, read_bucc_gold
from mst5_jax.evals.hash_encoder import hash_encode
from mst5_jax.evals import mining
from mst5_jax.evals.mining import (apply_threshold, cosine_matrix, knn_both, l2_normalize, mine_pairs,
                                   optimal_threshold)

SCREENS = ("float32", "bfloat16")  # both screening GEMMs run here: torch is a pinned requirement


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def slow_cos(x, y):
    return (unit(x).astype(np.float64) @ unit(y).astype(np.float64).T).astype(np.float32)


def slow_knn(sims, k):
    """Per row: the k columns first in (descending sim, ascending index) order."""
    return [sorted(range(sims.shape[1]), key=lambda j: (-sims[i, j], j))[:k] for i in range(sims.shape[0])]


def slow_mine(x, y, k):
    """LASER mine_bitexts (mode mine, retrieval max, margin ratio), written out directly."""
    S = slow_cos(x, y)
    fwd_nn, bwd_nn = slow_knn(S, k), slow_knn(S.T, k)
    x_mean = [sum(float(S[i, j]) for j in fwd_nn[i]) / len(fwd_nn[i]) for i in range(len(x))]
    y_mean = [sum(float(S[i, j]) for i in bwd_nn[j]) / len(bwd_nn[j]) for j in range(len(y))]
    cands = []
    for i in range(len(x)):
        best = None
        for j in fwd_nn[i]:
            m = float(S[i, j]) / ((x_mean[i] + y_mean[j]) / 2)
            if best is None or m > best[0]:
                best = (m, i, j)
        cands.append(best)
    for j in range(len(y)):
        best = None
        for i in bwd_nn[j]:
            m = float(S[i, j]) / ((y_mean[j] + x_mean[i]) / 2)
            if best is None or m > best[0]:
                best = (m, i, j)
        cands.append(best)
    cands = sorted(cands, key=lambda c: -c[0])  # stable: forward before backward on ties
    seen_x, seen_y, out = set(), set(), []
    for m, i, j in cands:
        if i not in seen_x and j not in seen_y:
            seen_x.add(i)
            seen_y.add(j)
            out.append((i, j, m))
    return out


def brute_best_f1(scores, correct, num_gold):
    """max over every threshold t in the scores of F1({score >= t}), in percent."""
    best = 0.0
    for t in np.unique(scores):
        sel = scores >= t
        c = int(correct[sel].sum())
        if c:
            p, r = c / sel.sum(), c / num_gold
            best = max(best, 100 * 2 * p * r / (p + r))
    return best


# --- kNN -------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", SCREENS)
@pytest.mark.parametrize("nx,ny,block_elems", [(23, 31, 7), (23, 31, 60), (23, 31, 1 << 22),
                                                (130, 150, 1 << 22), (130, 150, 90 * 90)])
def test_knn_both_matches_sorted_brute_force_with_ties(nx, ny, block_elems, precision):
    """Narrow blocks (exact k-th largest) and wide ones (group maxima, with a tail of columns
    that fills no group: 150 = 9 x 16 + 6, 130 = 8 x 16 + 2, 90 = 5 x 16 + 10)."""
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, size=(nx, 4)).astype(np.float32)  # small integers: many exact ties
    y = rng.integers(-2, 3, size=(ny, 4)).astype(np.float32)
    y[5] = y[17] = y[30] = y[2]
    x[0] = 0  # a zero row: cosine 0 with everything, all ties
    k = 4
    x2y_sim, x2y_ind, y2x_sim, y2x_ind = knn_both(l2_normalize(x), l2_normalize(y), k, block_elems, precision)
    S = slow_cos(x, y)
    ref_x, ref_y = slow_knn(S, k), slow_knn(S.T, k)
    np.testing.assert_array_equal(x2y_ind, ref_x)
    np.testing.assert_array_equal(y2x_ind, ref_y)
    np.testing.assert_array_equal(x2y_sim, np.take_along_axis(S, np.array(ref_x), 1))
    np.testing.assert_array_equal(y2x_sim, np.take_along_axis(S.T, np.array(ref_y), 1))


@pytest.mark.parametrize("precision", SCREENS)
def test_knn_both_near_ties_below_float32_gemm_error(precision):
    """Cosines that differ by less than the float32 GEMM error (near-ties) and exact duplicates:
    the screening blocks must not decide the order; the float64 rescoring must."""
    rng = np.random.default_rng(7)
    d, k = 96, 4
    y = rng.standard_normal((400, d)).astype(np.float32)
    x = rng.standard_normal((50, d)).astype(np.float32)
    for i in range(50):
        base = x[i] * 3
        for j, jj in enumerate(rng.choice(400, 6, replace=False)):
            # Copies of one direction nudged in the last bits: cosines within ~1e-7 of each other.
            y[jj] = base + (j - 3) * 1e-6 * rng.standard_normal(d).astype(np.float32)
    y[[10, 200, 399]] = y[5]  # exact duplicates: ties broken by index
    S = slow_cos(x, y)
    for block_elems in (64 * 64, 50 * 17, 1 << 22):
        x2y_sim, x2y_ind, y2x_sim, y2x_ind = knn_both(l2_normalize(x), l2_normalize(y), k, block_elems, precision)
        np.testing.assert_array_equal(x2y_ind, slow_knn(S, k))
        np.testing.assert_array_equal(y2x_ind, slow_knn(S.T, k))
        np.testing.assert_array_equal(x2y_sim, np.take_along_axis(S, np.array(slow_knn(S, k)), 1))
        np.testing.assert_array_equal(y2x_sim, np.take_along_axis(S.T, np.array(slow_knn(S.T, k)), 1))


def _bound_cases():
    """Unit rows of three kinds: random (cosines near 0), near-parallel (cosines near 1, where
    the relative part of a bound dominates) and with huge and tiny components."""
    rng = np.random.default_rng(11)
    rand = rng.standard_normal((300, 256)).astype(np.float32)
    base = rng.standard_normal(256).astype(np.float32)
    parallel = base + 0.02 * rng.standard_normal((300, 256)).astype(np.float32)
    spiky = rng.standard_normal((300, 256)).astype(np.float32) * np.float32(1e-3)
    spiky[:, :3] = rng.standard_normal((300, 3)) * 50
    return {"random": rand, "near-parallel": parallel, "spiky": spiky}


@pytest.mark.parametrize("precision", SCREENS)
@pytest.mark.parametrize("case", ["random", "near-parallel", "spiky"])
def test_screen_error_bound_holds_on_this_machines_gemm(precision, case):
    """The bound `knn_both` relies on, checked against the float64 cosine on the GEMM that
    actually runs here (torch/oneDNN for bfloat16, numpy's BLAS for float32)."""
    a = l2_normalize(_bound_cases()[case])
    x, y = a[:140], a[140:]
    scr = mining.screen(x, y, precision)
    s = scr.gemm(slice(0, 140), slice(0, 160))
    err = np.abs(s.astype(np.float64) - cosine_matrix(x, y).astype(np.float64))
    bound = scr.abs_err + scr.rel_err * np.abs(s.astype(np.float64))
    assert s.dtype == np.float32 and s.shape == (140, 160)
    assert (err <= bound).all(), float((err - bound).max())
    if precision == "bfloat16":  # a bfloat16 GEMM really ran: errors far above float32's
        assert err.max() > 1e-4
        assert scr.rel_err == pytest.approx(2.0**-8, rel=0.01) and scr.abs_err < 0.01


def test_screen_floor_keeps_exactly_what_can_reach_the_top():
    """floor(lower): the smallest screened value s with s + a + b|s| >= lower - a - b|lower|."""
    scr = mining.Screen("test", None, abs_err=0.01, rel_err=0.1)
    for lower in (0.9, 0.05, -0.3, 0.0):
        t = float(scr.floor(np.array([lower], np.float32))[0])
        target = lower - 0.01 - 0.1 * abs(lower)
        assert t + 0.01 + 0.1 * abs(t) >= target - 1e-6  # t itself is kept
        above = t + 1e-4  # and just above it a little, entries could reach the target
        assert above + 0.01 + 0.1 * abs(above) >= target
        below = t - 1e-3  # well below it, none can
        assert below + 0.01 + 0.1 * abs(below) < target
    assert np.isneginf(scr.floor(np.array([-np.inf], np.float32))).all()


def test_bfloat16_screen_without_its_margin_loses_neighbours(monkeypatch):
    """The margin matters: with the bfloat16 screen's error bound set to zero, `knn_both`
    misses true neighbours on random data; with it, it matches the brute force."""
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.standard_normal((200, 96)).astype(np.float32))
    y = l2_normalize(rng.standard_normal((300, 96)).astype(np.float32))
    S, k = slow_cos(x, y), 4
    real = mining.screen
    monkeypatch.setattr(mining, "screen", lambda a, b, p: real(a, b, p)._replace(abs_err=0.0, rel_err=0.0))
    assert not np.array_equal(knn_both(x, y, k, precision="bfloat16")[1], slow_knn(S, k))
    monkeypatch.setattr(mining, "screen", real)
    np.testing.assert_array_equal(knn_both(x, y, k, precision="bfloat16")[1], slow_knn(S, k))


def test_resolve_screen(monkeypatch):
    assert mining.resolve_screen("float32") == "float32"
    assert mining.resolve_screen("bfloat16") == "bfloat16"
    assert mining.resolve_screen() == ("bfloat16" if mining._native_bf16_gemm() else "float32")
    with pytest.raises(ValueError, match="screen precision 'int8'"):
        mining.resolve_screen("int8")
    # A small job does not pay torch's import: float32 unless torch is already loaded.
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert mining.resolve_screen("auto", macs=3000 * 3000 * 768) == "float32"
    assert mining.resolve_screen("bfloat16", macs=3000 * 3000 * 768) == "bfloat16"
    big = mining.resolve_screen("auto", macs=mining.BF16_MIN_MACS)
    assert big == ("bfloat16" if mining._native_bf16_gemm() else "float32")
    monkeypatch.setitem(sys.modules, "torch", object())
    assert mining.resolve_screen("auto", macs=3000 * 3000 * 768) == big


# --- mining ----------------------------------------------------------------------------------

def test_mine_pairs_hand_checked():
    # Basis vectors: each x_i's neighbours are y_i (cos 1) then the lowest other index (cos 0),
    # so every kNN mean is 0.5 and every margin of (i, i) is 1 / 0.5 = 2.
    x = np.eye(3, dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[[2, 0, 1]]
    mined = mine_pairs(x, y, k=2)
    assert sorted(zip(mined.src.tolist(), mined.trg.tolist())) == [(0, 1), (1, 2), (2, 0)]
    np.testing.assert_allclose(mined.score, [2.0, 2.0, 2.0])


@pytest.mark.parametrize("precision", SCREENS)
def test_mine_pairs_matches_slow_on_random_data(precision):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(60, 8)).astype(np.float32)
    x = (y[rng.permutation(60)[:45]] + 0.8 * rng.normal(size=(45, 8))).astype(np.float32)
    mined = mine_pairs(x, y, k=4, block_elems=200, precision=precision)
    ref = slow_mine(x, y, 4)
    assert list(zip(mined.src.tolist(), mined.trg.tolist())) == [(i, j) for i, j, _ in ref]
    np.testing.assert_allclose(mined.score, [m for _, _, m in ref], rtol=1e-12)


def bucc_subset(data_dir, n_src=1500, n_en_extra=2000):
    """Real zh-en BUCC lines: the first n_src zh lines, their gold English, and extra English."""
    folder = data_dir / "bucc2018"
    src_ids, src = read_bucc_corpus(folder / "zh-en.dev.zh")
    en_ids, en = read_bucc_corpus(folder / "zh-en.dev.en")
    gold = read_bucc_gold(folder / "zh-en.dev.gold")
    keep_src = set(src_ids[:n_src])
    sub_gold = {g for g in gold if g[0] in keep_src}
    keep_en = {g[1] for g in sub_gold} | set(en_ids[:n_en_extra])
    en_rows = [(i, s) for i, s in zip(en_ids, en) if i in keep_en]
    return list(zip(src_ids[:n_src], src[:n_src])), en_rows, sub_gold


def leaky_encoder(src_rows, en_rows, gold):
    """A deterministic encoder that knows part of the answer, so mining F1 is far from 0 and 100.

    Hashed n-grams alone barely link Chinese to English, so some zh sentences get the hash
    of an English sentence added, at varying strength: two thirds of the gold pairs get
    their true partner, and every 40th non-gold zh line a wrong one (false positives).
    """
    en_text = dict(en_rows)
    gold_of = {g[0]: en_text[g[1]] for g in gold}
    partner, weight = {}, {}
    for n, (i, s) in enumerate(src_rows):
        if i in gold_of and n % 3:
            partner[s] = gold_of[i]
        elif i not in gold_of and n % 40 == 0:
            partner[s] = en_rows[(n * 13) % len(en_rows)][1]
        weight[s] = 0.1 + 0.25 * (n % 5)

    def encode(sents):
        base = hash_encode(sents)
        leak = hash_encode([partner.get(s, "") for s in sents])
        w = np.array([weight.get(s, 0.0) if s in partner else 0.0 for s in sents], np.float32)[:, None]
        return base + w * leak

    return encode


def test_bucc_end_to_end_matches_slow_pipeline(data_dir, tmp_path):
    src_rows, en_rows, gold = bucc_subset(data_dir)
    d = tmp_path / "bucc2018"
    d.mkdir()
    (d / "zh-en.dev.zh").write_text("".join(f"{i}\t{s}\n" for i, s in src_rows), encoding="utf-8")
    (d / "zh-en.dev.en").write_text("".join(f"{i}\t{s}\n" for i, s in en_rows), encoding="utf-8")
    (d / "zh-en.dev.gold").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(gold)), encoding="utf-8")
    encode = leaky_encoder(src_rows, en_rows, gold)

    res = bucc(encode, tmp_path, langs=("zh", "de"))
    assert res["langs_evaluated"] == ["zh"] and res["langs_missing"] == ["de"]
    assert res["avg"] is None and res["avg_present"] == res["per_lang"]["zh"]["f1"]

    # Slow reference: mine distinct texts, expand to ids, brute-force the threshold.
    src_u = list(dict.fromkeys(s for _, s in src_rows))
    en_u = list(dict.fromkeys(s for _, s in en_rows))
    mined = slow_mine(encode(src_u), encode(en_u), 4)
    cands = {}
    for i, j, m in mined:
        for sid, s in src_rows:
            if s != src_u[i]:
                continue
            for eid, e in en_rows:
                if e == en_u[j]:
                    cands[(sid, eid)] = m
    scores = np.array(list(cands.values()))
    correct = np.array([p in gold for p in cands])
    ref_f1 = brute_best_f1(scores, correct, len(gold))
    zh = res["per_lang"]["zh"]
    assert zh["num_candidates"] == len(cands)
    assert 10 < ref_f1 < 95, ref_f1  # the test is only meaningful away from 0 and 100
    assert zh["f1"] == pytest.approx(ref_f1, abs=1e-9)
    extracted = {p for p, m in cands.items() if m >= zh["threshold"]}
    n_cor = len(extracted & gold)
    assert zh["precision"] == pytest.approx(100 * n_cor / len(extracted), abs=1e-9)
    assert zh["recall"] == pytest.approx(100 * n_cor / len(gold), abs=1e-9)

    # Held-out variant: the seeded 50/50 split of source ids is part of the definition.
    ids = np.random.default_rng(0).permutation(sorted({i for i, _ in src_rows})).tolist()
    half_a, half_b = set(ids[: len(ids) // 2]), set(ids[len(ids) // 2 :])
    for name, tune, test in (("a_to_b", half_a, half_b), ("b_to_a", half_b, half_a)):
        tune_c = {p: m for p, m in cands.items() if p[0] in tune}
        tune_g = {g for g in gold if g[0] in tune}
        # The tuned threshold must reach the brute-force best F1 on the tuning half ...
        t = zh["heldout"][name]["threshold"]
        tune_ext = {p for p, m in tune_c.items() if m >= t}
        tune_f1 = 200 * len(tune_ext & tune_g) / (len(tune_ext) + len(tune_g))
        assert tune_f1 == pytest.approx(brute_best_f1(np.array(list(tune_c.values())),
                                                      np.array([p in tune_g for p in tune_c]), len(tune_g)), abs=1e-9)
        # ... and its F1 on the other half is computed on that half only.
        test_g = {g for g in gold if g[0] in test}
        test_ext = {p for p, m in cands.items() if p[0] in test and m >= t}
        c = len(test_ext & test_g)
        assert zh["heldout"][name]["f1"] == pytest.approx(200 * c / (len(test_ext) + len(test_g)) if c else 0.0, abs=1e-9)


# --- threshold sweep -------------------------------------------------------------------------

def test_optimal_threshold_hand_checked():
    # keep {3}: F1 .5; keep {3,2,2}: 2*2/(3+3) = .667; keep all: 4/7. Can't cut between the 2s.
    r = optimal_threshold(np.array([3.0, 2.0, 2.0, 1.0]), np.array([True, False, True, False]), 3)
    assert r.threshold == 1.5 and r.num_extracted == 3 and r.num_correct == 2
    assert r.f1 == pytest.approx(200 / 3) and r.precision == pytest.approx(200 / 3) and r.recall == pytest.approx(200 / 3)
    none = optimal_threshold(np.array([1.0, 2.0]), np.array([False, False]), 5)
    assert none.f1 == 0 and none.num_extracted == 0


@pytest.mark.parametrize("seed", range(4))
def test_optimal_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(1.0, 0.1, size=400), 2)  # rounding makes ties
    correct = rng.random(400) < 1 / (1 + np.exp(-(scores - 1.0) * 30))
    num_gold = int(correct.sum()) + 25
    r = optimal_threshold(scores, correct, num_gold)
    assert r.f1 == pytest.approx(brute_best_f1(scores, correct, num_gold), abs=1e-9)
    again = apply_threshold(scores, correct, num_gold, r.threshold)
    assert again.f1 == pytest.approx(r.f1, abs=1e-12)
