"""Every command of every guide in docs/guides runs, scaled down; marked ones also dry-run as written.

Conventions (docs/guides/README.md): in ```bash blocks a `# needs: GPU|TPU|network` comment marks
the next command. Each guide runs in order in a fresh folder with the local data
(`$MST5_DATA_DIR`). The scaled-down form keeps the flags and adds or shrinks values:
hub ids -> tiny local models, gs:// -> local folders, training -> a few steps of a tiny model on
the CPU, evaluation -> cheap tasks and short inputs. A marked `python -m mst5_jax.train|study`
command also runs unchanged with `--dry_run` (its gin config builds on an AbstractMesh); other
marked CLIs parse their flags with the module's own parser. Non-python shell commands must be
marked; they are checked for shell syntax only. A block whose first line is `# file: NAME` is
written to NAME.
"""
import importlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]
GUIDES = REPO / "docs" / "guides"
GUIDE_FILES = sorted(p.name for p in GUIDES.glob("*.md") if p.name != "README.md")
CHEAP_TASKS = ("xsts", "xnli_retrieval", "jsick_retrieval", "stsb_en", "korsts", "jsts", "jsick")
SMALL_TASK = "mst5_nli_en_xnli"  # 1,670 English triplets from the local XNLI files: the cheapest local task
BUILTIN_RECIPES = ("xxl_lora.gin", "xxl_lora_tpu_pod.gin", "base_full_finetune.gin")
PARSERS = {"evaluate": "mst5_jax.evaluate", "encode": "mst5_jax.encode", "mine": "mst5_jax.mine",
           "convert": "mst5_jax.convert"}
TINY_TRAIN = ["--gin_file=cpu.gin", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.MAX_LENGTH=16",
              "--gin.TrainConfig.model_overrides={}", "--gin.TrainConfig.eval_every=None",
              "--gin.TrainConfig.microbatch_size=None", "--gin.TrainConfig.heldout_eval=False",
              "--gin.MIN_HELDOUT_GAIN=0", "--gin.CHECKPOINT_EVERY=1000", "--gin.LOG_EVERY=1",
              "--gin.tasks.configure.train_source='xnli_local'"]


# ---------------------------------------------------------------------- parsing the guides
def parse_guide(path: pathlib.Path) -> list[dict]:
    """Steps in order: {"kind": file|bash|python|export, ...}."""
    steps = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        lines = body.splitlines()
        if lines and lines[0].startswith("# file: "):
            steps.append({"kind": "file", "name": lines[0][len("# file: "):].strip(), "text": "\n".join(lines[1:]) + "\n"})
        elif lang == "python":
            steps.append({"kind": "python", "source": body})
        elif lang == "bash":
            needs = None
            for cmd in re.sub(r"\\\n\s*", " ", body).splitlines():
                cmd = cmd.strip()
                if cmd.startswith("# needs:"):
                    needs = cmd[len("# needs:"):].strip()
                elif cmd.startswith("export "):
                    name, value = cmd[len("export "):].split("=", 1)
                    steps.append({"kind": "export", "name": name, "value": value})
                elif cmd and not cmd.startswith("#"):
                    steps.append({"kind": "bash", "cmd": cmd, "needs": needs})
                    needs = None
    return steps


def split_command(cmd: str, env: dict) -> tuple[dict, str, list[str]]:
    """'A=b python -m mst5_jax.x --f=v' -> ({A: b}, 'x', ['--f=v']) (module '' if not such a command)."""
    words = shlex.split(_expand(cmd, env))
    prefix = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        k, v = words.pop(0).split("=", 1)
        prefix[k] = v
    if words[:2] == ["python", "-m"] and words[2].startswith("mst5_jax."):
        return prefix, words[2][len("mst5_jax."):], words[3:]
    return prefix, "", words


def _expand(text: str, env: dict) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def _replace_value(args: list[str], flag: str, value: str) -> list[str]:
    out, i = [], 0
    while i < len(args):
        if args[i] == flag:
            out += [flag, value]
            i += 2
        elif args[i].startswith(flag + "="):
            out.append(f"{flag}={value}")
            i += 1
        else:
            out.append(args[i])
            i += 1
    return out


def _value(args: list[str], flag: str):
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def cheap_tasks(spec: str) -> str:
    """The first cheap task the command asks for (xsts if none): one task is enough to run the flags."""
    kept = [t for t in spec.split(",") if t in CHEAP_TASKS]
    return kept[0] if kept else "xsts"


