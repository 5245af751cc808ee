"""`python -m mst5_jax.convert`: move a model between the formats people use.

    python -m mst5_jax.convert --input HF_DIR [--adapter PEFT_DIR] --to st --output ST_DIR
    python -m mst5_jax.convert --input ST_DIR --to hf --output HF_DIR
    python -m mst5_jax.convert --input RUN_DIR [--step latest|best|N] --to hf|peft|st --output OUT
    python -m mst5_jax.convert --input PEFT_DIR [--base HF_DIR] --to hf --output MERGED_DIR

Inputs (detected from the directory):
- `hf`: a Hugging Face T5/mT5 directory (config.json, weights, tokenizer), optionally
  with `--adapter` (a PEFT LoRA directory);
- `st`: a sentence-transformers directory (modules.json);
- `run`: a training run's MODEL_DIR (orbax checkpoints under `checkpoints/`);
- `peft`: a PEFT adapter directory (adapter_config.json); its base is `--base`, or the
  adapter's `base_model_name_or_path`.

Outputs (`--to`):
- `hf`: config.json + model.safetensors + tokenizer, LoRA merged (transformers' and
  this project's loaders read it). The HF layout has no place for a Dense projection,
  so a model with one (sentence-t5) must go to `st`.
- `st`: a directory `SentenceTransformer(path)` loads (LoRA merged).
- `peft`: the LoRA factors as a PEFT adapter directory whose `base_model_name_or_path`
  points at the base (the run's `base/` copy or the HF directory it was trained on).

Every output gets a README.md model card naming its inputs and their licences, and the
most restrictive one in its front matter: the m-ST5 adapter (pkshatech/m-ST5) and XNLI
(the training data of m-ST5 and of this project's XNLI tasks) are CC BY-NC 4.0; mT5 and T5
are Apache-2.0. A run's training data comes from the task its run.json records
(`TASK_DATASETS`); its base model is named only when it had one (not when it was trained
from random initialisation). `--license` adds a licence the inputs do not state.

The output directory is written beside its final place and renamed there once complete; an
existing output is refused without `--overwrite`, and an output equal to an input is refused.

T5X checkpoints (Google's native `gs://t5-data/pretrained_models/t5x/mt5_*`) are not read
here. Route: convert them to Hugging Face format first with transformers' script
`python -m transformers.models.t5.convert_t5x_checkpoint_to_pytorch
--t5x_checkpoint_path CKPT --config_file config.json --pytorch_dump_path OUT` (needs
t5x/jax), or use the already converted `google/mt5-*` hub checkpoints, then read that
directory as `hf`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
from typing import Optional, Sequence

from mst5_jax.utils import cli

log = logging.getLogger("mst5_jax.convert")

KINDS_IN = ("hf", "st", "run", "peft")
KINDS_OUT = ("hf", "st", "peft")
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


class ConvertError(cli.UserError, ValueError):
    """A conversion that cannot be done as asked (the message says why and what to do)."""


def detect_kind(path: pathlib.Path) -> str:
    """'st' | 'run' | 'peft' | 'hf' for a directory; T5X checkpoints get a routed error."""
    if not path.is_dir():
        raise ConvertError(f"{path}: not a directory")
    if (path / "modules.json").is_file():
        return "st"
    if (path / "checkpoints").is_dir() and (path / "run.json").is_file():
        return "run"
    if (path / "adapter_config.json").is_file():
        return "peft"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "checkpoint").is_file() or list(path.glob("checkpoint_*")) or (path / "_METADATA").is_file():
        raise ConvertError(f"{path}: looks like a T5X checkpoint, which is not supported; " + T5X_ROUTE)
    raise ConvertError(f"{path}: not a model directory (no modules.json, run.json + checkpoints/, "
                       "adapter_config.json or config.json)")


T5X_ROUTE = ("convert it to Hugging Face format with `python -m transformers.models.t5."
             "convert_t5x_checkpoint_to_pytorch --t5x_checkpoint_path CKPT --config_file config.json "
             "--pytorch_dump_path OUT` (or use the google/mt5-* hub checkpoints) and pass that directory")


# ---------------------------------------------------------------------- licences
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


# ---------------------------------------------------------------------- conversion
def load_input(args) -> tuple[object, dict, Optional[dict], Optional[str]]:
    """(SentenceEncoder, {role: name}, run_info or None, base reference for a peft output)."""
    from mst5_jax.inference.encoder import SentenceEncoder

    inp = pathlib.Path(args.input)
    kind = args.input_kind or detect_kind(inp)
    if kind not in KINDS_IN:
        raise ConvertError(f"--from {kind}: expected one of {KINDS_IN}")
    sources: dict[str, Optional[str]] = {}
    run_info = None
    base_ref = None
    if kind == "run":
        from mst5_jax.formats import run_dir

        run_info = run_dir.read_run_info(inp)
        enc = SentenceEncoder.from_pretrained(inp, step=args.step, dtype="float32")
        base = run_info.get("base") or {}
        if base.get("random_init"):
            # No base model: a LoRA run keeps its random base weights in RUN/base (a peft
            # output points there); a full fine-tune has none.
            base_ref = str((inp / base["path"]).resolve()) if (inp / base.get("path", "base")).is_dir() else None
            sources = {"training run": str(inp.resolve())}
        else:
            base_ref = base.get("path")
            sources = {"training run": str(inp.resolve()), "base": base_ref}
    elif kind == "peft":
        cfg = json.loads((inp / "adapter_config.json").read_text())
        base_ref = args.base or cfg.get("base_model_name_or_path")
        if not base_ref:
            raise ConvertError(f"{inp / 'adapter_config.json'}: no base_model_name_or_path; pass --base HF_DIR")
        enc = SentenceEncoder.from_pretrained(base_ref, adapter=inp, dtype="float32")
        sources = {"base": base_ref, "adapter": str(args.input)}
    else:
        if args.base:
            raise ConvertError("--base is for a peft adapter input")
        enc = SentenceEncoder.from_pretrained(inp, adapter=args.adapter, dtype="float32")
        base_ref = str(inp.resolve())
        sources = {"model": str(args.input), "adapter": args.adapter}
    return enc, sources, run_info, base_ref


def convert(args) -> pathlib.Path:
    """Writes `args.output` (see the module docstring); returns its path."""
    out = cli.check_output(args.output, [args.input, args.adapter, args.base], args.overwrite)
    try:
        enc, sources, run_info, base_ref = load_input(args)
    except ConvertError:
        raise
    except ValueError as e:  # the loaders' bad-weights/config errors (CheckpointError, LoRAError, JSON, ...)
        raise ConvertError(f"{e}; pass a model directory that loads with SentenceEncoder.from_pretrained") from e
    to = args.to
    if to == "hf" and enc.config.projection_dim:
        raise ConvertError(f"{args.input}: the model has a Dense projection ({enc.config.d_model} -> "
                           f"{enc.config.projection_dim}), which the Hugging Face layout cannot hold; "
                           "convert with --to st instead")
    from mst5_jax.core import lora

    if to == "peft" and not lora.has_lora(enc.model):
        raise ConvertError(f"{args.input}: the model has no LoRA factors to write as a PEFT adapter "
                           "(a full fine-tune goes --to hf or --to st)")
    tmp = out.with_name(f".{out.name}.convert-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(enc, to, tmp, base_ref, args)
        licences = input_licences(sources, run_info) + [("added by --license", "(user)", l) for l in args.license]
        random_init = bool(run_info and (run_info.get("base") or {}).get("random_init"))
        write_model_card(tmp, to, licences, "python -m mst5_jax.convert " + " ".join(map(shlex.quote, args.argv)),
                         enc, final=out, random_init=random_init)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%s)", out, to)
    return out


def _write(enc, to: str, out: pathlib.Path, base_ref: Optional[str], args) -> None:
    if to == "hf":
        if enc.config.normalize or enc.config.pooling != "mean":
            log.warning("%s: pooling=%s, normalize=%s are recorded in config.json's mst5_jax block, which "
                        "SentenceEncoder reads; plain transformers users must apply them themselves",
                        args.output, enc.config.pooling, enc.config.normalize)
        enc.save_pretrained(out, format="hf", merge_lora=True, dtype=args.dtype)
    elif to == "st":
        from mst5_jax.formats import st_format

        out.mkdir(parents=True, exist_ok=True)
        st_format.save(enc, out, merge_lora=True, max_seq_length=args.max_seq_length, dtype=args.dtype)
    else:
        from mst5_jax.formats import peft

        peft.save_peft_adapter(enc.model, out, base_model_name_or_path=base_ref)
        enc.tokenizer.save(out)


def _replace_dir(new: pathlib.Path, out: pathlib.Path) -> None:
    """Moves the complete `new` to `out`; an old `out` is removed only after the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


