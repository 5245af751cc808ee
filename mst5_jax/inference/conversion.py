"""Moving a model between formats: detect what a directory holds, load it, write it as another.

See `python -m mst5_jax.convert --help` (mst5_jax/convert.py) for the directions. The output
directory is written beside its final place and renamed there once complete.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shlex
import shutil
from typing import Optional

from mst5_jax.core import lora
from mst5_jax.formats import peft, run_dir, st_format
from mst5_jax.formats.model_card import input_licences, write_model_card
from mst5_jax.inference.encoder import SentenceEncoder
from mst5_jax.utils import cli

log = logging.getLogger(__name__)

KINDS_IN = ("hf", "st", "run", "peft")
KINDS_OUT = ("hf", "st", "peft")

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

def load_input(args) -> tuple[object, dict, Optional[dict], Optional[str]]:
    """(SentenceEncoder, {role: name}, run_info or None, base reference for a peft output)."""

    inp = pathlib.Path(args.input)
    kind = args.input_kind or detect_kind(inp)
    if kind not in KINDS_IN:
        raise ConvertError(f"--from {kind}: expected one of {KINDS_IN}")
    sources: dict[str, Optional[str]] = {}
    run_info = None
    base_ref = None
    if kind == "run":

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

        out.mkdir(parents=True, exist_ok=True)
        st_format.save(enc, out, merge_lora=True, max_seq_length=args.max_seq_length, dtype=args.dtype)
    else:

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

