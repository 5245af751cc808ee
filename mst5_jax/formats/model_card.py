"""Model cards: the licences and datasets behind a model, and the README.md front matter.

The m-ST5 adapter (pkshatech/m-ST5) and XNLI (the training data of m-ST5 and of this
project's XNLI tasks) are CC BY-NC 4.0; mT5 and T5 are Apache-2.0. A run's training data
comes from the task its run.json records (`TASK_DATASETS`); its base model is named only
when it had one (not when it was trained from random initialisation). The card's front
matter states the most restrictive licence of all inputs.
"""
from __future__ import annotations

import datetime
import pathlib
import re
from typing import Optional, Sequence

CC_BY_NC = "cc-by-nc-4.0"
APACHE = "apache-2.0"
CC_BY_SA = "cc-by-sa-4.0"
_RESTRICTIVENESS = [CC_BY_NC, CC_BY_SA, "cc-by-4.0", APACHE, "mit"]

DATASET_LICENCES = {
    "XNLI": CC_BY_NC,  # XNLI 1.0 and XNLI-MT-1.0 (its machine-translated MultiNLI train set)
    "SNLI": CC_BY_SA,
    "MultiNLI": "other (OANC's licence; parts CC BY-SA 3.0)",
}
TASK_DATASETS = {
    "mst5_xnli_cross": ("XNLI",), "mst5_xnli_mono": ("XNLI",), "mst5_nli_en_xnli": ("XNLI",),
    "mst5_xnli_parallel": ("XNLI",), "mst5_nli_en": ("SNLI", "MultiNLI"),
    "mst5_msimcse_cross_all": ("XNLI", "SNLI", "MultiNLI"), "mst5_demo_cpu": ("XNLI",),
}
"""Datasets each built-in task or mixture of tasks/registry.py reads (mst5_xnli_mono_<lang>:
XNLI). Kept here because importing `tasks` pulls in seqio and TensorFlow;
tests/test_convert.py checks it against the registry."""


def task_datasets(task: str) -> Optional[tuple[str, ...]]:
    """The datasets a built-in task reads, or None for a task this table does not know."""
    if task.startswith("mst5_xnli_mono_"):
        return ("XNLI",)
    return TASK_DATASETS.get(task)


def _card_license(directory: pathlib.Path) -> Optional[str]:
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    m = re.match(r"---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    if m:
        lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M)
        if lic:
            return lic.group(1).strip("'\"").lower()
    return None


def input_licences(sources: dict[str, Optional[str]], run_info: Optional[dict] = None) -> list[tuple[str, str, str]]:
    """(role, name, licence) for every input: model-card front matter, else known names.

    Known names: an m-ST5 adapter (pkshatech/m-ST5, by name) and XNLI training data (a run
    whose task mentions xnli, and m-ST5 itself) are CC BY-NC 4.0; mT5/T5 bases Apache-2.0.
    """
    out = []
    for role, name in sources.items():
        if not name:
            continue
        p = pathlib.Path(name)
        lic = _card_license(p) if p.is_dir() else None
        hub = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)  # a hub id's local cache snapshot
        low = (f"{hub.group(1)}/{hub.group(2)}" if hub else name).lower()
        if lic is None and "m-st5" in low:
            lic = CC_BY_NC
        if lic is None and re.match(r"(mt5|t5)([-_.]|$)", low.rstrip("/").rsplit("/", 1)[-1]):
            lic = APACHE  # google/mt5-*, t5-*, t5-v1_1-*
        out.append((role, name, lic or "unknown (not stated in the input)"))
        if "m-st5" in low:
            out.append(("training data of " + role, "XNLI (via m-ST5)", CC_BY_NC))
    if run_info is not None:
        task = str(run_info.get("task") or "")
        datasets = task_datasets(task)
        if datasets is None:
            out.append(("training data", f"task {task or '(not recorded)'}",
                        "unknown (not a built-in task: state its data's licence with --license)"))
        for d in datasets or ():
            out.append(("training data", f"{d} (task {task})", DATASET_LICENCES[d]))
    return out


def most_restrictive(licences: Sequence[str]) -> str:
    known = [l for l in licences if l in _RESTRICTIVENESS]
    if CC_BY_NC in licences:
        return CC_BY_NC
    if len(set(licences)) == 1 and known:
        return known[0]
    return min(known, key=_RESTRICTIVENESS.index) if known and len(known) == len(licences) else "other"


def write_model_card(out: pathlib.Path, kind_out: str, licences: list[tuple[str, str, str]], command: str,
                     encoder, final: Optional[pathlib.Path] = None, random_init: bool = False) -> None:
    """README.md in `out`, describing the model as it will be found at `final` (default `out`)."""
    final = final or out
    lic = most_restrictive([l for _, _, l in licences])
    cfg = encoder.config
    rows = "\n".join(f"| {role} | `{name}` | {l} |" for role, name, l in licences)
    nc = ("\n**Non-commercial use only**: at least one input is licensed CC BY-NC 4.0, and so is this "
          "derived model.\n" if lic == CC_BY_NC else "")
    use = {
        "hf": f'from mst5_jax import SentenceEncoder\nenc = SentenceEncoder.from_pretrained("{final}")',
        "st": f'from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer("{final}")',
        "peft": (f'from mst5_jax import SentenceEncoder\nenc = SentenceEncoder.from_pretrained(BASE, adapter="{final}")'),
    }[kind_out]
    text = f"""---
license: {lic}
library_name: {"sentence-transformers" if kind_out == "st" else ("peft" if kind_out == "peft" else "transformers")}
tags: [sentence-embeddings, mst5_jax]
---
# {final.name}

Written by `mst5_jax.convert` on {datetime.date.today().isoformat()} ({kind_out} format).
Encoder: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.feed_forward} feed-forward,
{cfg.pooling} pooling{f", projection to {cfg.projection_dim}" if cfg.projection_dim else ""}{", L2-normalised" if cfg.normalize else ""}; embedding width {cfg.embedding_dim}.
{"Trained from random initialisation: there is no pretrained base model." if random_init else ""}

## Inputs and licences
| role | input | licence |
|---|---|---|
{rows}
{nc}
## Use
```python
{use}
```

## How it was made
```
{command}
```
"""
    (out / "README.md").write_text(text, encoding="utf-8")


