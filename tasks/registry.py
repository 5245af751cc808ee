"""The triplet task registry (TensorFlow-free); `tasks.seqio_tasks` mirrors it into seqio.

A task is a name plus ``build(split, data_dir, seed) -> list[Triplet]``; a mixture is a
list of task names whose triplets are concatenated (mSimCSE concatenates its sets and
shuffles the union). Names registered here:

* ``mst5_xnli_mono_<lang>`` (15) and the mixture ``mst5_xnli_mono``: monolingual triplets.
* ``mst5_xnli_cross``: mSimCSE's cross-lingual recipe (`triplets.cross_triplets`).
* ``mst5_nli_en``: English SNLI + MultiNLI train triplets (TFDS or local files).
* ``mst5_nli_en_xnli``: the offline English set from XNLI (its own name, never a fallback).
* mixture ``mst5_msimcse_cross_all`` = ``mst5_xnli_cross`` + ``mst5_nli_en``.
* ``mst5_xnli_parallel``: translation pairs (`triplets.parallel_triplets`; not the paper's).
* ``mst5_demo_cpu``: the CPU demo's data, ``mst5_xnli_cross`` + ``mst5_xnli_parallel``
  concatenated into ONE task (`register_concatenated_task`), so that the seqio and numpy
  pipelines give the demo identical batches (a seqio mixture would sample the two by rate).

Splits are ``train`` and ``validation``; which files they read is `settings.train_source`.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable, Optional, Sequence

from tasks import settings, sources
from tasks.triplets import (XNLI_LANGUAGES, AlignedNli, Triplet, concat, cross_triplets, mono_triplets,
                            parallel_triplets, triplets_from_rows)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "eval": "validation"}
BuildFn = Callable[[str, pathlib.Path, int], list[Triplet]]


@dataclasses.dataclass(frozen=True)
class TripletTask:
    """`build(split, data_dir, seed)` returns the task's triplets in canonical order.

    `group_space` names the id space of `Triplet.group_id`: mixtures keep the ids of tasks
    in one space (e.g. every XNLI language of one split) and offset the others.
    """
    name: str
    build: BuildFn
    description: str = ""
    splits: tuple[str, ...] = SPLITS
    group_space: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TripletMixture:
    name: str
    task_names: tuple[str, ...]
    description: str = ""


TASKS: dict[str, TripletTask] = {}
MIXTURES: dict[str, TripletMixture] = {}
_listeners: list[Callable[[object], None]] = []


def normalize_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or {sorted(_SPLIT_ALIASES)}), got {split!r}")
    return s


def _notify(item) -> None:
    for fn in _listeners:
        fn(item)


def add_listener(fn: Callable[[object], None]) -> None:
    """Calls `fn(task_or_mixture)` for everything registered so far and from now on."""
    _listeners.append(fn)
    for item in [*TASKS.values(), *MIXTURES.values()]:
        fn(item)


def register_triplet_task(name: str, build: BuildFn, *, description: str = "",
                          splits: Sequence[str] = SPLITS, group_space: Optional[str] = None) -> TripletTask:
    """Registers a triplet task (and its seqio twin when seqio is imported).

    Args:
      name: unique task name.
      build: ``build(split, data_dir, seed) -> list[Triplet]``, deterministic for given
        arguments; see `tasks.triplets` for the helpers that make triplets from rows.
      splits: the split names `build` accepts.
    """
    if name in TASKS or name in MIXTURES:
        raise ValueError(f"a task or mixture named {name!r} is already registered")
    task = TripletTask(name, build, description, tuple(splits), group_space or name)
    TASKS[name] = task
    _notify(task)
    return task


def register_triplet_mixture(name: str, task_names: Sequence[str], *, description: str = "") -> TripletMixture:
    """Registers a mixture: the concatenation of its tasks' triplets, in the given order."""
    if name in TASKS or name in MIXTURES:
        raise ValueError(f"a task or mixture named {name!r} is already registered")
    unknown = [t for t in task_names if t not in TASKS]
    if unknown:
        raise KeyError(f"mixture {name!r}: unknown tasks {unknown}")
    mix = TripletMixture(name, tuple(task_names), description)
    MIXTURES[name] = mix
    _notify(mix)
    return mix


