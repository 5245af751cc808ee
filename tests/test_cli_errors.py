"""Every CLI user error of docs/RELIABILITY.md §5: a non-zero exit, no traceback, a message naming the problem.

Each case is an argv for one `python -m mst5_jax.X` CLI and a regex its stderr must match.
To keep this fast, the cases run in ONE subprocess that calls each CLI's `main(argv)` in
turn (JAX and the models are imported once); an exception escaping `main` is printed with
its traceback there, so it fails the "no Traceback" check as it would on the command line.
`test_entry_point_*` then runs one case per CLI through the real `python -m` entry point.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
           MST5_NO_SEQIO="1", PYTHONPATH=str(REPO))

RUNNER = r"""
import contextlib, importlib, io, json, sys, traceback
results = {}
from tasks import settings
for cid, module, argv in json.loads(sys.stdin.read()):
    settings.reset()  # process-wide task settings (gin's tasks.configure): a real CLI starts fresh
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = importlib.import_module("mst5_jax." + module).main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            rc = 1
    results[cid] = [rc, err.getvalue()]
print("RESULTS " + json.dumps(results))
"""

TINY_TRAIN = ["--gin_file=demo_cpu.gin"]


def _cases(tmp: pathlib.Path, tiny_model: pathlib.Path) -> list[tuple[str, str, list[str], str]]:
    """(id, CLI module, argv, regex the stderr must match)."""
    (tmp / "bad_macro.gin").write_text("include 'runs/demo_cpu.gin'\nBATCHSIZE = 16\n")
    (tmp / "unquoted.gin").write_text("include 'runs/demo_cpu.gin'\nMODEL_DIR = /tmp/y\n")
    run = tmp / "run"  # enough of a run directory for the "you passed checkpoints/" hint
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    no_config = tmp / "no_config"  # a tokenizer but no config.json
    no_config.mkdir()
    shutil.copy(tiny_model / "spiece.model", no_config / "spiece.model")
    (tmp / "in.txt").write_text("hello\nworld\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "exists.json").write_text("{}")
    (tmp / "exists.tsv").write_text("old\n")
    model_dir = f"--gin.MODEL_DIR='{tmp / 'train_out'}'"
    missing = str(tmp / "no_such_model")
    vocab = f"--gin.TrainConfig.vocab='{tiny_model / 'spiece.model'}'"
    t = [
        ("train_no_gin_file", "train", [], r"required: --gin_file"),
        ("train_gin_file_misspelt", "train", ["--gin_file", "demo_cpu.gi"],
         r"gin file 'demo_cpu.gi': not a path, and not found under .*demo_cpu\.gin"),
        ("train_unquoted_string_macro", "train", [*TINY_TRAIN, "--gin.MODEL_DIR=/tmp/x"],
         re.escape("""--gin.MODEL_DIR=/tmp/x: cannot parse '/tmp/x' as a gin value; strings are quoted: """
                   """--gin.MODEL_DIR="'/tmp/x'\"""")),
        ("train_unknown_macro_flag", "train", [*TINY_TRAIN, "--gin.BATCHSIZE=16"],
         r"--gin.BATCHSIZE=16: BATCHSIZE is not a macro of demo_cpu.gin"),
        ("train_unknown_macro_in_file", "train", [f"--gin_file={tmp / 'bad_macro.gin'}"],
         r"bad_macro.gin:2: macro BATCHSIZE is defined but no binding reads it"),
        ("train_unquoted_string_in_file", "train", [f"--gin_file={tmp / 'unquoted.gin'}"],
         r"unquoted.gin:2: MODEL_DIR = /tmp/y: cannot parse .* strings are quoted: MODEL_DIR = '/tmp/y'"),
        ("train_unknown_parameter", "train", [*TINY_TRAIN, "--gin.TrainConfig.no_such_field=3"],
         r"no_such_field"),
        ("train_batch_size_quoted", "train", [*TINY_TRAIN, "--gin.BATCH_SIZE='8'"],
         r"BATCH_SIZE='8': expected a positive integer \(unquoted\)"),
        ("train_batch_size_float", "train", [*TINY_TRAIN, "--gin.BATCH_SIZE=8.5"],
         r"BATCH_SIZE=8.5: expected a positive integer"),
        ("train_steps_negative", "train", [*TINY_TRAIN, "--gin.TRAIN_STEPS=-5"],
         r"TRAIN_STEPS=-5: expected a positive integer"),
        ("train_checkpoint_every_zero", "train", [*TINY_TRAIN, "--gin.CHECKPOINT_EVERY=0"],
         r"CHECKPOINT_EVERY=0: expected a positive integer"),
        ("train_log_every_zero", "train", [*TINY_TRAIN, "--gin.LOG_EVERY=0"],
         r"LOG_EVERY=0: expected a positive integer"),
        ("train_learning_rate_string", "train", [*TINY_TRAIN, "--gin.OptimizerConfig.learning_rate='abc'"],
         r"OptimizerConfig.learning_rate='abc': expected a positive number"),
        ("train_learning_rate_unquoted", "train", [*TINY_TRAIN, "--gin.OptimizerConfig.learning_rate=abc"],
         r"--gin.OptimizerConfig.learning_rate=abc: cannot parse 'abc' .*expected a number"),
        ("train_batch_not_divisible", "train", ["--gin_file=xxl_lora_tpu_pod.gin", "--gin.BATCH_SIZE=100", "--dry_run"],
         r"BATCH_SIZE=100 is not divisible by the data axes"),
        ("train_unknown_task", "train", [*TINY_TRAIN, model_dir, vocab, "--gin.MIXTURE_OR_TASK_NAME='nope'"],
         r"MIXTURE_OR_TASK_NAME: unknown task or mixture 'nope'; registered: .*mst5_xnli_cross"),
        ("train_missing_pretrained", "train", [*TINY_TRAIN, model_dir, f"--gin.TrainConfig.pretrained='{missing}'"],
         rf"{re.escape(missing)}: no such directory"),
        ("train_pretrained_without_config_json", "train",
         [*TINY_TRAIN, model_dir, f"--gin.TrainConfig.pretrained='{no_config}'"],
         r"TrainConfig.pretrained='.*no_config': .*no_config/config\.json is missing; pass a Hugging Face model folder"),
        ("study_one_size", "study", ["--sizes", "tiny-16", "--out", str(tmp / "study")],
         r"needs at least 2 sizes"),
        ("study_unknown_task", "study", ["--sizes", "tiny-16,tiny-32", "--tasks", "nope", "--out", str(tmp / "s")],
         r"unknown task\(s\) \['nope'\]; choose from"),
        ("study_task_kwargs_not_json", "study", ["--sizes", "tiny-16,tiny-32", "--task_kwargs", "{x",
                                                 "--out", str(tmp / "s")], r"--task_kwargs '\{x' is not JSON"),
        ("study_bad_macro", "study", ["--sizes", "tiny-16,tiny-32", "--recipe", "demo_cpu.gin", "--dry_run",
                                      "--out", str(tmp / "s"), "--gin.BATCH_SIZE=0"],
         r"BATCH_SIZE=0: expected a positive integer"),
        ("evaluate_no_model", "evaluate", ["--tasks", "xsts"], r"one of --model, --encoder or --compare"),
        ("evaluate_unknown_task", "evaluate", ["--encoder", "hash", "--tasks", "nope"], r"unknown task\(s\) \['nope'\]"),
        ("evaluate_output_exists", "evaluate", ["--encoder", "hash", "--tasks", "xsts", "--output",
                                                str(tmp / "exists.json")], r"exists\.json exists; pass --overwrite"),
        ("evaluate_missing_model", "evaluate", ["--model", missing, "--tasks", "xsts"],
         rf"{re.escape(missing)}: no such directory"),
        ("evaluate_checkpoints_folder", "evaluate", ["--model", str(run / "checkpoints"), "--tasks", "xsts"],
         r"config\.json is missing; this folder is inside the training run .*: pass the run folder itself"),
        ("encode_missing_input", "encode", ["--model", str(tiny_model), "--input", str(tmp / "nope.txt"),
                                            "--output", str(tmp / "o.npy")], r"nope\.txt"),
        ("encode_empty_input", "encode", ["--model", str(tiny_model), "--input", str(tmp / "empty.txt"),
                                          "--output", str(tmp / "o.npy")], r"empty\.txt is empty; pass --allow_empty"),
        ("encode_missing_model", "encode", ["--model", missing, "--input", str(tmp / "in.txt"),
                                            "--output", str(tmp / "o1.npy")], rf"{re.escape(missing)}: no such directory"),
        ("encode_checkpoints_folder", "encode", ["--model", str(run / "checkpoints" / "2"), "--input",
                                                 str(tmp / "in.txt"), "--output", str(tmp / "o2.npy")],
         r"pass the run folder itself"),
        ("mine_output_is_input", "mine", ["--src", str(tmp / "in.txt"), "--tgt", str(tmp / "in.txt"),
                                          "--output", str(tmp / "in.txt"), "--model", str(tiny_model)],
         r"--output .*in\.txt is the --src input"),
        ("mine_output_exists", "mine", ["--src", str(tmp / "in.txt"), "--tgt", str(tmp / "in.txt"),
                                        "--output", str(tmp / "exists.tsv")], r"exists\.tsv exists; pass --overwrite"),
        ("mine_no_model", "mine", ["--src", str(tmp / "in.txt"), "--tgt", str(tmp / "in.txt"),
                                   "--output", str(tmp / "pairs.tsv")], r"pass --model, or --src_emb and --tgt_emb"),
        ("convert_not_a_directory", "convert", ["--input", str(tmp / "in.txt"), "--to", "hf",
                                                "--output", str(tmp / "conv")], r"in\.txt: not a directory"),
        ("serve_missing_model", "serve", ["--model", missing], rf"{re.escape(missing)}: no such directory"),
    ]
    return t


