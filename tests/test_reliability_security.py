"""Security: no pickle (but torch.load(weights_only=True)), plain shard names, the symlink policy.

The trust model is in docs/RELIABILITY.md ("Trust"): gin files and the paths the user
names are trusted; files inside downloaded or shared model/adapter/tokenizer directories
are data, never code, and are read only where they resolve inside the named directory (or
its Hugging Face hub cache repository).
"""
import ast
import json
import os
import pathlib
import pickle
import shutil
import tokenize

import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401

from mst5_jax.utils import safety
from mst5_jax.formats.huggingface import CheckpointError, weight_files

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mst5_jax", "tasks", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources():
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            yield f, ast.parse(f.read_text(encoding="utf-8"), filename=str(f))


def test_no_pickle_anywhere_in_the_package():
    found = []
    for f, tree in _sources():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            found += [f"{f.relative_to(REPO)}:{node.lineno} imports {n}" for n in names if n in PICKLE_MODULES]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kw = {k.arg: k.value for k in node.keywords}
                if node.func.attr in ("read_pickle", "to_pickle"):
                    found.append(f"{f.relative_to(REPO)}:{node.lineno} calls {node.func.attr}")
                if node.func.attr == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                        and kw["allow_pickle"].value:
                    found.append(f"{f.relative_to(REPO)}:{node.lineno} np.load(allow_pickle=True)")
    assert not found, found


def test_every_torch_load_is_weights_only():
    calls = []
    for f, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{f.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "expected the .bin readers to call torch.load"
    assert all(ok for _, ok in calls), [c for c, ok in calls if not ok]
    # Every `torch.load` in code (comments and strings excluded) is one of the calls above,
    # so no aliased or dynamic use slipped past the AST check.
    mentions = 0
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            with open(f, "rb") as fh:
                toks = [t.string for t in tokenize.tokenize(fh.readline) if t.type in (tokenize.NAME, tokenize.OP)]
            mentions += sum(toks[i:i + 3] == ["torch", ".", "load"] for i in range(len(toks)))
    assert mentions == len(calls), (mentions, calls)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pytorch_bin_is_refused_and_never_runs(tiny_hf_model_dir, tmp_path):
    from mst5_jax.inference.encoder import SentenceEncoder

    d = tmp_path / "m"
    shutil.copytree(tiny_hf_model_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"shared.weight": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match="could not read as a torch state dict"):
        SentenceEncoder.from_pretrained(d)
    assert not marker.exists()


def test_malicious_adapter_bin_is_refused(tiny_hf_model_dir, tmp_path):
    from mst5_jax.inference.encoder import SentenceEncoder

    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                       "target_modules": ["q"]}))
    marker = tmp_path / "pwned"
    (a / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match="could not read as a torch state dict"):
        SentenceEncoder.from_pretrained(tiny_hf_model_dir, adapter=a)
    assert not marker.exists()


@pytest.mark.parametrize("shard", ["../evil.safetensors", "sub/model.safetensors", "..", "", "a\\b.safetensors",
                                   "/etc/passwd"])
@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_shard_names_must_be_plain(tmp_path, shard, index):
    (tmp_path / index).write_text(json.dumps({"weight_map": {"shared.weight": shard}}))
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        weight_files(tmp_path)


def test_plain_file_name_helper():
    assert safety.plain_file_name("model-00001-of-00002.safetensors") == "model-00001-of-00002.safetensors"
    for bad in ("../x", "a/b", "..", ".", "", "a\\b", "a\x00b"):
        with pytest.raises(safety.UnsafePathError):
            safety.plain_file_name(bad, "index.json")


# ------------------------------------------------------------------------- symlink policy
@pytest.fixture
def layout(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "real.bin").write_bytes(b"x")
    (model / "sub").mkdir()
    (model / "sub" / "inner.bin").write_bytes(b"y")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    return model, secret


def test_symlink_inside_the_named_directory_is_followed(layout):
    model, _ = layout
    (model / "link.bin").symlink_to("sub/inner.bin")
    assert safety.resolve_inside(model / "link.bin", model) == (model / "sub" / "inner.bin").resolve()
    safety.check_tree(model)


