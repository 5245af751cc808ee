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
import logging
from typing import Optional, Sequence

from mst5_jax.inference.conversion import KINDS_IN, KINDS_OUT, convert
from mst5_jax.utils import cli

log = logging.getLogger("mst5_jax.convert")

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