def register_concatenated_task(name: str, task_names: Sequence[str], *, description: str = "") -> TripletTask:
    """Registers a task whose triplets are `task_names`' triplets concatenated in order, with
    the group ids a mixture of them gets (`get_triplets`). Unlike a mixture, it is one task
    for seqio too, so both pipelines visit it in the same order."""
    unknown = [t for t in task_names if t not in TASKS]
    if unknown:
        raise KeyError(f"concatenated task {name!r}: unknown tasks {unknown}")
    names = tuple(task_names)

    def build(split: str, data_dir: pathlib.Path, seed: int) -> list[Triplet]:
        return concat((TASKS[t].group_space.format(split=split), _build(TASKS[t], split, data_dir, seed))
                      for t in names)

    spaces = {TASKS[t].group_space for t in names}
    return register_triplet_task(name, build, description=description,
                                 splits=tuple(s for s in SPLITS if all(s in TASKS[t].splits for t in names)),
                                 group_space=spaces.pop() if len(spaces) == 1 else None)


def mixture_group_offsets(name: str, split: str, data_dir: Optional[pathlib.Path] = None,
                          seed: int = 0) -> dict[str, int]:
    """{task name: the offset `get_triplets` adds to its group ids} for mixture `name`
    (`triplets.concat`'s rule: tasks of one group space share ids; each new space starts
    past every id used so far). seqio's mixing applies the same offsets."""
    split = normalize_split(split)
    data_dir = settings.resolve_data_dir(data_dir)
    offsets: dict[str, int] = {}
    spaces: dict[str, int] = {}
    next_free = 0
    for t in MIXTURES[name].task_names:
        space = TASKS[t].group_space.format(split=split)
        if space not in spaces:
            spaces[space] = next_free
        offsets[t] = spaces[space]
        part = _build(TASKS[t], split, data_dir, seed)
        next_free = max(next_free, offsets[t] + 1 + max((x.group_id for x in part), default=-1))
    return offsets


def task_names() -> list[str]:
    return sorted([*TASKS, *MIXTURES])


def get_triplets(name: str, split: str = "train", data_dir: Optional[pathlib.Path] = None,
                 seed: int = 0) -> list[Triplet]:
    """The triplets of a task, or of a mixture (its tasks' triplets concatenated in order)."""
    split = normalize_split(split)
    data_dir = settings.resolve_data_dir(data_dir)
    if name in MIXTURES:
        return concat((TASKS[t].group_space.format(split=split), _build(TASKS[t], split, data_dir, seed))
                      for t in MIXTURES[name].task_names)
    if name not in TASKS:
        raise KeyError(f"unknown task or mixture {name!r}; registered: {task_names()}")
    return _build(TASKS[name], split, data_dir, seed)


def _build(task: TripletTask, split: str, data_dir: pathlib.Path, seed: int) -> list[Triplet]:
    if split not in task.splits:
        raise ValueError(f"task {task.name!r} has splits {task.splits}, not {split!r}")
    triplets = task.build(split, data_dir, seed)
    if not triplets:
        raise ValueError(f"task {task.name!r} split {split!r} produced no triplets from {data_dir}")
    return triplets


# --------------------------------------------------------------------------- XNLI
def load_xnli(split: str, data_dir: pathlib.Path, source: Optional[str] = None) -> AlignedNli:
    """The aligned XNLI data behind `split` under `source` (default `settings.train_source`)."""
    split = normalize_split(split)
    source = source or settings.get().train_source
    tfds_dir = settings.get().tfds_data_dir
    if source == "xnli_local":
        return sources.read_xtreme_xnli(data_dir, "test" if split == "train" else "dev")
    if source == "xnli_mt":
        if split == "train":
            return sources.read_xnli_mt(data_dir)
        return sources.read_xtreme_xnli(data_dir, "dev")
    if source == "xtreme_mt":
        if split == "train":
            return sources.read_tfds_xnli("xtreme_xnli", "train", tfds_dir)
        return sources.read_tfds_xnli("xnli", "validation", tfds_dir)
    if source == "xnli_tfds":
        return sources.read_tfds_xnli("xnli", "test" if split == "train" else "validation", tfds_dir)
    if source == "xnli1_local":
        return sources.read_xnli1(data_dir, "test" if split == "train" else "dev")
    raise ValueError(f"unknown train_source {source!r}; expected one of {settings.TRAIN_SOURCES}")