def scale_down(module: str, args: list[str], tiny_hf: str) -> list[str]:
    """The CI form of one command: the same flags, tiny values."""
    if module == "train":
        if "--dry_run" in args:
            return args
        extra = list(TINY_TRAIN) + [f"--gin.PRETRAINED='{tiny_hf}'"]
        if any(a.endswith(BUILTIN_RECIPES) for a in args if a.startswith("--gin_file=")):
            extra.append(f"--gin.MIXTURE_OR_TASK_NAME='{SMALL_TASK}'")
        return args + extra
    if module == "study":
        args = _replace_value(args, "--sizes", "tiny-16,tiny-32")
        args = _replace_value(args, "--tasks", cheap_tasks(_value(args, "--tasks") or "xsts"))
        tiny = [a.replace("--gin_file=", "--recipe=") if a.startswith("--gin_file=") else a for a in TINY_TRAIN]
        return args + ["--data", "local", "--max_length", "32",
                       "--task_kwargs", json.dumps({"xnli_retrieval": {"max_premises": 50}}),
                       f"--gin.MIXTURE_OR_TASK_NAME='{SMALL_TASK}'"] + tiny
    if module == "evaluate" and "--compare" not in args:
        args = _replace_value(args, "--tasks", cheap_tasks(_value(args, "--tasks") or "tatoeba"))
        return args + ["--max_length", "32"]
    if module == "encode":
        return args + ["--no_progress", "--max_length", "32"]
    if module == "mine":
        return args + ["--no_progress"]
    return args


# ---------------------------------------------------------------------- tiny stand-ins
@pytest.fixture(scope="module")
def stand_ins(tiny_hf_model_dir, tmp_path_factory):  # noqa: F811
    """Local replacements for hub ids: a tiny mT5 encoder, a PEFT adapter for it, an ST directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MT5EncoderModel

    from mst5_jax import SentenceEncoder

    root = tmp_path_factory.mktemp("stand_ins")
    torch.manual_seed(0)
    peft_model = get_peft_model(MT5EncoderModel.from_pretrained(tiny_hf_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    SentenceEncoder.from_pretrained(tiny_hf_model_dir).save_pretrained(root / "st", format="sentence-transformers")
    hf = str(tiny_hf_model_dir)
    return {
        **{f"google/mt5-{s}": hf for s in ("small", "base", "large", "xl", "xxl")},
        "pkshatech/m-ST5": str(root / "adapter"),
        "sentence-transformers/LaBSE": str(root / "st"),
        "gs://YOUR_BUCKET/mst5_runs/": "mst5_runs/",
    }


def _substitute(text: str, subs: dict) -> str:
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


# ---------------------------------------------------------------------- the tests
def test_guides_are_indexed_and_follow_the_conventions():
    index = (GUIDES / "README.md").read_text()
    assert GUIDE_FILES == sorted(["reproduce_one_gpu.md", "reproduce_tpu_pod.md", "evaluate_any_encoder.md",
                                  "mine_bitext.md", "register_your_task.md"])
    for name in GUIDE_FILES:
        assert f"]({name})" in index, name
        for step in parse_guide(GUIDES / name):
            if step["kind"] == "bash":
                _, module, _ = split_command(step["cmd"], {})
                assert module or step["needs"], f"{name}: non-python command not marked '# needs:': {step['cmd']}"


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDE_FILES)
def test_guide_commands_run_scaled_down(guide, tmp_path, data_dir, stand_ins):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MST5_NO_SEQIO="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MST5_DATA_DIR=str(data_dir),
               HOME=str(tmp_path))
    tiny_hf = stand_ins["google/mt5-xxl"]
    ran, dry = [], []

    def run(argv, extra_env, what):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env={**env, **extra_env}, timeout=300)
        assert p.returncode == 0, f"{guide}: {what}\n$ {shlex.join(argv)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        print(f"{time.perf_counter() - t0:6.1f}s {what}: {shlex.join(argv)[:160]}")
        return p

    for step in parse_guide(GUIDES / guide):
        if step["kind"] == "file":
            (tmp_path / step["name"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / step["name"]).write_text(step["text"], encoding="utf-8")
        elif step["kind"] == "export":
            if step["name"] != "MST5_DATA_DIR":  # the test's data stands in for the user's
                env[step["name"]] = _expand(step["value"], env)
        elif step["kind"] == "python":
            run([sys.executable, "-c", _substitute(step["source"], stand_ins)], {}, "python block")
            ran.append("python block")
        else:
            prefix, module, args = split_command(step["cmd"], env)
            if not module:
                assert step["needs"], step["cmd"]
                syntax = subprocess.run(["bash", "-n", "-c", step["cmd"]], capture_output=True, text=True)
                assert syntax.returncode == 0, f"{guide}: shell syntax of {step['cmd']!r}: {syntax.stderr}"
                continue
            if step["needs"]:
                if module in ("train", "study"):
                    p = run([sys.executable, "-m", f"mst5_jax.{module}", *args, "--dry_run"], prefix,
                            f"dry run of a command that needs {step['needs']}")
                    assert "GiB" in p.stdout or "total_gib" in p.stdout, p.stdout[-1000:]
                else:
                    importlib.import_module(PARSERS[module]).build_parser().parse_args(args)
                dry.append(step["cmd"])
            scaled = scale_down(module, [_substitute(a, stand_ins) for a in args], tiny_hf)
            run([sys.executable, "-m", f"mst5_jax.{module}", *scaled], prefix, "scaled-down run")
            ran.append(step["cmd"])
    print(f"{guide}: {len(ran)} commands/blocks run scaled down, {len(dry)} dry-run as written")
    assert ran