EXAMPLE = "python -m mst5_jax.convert --input /tmp/mst5_demo_cpu --to st --output /tmp/mst5_demo_cpu_st"


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m mst5_jax.convert", __doc__, example=EXAMPLE)
    ap.add_argument("--input", required=True, help="hf, st, run or peft directory")
    ap.add_argument("--from", dest="input_kind", default=None, choices=KINDS_IN, help="input kind; detected from the files when not given")
    ap.add_argument("--adapter", default=None, help="PEFT adapter applied to an hf/st input")
    ap.add_argument("--base", default=None, help="base model of a peft input; when not given, the adapter's base_model_name_or_path")
    ap.add_argument("--step", default="latest", help="run input: latest, best or a step number")
    ap.add_argument("--to", required=True, choices=KINDS_OUT, help="output format")
    ap.add_argument("--output", required=True, help="output directory (must not exist, unless --overwrite)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="stored weight dtype; when not given, the input's")
    ap.add_argument("--max_seq_length", type=int, default=512, help="st output: sentence_bert_config max_seq_length")
    ap.add_argument("--license", action="append", default=[], help="a licence to add to the model card (repeatable)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --output, once the new one is complete")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = cli.argv_list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    cli.setup_logging(args.verbose)
    return cli.run(lambda: convert(args) and 0, "python -m mst5_jax.convert", debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
