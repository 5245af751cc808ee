"""m-ST5 triplet tasks: the registry, local/TFDS sources and the batch pipelines.

Importing `tasks` registers every task and mixture (`tasks.registry`); when seqio is
importable it also registers them with seqio (`tasks.seqio_tasks`), so
``seqio.get_mixture_or_task("mst5_xnli_cross")`` works after ``import tasks``. Without
seqio/TensorFlow (the GPU image) the TF-free parts work: `tasks.triplets`,
`tasks.sources` (local files), `tasks.registry` and `tasks.pipeline.TripletIterator`.
Set ``MST5_NO_SEQIO=1`` to skip the seqio registration (and the TensorFlow import).

Register your own task in a few lines (see docs/DATA.md)::

    import tasks
    def build(split, data_dir, seed):
        rows = tasks.read_nli_file(data_dir / "my_nli" / f"{split}.tsv")
        return tasks.triplets_from_rows(rows)[0]
    tasks.register_triplet_task("my_nli", build)
"""
import os as _os

from tasks import settings
from tasks.registry import (MIXTURES, TASKS, get_triplets, register_triplet_mixture, register_triplet_task,
                            task_names)
from tasks.settings import configure
from tasks.sources import read_nli_file
from tasks.triplets import NliRow, Triplet, triplets_from_rows

__all__ = ["MIXTURES", "TASKS", "NliRow", "Triplet", "configure", "get_triplets", "read_nli_file",
           "register_triplet_mixture", "register_triplet_task", "settings", "task_names", "triplets_from_rows"]

SEQIO_REGISTERED = False
if _os.environ.get("MST5_NO_SEQIO", "") not in ("1", "true", "True"):
    try:
        import seqio as _seqio  # noqa: F401
    except ImportError:
        _seqio = None
    if _seqio is not None:
        from tasks import seqio_tasks as _seqio_tasks
        _seqio_tasks.register_all()
        SEQIO_REGISTERED = True