@pytest.mark.parametrize("target", ["absolute", "relative", "dir"])
def test_symlink_escaping_the_named_directory_is_refused(layout, target):
    model, secret = layout
    link = model / "model.safetensors"
    if target == "absolute":
        link.symlink_to(secret)
    elif target == "relative":
        link.symlink_to("../secret.txt")
    else:
        link = model / "escape"
        link.symlink_to(secret.parent)
    with pytest.raises(safety.UnsafePathError, match="outside the directory you named"):
        safety.resolve_inside(link, model)
    with pytest.raises(safety.UnsafePathError):
        safety.check_tree(model)


def test_the_named_directory_itself_may_be_a_symlink(layout, tmp_path):
    model, _ = layout
    alias = tmp_path / "alias"
    alias.symlink_to(model)
    (model / "link.bin").symlink_to("real.bin")
    assert safety.resolve_inside(alias / "link.bin", alias) == (model / "real.bin").resolve()
    safety.check_tree(alias)


def _hub_repo(root, name):
    repo = root / "hub" / f"models--org--{name}"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs" / "deadbeef").write_bytes(b"w")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    return repo, snap


def test_hub_cache_snapshot_links_into_its_own_blobs(tmp_path):
    repo, snap = _hub_repo(tmp_path, "good")
    assert safety.hub_repo_root(snap) == repo
    assert safety.resolve_inside(snap / "model.safetensors", snap) == (repo / "blobs" / "deadbeef").resolve()
    safety.check_tree(snap)


def test_hub_cache_link_into_another_repository_is_refused(tmp_path):
    other, _ = _hub_repo(tmp_path, "other")
    repo, snap = _hub_repo(tmp_path, "good")
    (snap / "config.json").symlink_to(other / "blobs" / "deadbeef")
    with pytest.raises(safety.UnsafePathError, match="hub cache repository"):
        safety.resolve_inside(snap / "config.json", snap)


# ------------------------------------------------------------------------- integrated loaders
# The loaders apply the policy: formats.huggingface.weight_files, SentenceEncoder.from_pretrained,
# formats.tokenizer and formats.peft.load_peft_adapter all call mst5_jax.utils.safety.
def test_loader_refuses_weights_symlinked_outside(tiny_hf_model_dir, tmp_path):
    from mst5_jax.inference.encoder import SentenceEncoder

    d = tmp_path / "m"
    shutil.copytree(tiny_hf_model_dir, d)
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(outside)
    (d / "model.safetensors").symlink_to(outside)
    with pytest.raises(safety.UnsafePathError, match="model.safetensors: resolves to .*elsewhere.safetensors"):
        SentenceEncoder.from_pretrained(d)
    with pytest.raises(safety.UnsafePathError):
        weight_files(d)


def test_loader_follows_hub_cache_layout(tiny_hf_model_dir, tmp_path):
    import numpy as np

    from mst5_jax.inference.encoder import SentenceEncoder

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_hf_model_dir.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    a = SentenceEncoder.from_pretrained(snap).encode(["hello", "world"])
    b = SentenceEncoder.from_pretrained(tiny_hf_model_dir).encode(["hello", "world"])
    np.testing.assert_array_equal(a, b)


def test_tokenizer_refuses_symlink_outside(tiny_hf_model_dir, tmp_path):
    from mst5_jax.formats.tokenizer import Tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    (d / "spiece.model").symlink_to(tiny_hf_model_dir / "spiece.model")
    with pytest.raises(safety.UnsafePathError, match="spiece.model"):
        Tokenizer.from_pretrained(d)
    assert Tokenizer.from_pretrained(tiny_hf_model_dir / "spiece.model").vocab_size > 0  # a file the user named


def test_adapter_refuses_symlink_outside(tiny_hf_model_dir, tmp_path):
    from mst5_jax.inference.encoder import SentenceEncoder

    a = tmp_path / "adapter"
    a.mkdir()
    (tmp_path / "cfg.json").write_text("{}")
    (a / "adapter_config.json").symlink_to(tmp_path / "cfg.json")
    with pytest.raises(safety.UnsafePathError, match="adapter_config.json"):
        SentenceEncoder.from_pretrained(tiny_hf_model_dir, adapter=a)