def _case_ids() -> list[str]:
    """The case ids, without building the cases' files (for parametrisation)."""
    src = pathlib.Path(__file__).read_text()
    return re.findall(r'^\s+\("((?:train|study|evaluate|encode|mine|convert|serve)_\w+)", "', src, re.MULTILINE)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_hf_model_dir):
    tmp = tmp_path_factory.mktemp("cli_errors")
    cases = _cases(tmp, tiny_hf_model_dir)
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([[c[0], c[1], c[2]] for c in cases]),
                          capture_output=True, text=True, env=ENV, cwd=tmp, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(line[len("RESULTS "):])
    return {cid: (got[cid][0], got[cid][1], pattern) for cid, _, _, pattern in cases}


@pytest.mark.parametrize("case", _case_ids())
def test_user_error_is_short_and_names_the_problem(results, case):
    rc, err, pattern = results[case]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert re.search(pattern, err), (pattern, err)
    error_lines = [l for l in err.splitlines() if "error:" in l]
    assert len(error_lines) == 1, err  # one message (argparse adds its usage line before it)
    assert len(error_lines[0]) < 700, error_lines[0]


def test_every_case_is_parametrised(results):
    # the ids are read from this file's text; a case whose id the regex misses would go untested
    assert sorted(results) == sorted(set(_case_ids()))


@pytest.mark.parametrize("module,argv,pattern", [
    ("train", ["--gin_file", "demo_cpu.gin", "--gin.MODEL_DIR=/tmp/x"], r"""--gin.MODEL_DIR="'/tmp/x'\""""),
    ("evaluate", ["--encoder", "hash", "--tasks", "nope"], r"unknown task"),
    ("study", ["--sizes", "tiny-16", "--out", "/tmp/unused"], r"at least 2 sizes"),
])
def test_entry_point_exit_code_and_debug(module, argv, pattern):
    """The real `python -m` entry point: exit 2, one line; with --debug, the traceback."""
    cmd = [sys.executable, "-m", f"mst5_jax.{module}", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr
    proc = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr
