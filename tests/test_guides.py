"""Every command of every guide in docs/guides runs as written; marked training commands also dry-run.

Conventions (docs/guides/README.md): each guide runs in order in a fresh folder that stands for the
repository root (the repository's packages linked in, `../shared/data` beside it pointing at the
local data), with no `MST5_DATA_DIR` when the data is at its default place. A command runs exactly
as written, with the flags of the guide's own "Quick check" block appended (a ```text block whose
first line is `# quick check`, one `python -m mst5_jax.MODULE ... FLAGS` line per module; argparse
and gin let later flags win). Hub ids resolve offline to tiny random stand-ins in a private Hugging
Face cache (`HF_HOME`), as if downloaded. In ```bash blocks a `# needs: GPU|TPU|network` comment
marks the next command; a marked `python -m mst5_jax.train|study` command also runs unchanged with
`--dry_run` (its gin config builds on an AbstractMesh). Non-python shell commands must be marked;
they are checked for shell syntax only, except a remote launch (`gcloud ... --command="cd DIR &&
python -m mst5_jax.train ... --multiprocess"`): its inner training command is dry-run as written,
then run with the quick-check flags as a one-process multi-host run on localhost
(`--coordinator_address=localhost:PORT --process_count=1 --process_index=0`, which the CLI reads
as it would a pod's auto-detected cluster). A block whose first line is `# file: NAME` is written
to NAME.
"""
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from typing import Optional

import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401

from mst5_jax.utils import fs, paths

REPO = pathlib.Path(__file__).resolve().parents[1]
GUIDES = REPO / "docs" / "guides"
GUIDE_FILES = sorted(p.name for p in GUIDES.glob("*.md") if p.name != "README.md")
# gs:// paths run as written against a GCS emulator (STORAGE_EMULATOR_HOST, as a
# google-cloud-storage user sets it); `gsutil` is a stand-in that copies through the same API.
GUIDE_BUCKET = "your-bucket"
GSUTIL_STAND_IN = """#!{python}
# gsutil [-m] cp -r SRC DST, for tests: copies gs:// <-> local through mst5_jax.utils.fs (gcsfs).
import os, sys
from mst5_jax.utils import fs
args = [a for a in sys.argv[1:] if a != "-m"]
assert args[:2] == ["cp", "-r"] and len(args) == 4, sys.argv
src, dst = args[2], args[3]
fs.configure()
name = src.rstrip("/").rsplit("/", 1)[-1]
dst = os.path.join(dst, name) if dst.endswith("/") or os.path.isdir(dst) else dst
if fs.is_remote(src):
    for rel in fs.list_files(src):
        out = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write((fs.as_path(src) / rel).read_bytes())
else:
    fs.upload_dir(src, dst)
"""
HUB_SNAPSHOT = "0" * 40


# ---------------------------------------------------------------------- parsing the guides
def parse_guide(path: pathlib.Path) -> list[dict]:
    """Steps in order: {"kind": file|bash|python|quick, ...}."""
    steps = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        lines = body.splitlines()
        if lines and lines[0].startswith("# file: "):
            steps.append({"kind": "file", "name": lines[0][len("# file: "):].strip(), "text": "\n".join(lines[1:]) + "\n"})
        elif lines and lines[0].strip() == "# quick check":
            for line in re.sub(r"\\\n\s*", " ", "\n".join(lines[1:])).splitlines():
                m = re.fullmatch(r"python -m mst5_jax\.(\w+) \.\.\. (.*)", line.strip())
                assert m, f"{path.name}: quick-check line is not 'python -m mst5_jax.MODULE ... FLAGS': {line!r}"
                steps.append({"kind": "quick", "module": m.group(1), "flags": shlex.split(m.group(2))})
        elif lang == "python":
            steps.append({"kind": "python", "source": body})
        elif lang == "bash":
            needs = None
            for cmd in re.sub(r"\\\n\s*", " ", body).splitlines():
                cmd = cmd.strip()
                if cmd.startswith("# needs:"):
                    needs = cmd[len("# needs:"):].strip()
                elif cmd and not cmd.startswith("#"):
                    steps.append({"kind": "bash", "cmd": cmd, "needs": needs})
                    needs = None
    return steps


def quick_flags(steps: list[dict]) -> dict[str, list[str]]:
    return {s["module"]: s["flags"] for s in steps if s["kind"] == "quick"}


def split_command(cmd: str) -> tuple[dict, str, list[str]]:
    """'A=b python -m mst5_jax.x --f=v' -> ({A: b}, 'x', ['--f=v']) (module '' if not such a command)."""
    words = shlex.split(cmd)
    prefix = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        k, v = words.pop(0).split("=", 1)
        prefix[k] = v
    if words[:2] == ["python", "-m"] and words[2].startswith("mst5_jax."):
        return prefix, words[2][len("mst5_jax."):], words[3:]
    return prefix, "", words


