"""Run MTEB tasks on a `SentenceEncoder` (mteb comes with the `[mteb]` and `[test]` extras).

    import mteb
    from mst5_jax import SentenceEncoder
    from mst5_jax.evals.mteb_adapter import MTEBEncoder

    model = MTEBEncoder(SentenceEncoder.from_pretrained(path, adapter=adapter), name="m-ST5-jax")
    tasks = mteb.get_tasks(tasks=["Tatoeba", "BUCC", "STS17"])
    results = mteb.evaluate(model, tasks)           # mteb >= 2  (mteb 1.x: mteb.MTEB(tasks).run(model))

`MTEBEncoder` speaks both encoder protocols mteb has used:
- mteb 1.x: `encode(sentences: list[str], *, task_name, prompt_type=None, **kw) -> ndarray`;
- mteb 2.x: `encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset,
  prompt_type=None, **kw) -> ndarray`, where every batch is a dict whose "text" entry is
  a list of strings;
plus `similarity(a, b)` (cosine matrix) and `similarity_pairwise(a, b)` (row-wise cosine),
which mteb 2 calls for scoring; they are the cosines `mst5_jax.evals` scores with, so
mteb's bitext top-1 and its STS `spearman` see exactly our numbers (its STS
`cosine_spearman` uses sklearn's own cosine). m-ST5 uses no prompts, so `prompt_type`
(query/passage) is accepted and ignored. Embeddings are float32, not normalised (mteb normalises where its
metric needs it), so scores equal the ones `SentenceTransformer` would get from the same
weights.

How mteb's Tatoeba and BUCC differ from the mSimCSE / m-ST5 protocol (`mst5_jax.evals`):
see docs/USING.md, "MTEB".
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from mst5_jax.evals.mining import cosine_matrix, l2_normalize, paired_cosine

log = logging.getLogger(__name__)


def _texts_from_batches(inputs: Iterable[Any]) -> list[str]:
    texts: list[str] = []
    for batch in inputs:
        if isinstance(batch, dict):
            if "text" not in batch:
                raise TypeError(f"mteb batch has no 'text' entry (keys {sorted(batch)}); only text tasks are supported")
            part = batch["text"]
        else:
            part = batch
        if isinstance(part, str):
            part = [part]
        texts.extend(part)
    return texts


class MTEBEncoder:
    """Wraps a `SentenceEncoder` (or anything with `encode(list[str], batch_size=, max_length=)`) for mteb.

    Args:
      encoder: the encoder.
      name: model name mteb records in its results.
      batch_size / max_length: passed to `encoder.encode`.
      revision: recorded with the name.
    """

    def __init__(self, encoder, name: str = "mst5_jax", batch_size: int = 64, max_length: int = 512,
                 revision: Optional[str] = None):
        self.encoder = encoder
        self.name = name
        self.revision = revision
        self.batch_size = batch_size
        self.max_length = max_length
        self.model_card_data = {"model_name": name}

    @property
    def mteb_model_meta(self):
        """mteb's `ModelMeta` carrying `name` and `revision` (None when mteb is absent).

        mteb 2 falls back to an anonymous "no_model_name/available" entry for a model
        without one, so its results would not say which model produced them.
        """
        try:
            from mteb.models import ModelMeta
        except ImportError:  # mteb 1.x keeps it elsewhere, or mteb is absent
            try:
                from mteb.model_meta import ModelMeta
            except ImportError:
                return None
        if hasattr(ModelMeta, "create_empty"):  # mteb >= 2: every other field stays unknown (None)
            return ModelMeta.create_empty(overwrites={"name": self.name, "revision": self.revision})
        try:
            return ModelMeta(name=self.name, revision=self.revision, release_date=None, languages=None)
        except Exception as e:  # the required fields differ between mteb 1.x versions
            log.debug("ModelMeta(%s) not built: %s", self.name, e)
            return None

    def encode(self, inputs: Sequence[str] | Iterable[Any], *args: Any, task_name: Optional[str] = None,
               task_metadata: Any = None, prompt_type: Any = None, batch_size: Optional[int] = None,
               **kwargs: Any) -> np.ndarray:
        """float32 [n, d] embeddings of a list of strings (mteb 1) or of a DataLoader of batches (mteb 2)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and all(isinstance(s, str) for s in inputs):
            texts = list(inputs)
        else:
            texts = _texts_from_batches(inputs)
        emb = self.encoder.encode(texts, batch_size=batch_size or self.batch_size, max_length=self.max_length)
        return np.asarray(emb, dtype=np.float32)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine matrix [len(a), len(b)], float32: `mining.cosine_matrix`, as every evaluator here scores."""
        return cosine_matrix(l2_normalize(a), l2_normalize(b))

    @staticmethod
    def similarity_pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise cosine [n], float32, of a [n, d] and b [n, d]: `mining.paired_cosine`."""
        return paired_cosine(np.asarray(a), np.asarray(b))


def run(encoder, tasks: Sequence[str], name: str = "mst5_jax", output_folder: Optional[str] = None, **kwargs):
    """Runs mteb tasks (by name) on `encoder` and returns mteb's results. Needs `pip install mteb`.

    mteb >= 2: `mteb.evaluate(model, tasks, **kwargs)` (results go to mteb's cache; pass its
    own options in kwargs). mteb 1.x: `mteb.MTEB(tasks).run(model, output_folder=..., **kwargs)`.
    """
    try:
        import mteb
    except ImportError as e:
        raise ImportError("mst5_jax.evals.mteb_adapter.run needs mteb: pip install mteb (or the project's [eval] extra)") from e
    model = MTEBEncoder(encoder, name=name)
    task_objs = mteb.get_tasks(tasks=list(tasks))
    if hasattr(mteb, "evaluate"):
        if output_folder is not None:
            log.warning("mteb >= 2 writes results to its own cache; output_folder=%s is not used", output_folder)
        return mteb.evaluate(model, task_objs, **kwargs)
    return mteb.MTEB(tasks=task_objs).run(model, output_folder=output_folder, **kwargs)
