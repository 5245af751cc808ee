"""Evaluators: each takes ``encode(list[str]) -> np.ndarray [n, d]`` and returns a JSON-ready dict.

Scores are percent (retrieval, mining F1) or Spearman x 100 (STS). Every result has a
``"meta"`` entry: the data files read with their sha256, the date, package versions, and
max_length / batch_size / device when the caller passes them (else null).

Each task is registered once in `mst5_jax.evals.registry` (name, function, headline
score, table rows, languages); `EVALUATORS` is that registry's live name -> record map.
"""
from mst5_jax.evals.bucc import bucc
from mst5_jax.evals.hash_encoder import HashEncoder, hash_encode
from mst5_jax.evals.registry import Evaluator, register
from mst5_jax.evals.registry import registry as _registry
from mst5_jax.evals.retrieval import jsick_retrieval, xnli_retrieval
from mst5_jax.evals.sts import atec, bq, jsick, jsts, korsts, lcqmc, stsb_en, stsb_zh, xsts
from mst5_jax.evals.tatoeba import tatoeba

# Task name (as the evaluate CLI spells it) -> its `Evaluator` record (callable like the function).
EVALUATORS = _registry()

__all__ = ["EVALUATORS", "Evaluator", "register", "HashEncoder", "hash_encode", "tatoeba", "bucc", "xsts", "jsts",
           "jsick", "jsick_retrieval", "stsb_zh", "korsts", "stsb_en", "lcqmc", "bq", "atec", "xnli_retrieval"]
