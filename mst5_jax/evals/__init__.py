"""Evaluators: each takes ``encode(list[str]) -> np.ndarray [n, d]`` and returns a JSON-ready dict.

Scores are percent (retrieval, mining F1) or Spearman x 100 (STS). Every result has a
``"meta"`` entry: the data files read with their sha256, the date, package versions, and
max_length / batch_size / device when the caller passes them (else null).
"""
from mst5_jax.evals.bucc import bucc
from mst5_jax.evals.hash_encoder import HashEncoder, hash_encode
from mst5_jax.evals.retrieval import jsick_retrieval, xnli_retrieval
from mst5_jax.evals.sts import atec, bq, jsick, jsts, korsts, lcqmc, stsb_en, stsb_zh, xsts
from mst5_jax.evals.tatoeba import tatoeba

# Task name (as the evaluate CLI spells it) -> evaluator.
EVALUATORS = {
    "tatoeba": tatoeba,
    "bucc": bucc,
    "xsts": xsts,
    "jsts": jsts,
    "jsick": jsick,
    "jsick_retrieval": jsick_retrieval,
    "stsb_zh": stsb_zh,
    "korsts": korsts,
    "stsb_en": stsb_en,
    "lcqmc": lcqmc,
    "bq": bq,
    "atec": atec,
    "xnli_retrieval": xnli_retrieval,
}

__all__ = ["EVALUATORS", "HashEncoder", "hash_encode", *EVALUATORS]