def remote_command(cmd: str) -> Optional[str]:
    """The `python -m mst5_jax.X ...` part of a remote launch's `--command="cd DIR && ..."`, or None."""
    for word in shlex.split(cmd):
        if word.startswith("--command="):
            for part in word[len("--command="):].split("&&"):
                if split_command(part.strip())[1]:
                    return part.strip()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def gcs(tmp_path):
    """A GCS emulator with the guides' bucket, and a folder holding the `gsutil` stand-in."""
    from gcs_emulator import start_emulator

    server, url = start_emulator(GUIDE_BUCKET)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gsutil").write_text(GSUTIL_STAND_IN.format(python=sys.executable))
    (bin_dir / "gsutil").chmod(0o755)
    yield {"STORAGE_EMULATOR_HOST": url, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    server.stop()


# ---------------------------------------------------------------------- the user's machine
@pytest.fixture(scope="module")
def hub_cache(tiny_hf_model_dir, tmp_path_factory):  # noqa: F811
    """HF_HOME whose hub cache holds tiny stand-ins under the hub ids the guides name."""
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
    stand_ins = {**{f"google/mt5-{s}": pathlib.Path(tiny_hf_model_dir) for s in ("small", "base", "large", "xl", "xxl")},
                 "pkshatech/m-ST5": root / "adapter", "sentence-transformers/LaBSE": root / "st"}
    hf_home = root / "hf_home"
    for repo_id, src in stand_ins.items():
        repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(src, repo / "snapshots" / HUB_SNAPSHOT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(HUB_SNAPSHOT)
    return hf_home


def user_folder(tmp_path: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
    """A stand-in for the repository root: its packages linked in, ../shared/data beside it."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("mst5_jax", "tasks", "gin"):
        (root / name).symlink_to(REPO / name)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(pathlib.Path(data_dir).resolve())
    return root


# ---------------------------------------------------------------------- the tests
def test_guides_are_indexed_and_follow_the_conventions():
    index = (GUIDES / "README.md").read_text()
    assert "source .venv/bin/activate" in index
    assert GUIDE_FILES == sorted(["reproduce_one_gpu.md", "reproduce_tpu_pod.md", "evaluate_any_encoder.md",
                                  "mine_bitext.md", "register_your_task.md"])
    for name in GUIDE_FILES:
        text = (GUIDES / name).read_text()
        assert f"]({name})" in index, name
        assert "$MST5_DATA_DIR" not in text and "--data_dir" not in text, f"{name}: uses the default data dir"
        assert ".venv/bin/python" not in text, f"{name}: the index says once how to activate the venv"
        steps = parse_guide(GUIDES / name)
        assert quick_flags(steps), f"{name}: no Quick check block"
        for step in steps:
            if step["kind"] == "bash":
                _, module, _ = split_command(step["cmd"])
                assert module or step["needs"], f"{name}: non-python command not marked '# needs:': {step['cmd']}"


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDE_FILES)
def test_guide_commands_run_as_written(guide, tmp_path, data_dir, hub_cache, gcs):
    cwd = user_folder(tmp_path, data_dir)
    # A user's shell: nothing this test process exported for its own GCS clients.
    inherited = {k: v for k, v in os.environ.items() if k not in (fs.TENSORSTORE_URL_ENV, fs.TENSORSTORE_TOKEN_ENV)}
    env = dict(inherited, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MST5_NO_SEQIO="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hub_cache),
               HOME=str(tmp_path), PYTHONPATH=str(REPO), **gcs)
    if pathlib.Path(data_dir).resolve() == (REPO.parent / "shared" / "data").resolve():
        env.pop(paths.DATA_DIR_ENV, None)  # the guides rely on the default place, as a user does
    else:
        env[paths.DATA_DIR_ENV] = str(data_dir)
    steps = parse_guide(GUIDES / guide)
    quick = quick_flags(steps)
    ran, dry = [], []

    def run(argv, extra_env, what):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env={**env, **extra_env}, timeout=300)
        assert p.returncode == 0, f"{guide}: {what}\n$ {shlex.join(argv)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        print(f"{time.perf_counter() - t0:6.1f}s {what}: {shlex.join(argv)[:160]}")
        return p

    for step in steps:
        if step["kind"] == "file":
            (cwd / step["name"]).parent.mkdir(parents=True, exist_ok=True)
            (cwd / step["name"]).write_text(step["text"], encoding="utf-8")
        elif step["kind"] == "python":
            run([sys.executable, "-c", step["source"]], {}, "python block")
            ran.append("python block")
        elif step["kind"] == "bash":
            prefix, module, args = split_command(step["cmd"])
            if not module:
                assert step["needs"], step["cmd"]
                syntax = subprocess.run(["bash", "-n", "-c", step["cmd"]], capture_output=True, text=True)
                assert syntax.returncode == 0, f"{guide}: shell syntax of {step['cmd']!r}: {syntax.stderr}"
                if step["cmd"].startswith("gsutil "):
                    run(["bash", "-c", step["cmd"]], {}, "gsutil (a stand-in on the GCS emulator)")
                    ran.append(step["cmd"])
                    continue
                inner = remote_command(step["cmd"])
                if inner is None:
                    continue
                prefix, module, args = split_command(inner)
                assert module == "train" and "--multiprocess" in args, f"{guide}: remote launch {inner!r}"
                run([sys.executable, "-m", "mst5_jax.train", *args, "--dry_run"], prefix,
                    f"dry run of a remote launch that needs {step['needs']}")
                dry.append(inner)
                local = [f"--coordinator_address=localhost:{_free_port()}", "--process_count=1", "--process_index=0"]
                run([sys.executable, "-m", "mst5_jax.train", *args, *quick.get(module, []), *local], prefix,
                    "remote launch as written + quick check, as 1 process on localhost")
                ran.append(inner)
                continue
            if step["needs"] and module in ("train", "study"):
                p = run([sys.executable, "-m", f"mst5_jax.{module}", *args, "--dry_run"], prefix,
                        f"dry run of a command that needs {step['needs']}")
                assert "GiB" in p.stdout or "total_gib" in p.stdout, p.stdout[-1000:]
                dry.append(step["cmd"])
            run([sys.executable, "-m", f"mst5_jax.{module}", *args, *quick.get(module, [])], prefix,
                "as written + quick check")
            ran.append(step["cmd"])
    print(f"{guide}: {len(ran)} commands/blocks run, {len(dry)} also dry-run")
    assert ran
