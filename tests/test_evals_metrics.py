"""Spearman, cosine and top-1 against scipy / brute-force numpy / hand-checked values."""
import numpy as np
import pytest
import scipy.stats

from mst5_jax.evals.hash_encoder import HashEncoder, hash_encode
from mst5_jax.evals.metrics import average_ranks, mean_or_none, spearman, top1_accuracy
from mst5_jax.evals.mining import cosine_matrix, l2_normalize, paired_cosine, top1


def test_spearman_hand_checked():
    # d = (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0, abs=1e-12)
    # Ties share the mean rank: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> Pearson = sqrt(3)/2.
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(100 * np.sqrt(3) / 2, abs=1e-12)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, size=300).astype(float)  # many ties, like 0-5 gold scores
    b = rng.normal(size=300).astype(np.float32)
    b[::7] = b[0]
    ref = 100 * scipy.stats.spearmanr(a, b).statistic
    assert spearman(a, b) == pytest.approx(ref, abs=1e-9)
    np.testing.assert_allclose(average_ranks(a), scipy.stats.rankdata(a), rtol=0, atol=0)


def test_cosine_definitions_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5)).astype(np.float32)
    b = rng.normal(size=(9, 5)).astype(np.float32)
    an = a / np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)
    bn = b / np.linalg.norm(b.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(cosine_matrix(l2_normalize(a), l2_normalize(b)), an @ bn.T, atol=1e-6)
    np.testing.assert_allclose(paired_cosine(a, b[:7]), np.sum(an * bn[:7], axis=1), atol=1e-6)
    assert cosine_matrix(l2_normalize(a), l2_normalize(b)).dtype == np.float32


def test_top1_ties_go_to_lowest_index_and_accuracy_hand_checked():
    q = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    t = np.array([[0, 1], [1, 0], [1, 0], [0, 2]], np.float32)  # rows 1 and 2 are identical
    np.testing.assert_array_equal(top1(l2_normalize(q), l2_normalize(t)), [1, 0, 0])
    # Line-index hits: query 2 duplicates query 1, its tie goes to target 1, so it is a miss.
    q2 = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
    assert top1_accuracy(q2, q2) == pytest.approx(200 / 3)


def test_mean_or_none():
    assert mean_or_none([1.0, 2.0]) == 1.5
    assert mean_or_none([1.0, None]) is None
    assert mean_or_none([]) is None


def test_hash_encoder_is_deterministic_and_sensible():
    sents = ["The cat sat.", "The cat sat.", "Le chat s'assit.", "", "数学"]
    e = hash_encode(sents)
    assert e.shape == (5, 256) and e.dtype == np.float32
    np.testing.assert_array_equal(e[0], e[1])
    np.testing.assert_array_equal(e, HashEncoder().encode(sents, batch_size=2, max_length=3))
    # Brute force: count each n-gram of the bounded string; the L1 mass equals the number of
    # n-grams whenever no two of them collide with opposite signs, which holds here.
    s = "\x02The cat sat.\x03"
    n_grams = sum(len(s) - g + 1 for g in (1, 2, 3))
    assert np.abs(e[0]).sum() <= n_grams and e[0].sum() % 1 == 0
    assert abs(cosine_matrix(l2_normalize(e[:1]), l2_normalize(e[2:3]))[0, 0]) < 0.9
    assert np.abs(e[3]).sum() > 0  # the empty sentence still has boundary n-grams