def _mono_builder(lang: str) -> BuildFn:
    def build(split: str, data_dir: pathlib.Path, seed: int) -> list[Triplet]:
        del seed  # monolingual triplets are not random
        return mono_triplets(load_xnli(split, data_dir), lang)
    return build


def _cross(split: str, data_dir: pathlib.Path, seed: int) -> list[Triplet]:
    return cross_triplets(load_xnli(split, data_dir), seed=seed, langs=XNLI_LANGUAGES)


def _parallel(split: str, data_dir: pathlib.Path, seed: int) -> list[Triplet]:
    return parallel_triplets(load_xnli(split, data_dir), seed=seed, langs=XNLI_LANGUAGES)


def _nli_en(split: str, data_dir: pathlib.Path, seed: int) -> list[Triplet]:
    """SNLI train + MultiNLI train (validation: SNLI validation + MNLI validation_matched)."""
    del seed
    src = settings.get().nli_en_source
    parts = []
    for corpus, tfds_split, local_split in (("snli", {"train": "train", "validation": "validation"}[split],
                                             {"train": "train", "validation": "dev"}[split]),
                                            ("multi_nli", {"train": "train", "validation": "validation_matched"}[split],
                                             {"train": "train", "validation": "dev_matched"}[split])):
        if src == "tfds":
            try:
                rows = sources.read_tfds_nli(corpus, tfds_split, settings.get().tfds_data_dir)
            except (FileNotFoundError, ImportError) as e:
                raise FileNotFoundError(
                    f"mst5_nli_en: source TFDS {corpus!r} ({tfds_split}) is missing: {e}. Prepare it with "
                    f"tfds, or call tasks.configure(nli_en_source='local') with files at "
                    f"{[str(p) for p in sources.english_nli_paths(data_dir, corpus, local_split)]}. "
                    "For the offline English set from XNLI use the task 'mst5_nli_en_xnli'.") from e
        else:
            rows = sources.read_local_english_nli(data_dir, corpus, local_split)
        parts.append((corpus, triplets_from_rows(rows, "en")[0]))
    return concat(parts)


def _register_builtin() -> None:
    for lang in XNLI_LANGUAGES:
        register_triplet_task(f"mst5_xnli_mono_{lang}", _mono_builder(lang), group_space="xnli:{split}",
                              description=f"XNLI monolingual {lang} triplets (premise, entailment, contradiction)")
    register_triplet_mixture("mst5_xnli_mono", [f"mst5_xnli_mono_{lang}" for lang in XNLI_LANGUAGES],
                             description="XNLI monolingual triplets in all 15 languages")
    register_triplet_task("mst5_xnli_cross", _cross, group_space="xnli:{split}",
                          description="mSimCSE cross-lingual XNLI triplets (independent positive/negative languages)")
    register_triplet_task("mst5_nli_en", _nli_en, group_space="nli_en:{split}",
                          description="English SNLI + MultiNLI triplets")
    register_triplet_task("mst5_nli_en_xnli", _mono_builder("en"), group_space="xnli:{split}",
                          description="English triplets from the XNLI files (offline English set)")
    register_triplet_mixture("mst5_msimcse_cross_all", ["mst5_xnli_cross", "mst5_nli_en"],
                             description="mSimCSE's training set: cross-lingual XNLI + English NLI")
    register_triplet_task("mst5_xnli_parallel", _parallel, group_space="xnli:{split}",
                          description="XNLI premise translation pairs (not part of the paper's recipe)")
    register_concatenated_task("mst5_demo_cpu", ["mst5_xnli_cross", "mst5_xnli_parallel"],
                               description="The CPU demo's data: mst5_xnli_cross plus mst5_xnli_parallel "
                                           "translation pairs, concatenated (not the paper's recipe)")


_register_builtin()
