"""gs:// paths against a GCS emulator: models, adapters, vocabularies, data files, orbax arrays.

Only ``STORAGE_EMULATOR_HOST`` is set (as a google-cloud-storage user would); everything else
(gcsfs, tensorstore) is mapped from it by `mst5_jax.utils.fs.configure`. References are
HF PyTorch / peft on the same files read locally. Every test runs from an empty working
directory and checks that no local folder named ``gs:`` appeared.
"""
import os
import pathlib
import uuid

import numpy as np
import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from gcs_emulator import BUCKET, start_emulator
from hf_reference import rel_err
from mst5_jax.utils import files, fs
from mst5_jax.utils.paths import REPO_ROOT as REPO

SENTENCES = ["A man is playing a guitar.", "Un homme joue de la guitare.", "", "رجل يعزف على الجيتار"]


@pytest.fixture(scope="module")
def emulator_url():
    server, url = start_emulator()
    yield url
    server.stop()


@pytest.fixture
def gcs(emulator_url, monkeypatch, tmp_path):
    """A fresh ``gs://`` prefix on the emulator; the test runs in an empty cwd."""
    monkeypatch.setenv(fs.EMULATOR_ENV, emulator_url)
    for name in (fs.TENSORSTORE_URL_ENV, fs.TENSORSTORE_TOKEN_ENV):
        assert os.environ.get(name) in (None, fs._exported.get(name)), f"{name} set outside the test"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
    assert not any(p.name == "gs:" for p in tmp_path.rglob("*")), "a local folder named gs: was written"
    assert not (REPO / "gs:").exists()
    # `fs.configure` exported the emulator's URL for tensorstore into os.environ; take it back,
    # or later tests' subprocesses inherit it as if a user had set it, and tensorstore talks to
    # this (then stopped) emulator forever (CI, 2026-12-05 and 2026-12-07).
    monkeypatch.delenv(fs.EMULATOR_ENV)
    fs.configure()
    assert all(name not in os.environ for name in (fs.TENSORSTORE_URL_ENV, fs.TENSORSTORE_TOKEN_ENV))


def _hf_embed(model_dir, sentences, adapter=None):
    """Reference: transformers MT5EncoderModel (+ peft adapter) + masked mean, fp32."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.MT5EncoderModel.from_pretrained(str(model_dir)).float().eval()
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    batch = tok(sentences, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()


def test_emulator_variable_alone_configures_every_client(gcs):
    fs.configure()
    assert os.environ[fs.TENSORSTORE_URL_ENV] == os.environ[fs.EMULATOR_ENV]
    assert os.environ[fs.TENSORSTORE_TOKEN_ENV]
    p = fs.as_path(f"{gcs}/a/b.txt")
    assert str(p) == f"{gcs}/a/b.txt" and fs.is_remote(p)
    p.write_text("hello")
    assert p.read_text() == "hello" and fs.list_files(gcs) == ["a/b.txt"]


def test_emulator_speaks_the_generation_protocol_ocdbt_relies_on(gcs):
    """OCDBT commits its manifest by a conditional write on the generation it read. Without
    ``x-goog-generation`` on reads and ``ifGenerationMatch`` on writes (what the stock emulator
    lacks) tensorstore hangs or fails with "Malformed StorageGeneration" (CI, 2026-12-05)."""
    import tensorstore as ts

    fs.configure()
    bucket, prefix = gcs[len("gs://"):].split("/", 1)
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix + "/"}).result()
    missing = kv.read("k").result(timeout=30)
    assert missing.state == "missing"
    first = kv.write("k", b"a", if_equal=missing.stamp.generation).result(timeout=30)
    assert first.generation, "a write conditioned on 'no object yet' succeeds"
    lost_race = kv.write("k", b"b", if_equal=missing.stamp.generation).result(timeout=30)
    assert lost_race.generation == b"", "the same condition fails once the object exists (412)"
    read = kv.read("k").result(timeout=30)
    assert (read.value, read.stamp.generation) == (b"a", first.generation)
    kv.write("k", b"c", if_equal=read.stamp.generation).result(timeout=30)
    assert kv.read("k").result(timeout=30).value == b"c"


def test_run_lock_on_gs_goes_to_exactly_one_of_racing_trainers(gcs):
    """The gs:// run lock is created with ifGenerationMatch=0: eight takers that all found no
    lock write at once, and the store lets exactly one through; the public `acquire` then
    refuses, naming the winner."""
    from concurrent.futures import ThreadPoolExecutor

    from mst5_jax.training.run_lock import LOCK_FILE, RunLock
    from mst5_jax.utils.cli import UserError

    path = fs.as_path(f"{gcs}/run/{LOCK_FILE}")
    takers = [{"host": f"node-{i}", "pid": 100 + i} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda c: RunLock._create(path, c), takers))
    assert sum(won) == 1
    assert RunLock.read(path) == takers[won.index(True)]
    with pytest.raises(UserError, match=f"in use by another trainer \\(host node-{won.index(True)}, pid"):
        RunLock.acquire(f"{gcs}/run")
    assert RunLock.read(path) == takers[won.index(True)]  # the refusal left the holder's record


def test_orbax_arrays_round_trip_through_tensorstore(gcs):
    import orbax.checkpoint as ocp

    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float32(2.5) * np.ones(5, np.float32)}
    ckpt = fs.as_path(f"{gcs}/ckpt")
    with ocp.StandardCheckpointer() as c:
        c.save(ckpt, tree)
    assert any(f.endswith(".zarray") or "ocdbt" in f or "d/" in f for f in fs.list_files(ckpt))
    with ocp.StandardCheckpointer() as c:
        back = c.restore(ckpt, tree)
    np.testing.assert_array_equal(back["w"], tree["w"])
    np.testing.assert_array_equal(back["b"], tree["b"])


def test_hf_model_from_gs_matches_hf_pytorch(gcs, tiny_hf_model_dir):
    from mst5_jax import SentenceEncoder

    fs.upload_dir(tiny_hf_model_dir, f"{gcs}/model")
    enc = SentenceEncoder.from_pretrained(f"{gcs}/model")
    err = rel_err(enc.encode(SENTENCES, batch_size=2), _hf_embed(tiny_hf_model_dir, SENTENCES))
    print(f"gs:// model vs HF PyTorch (local files): rel_err={err:.2e}")
    assert err <= 1e-4


def test_peft_adapter_from_gs_matches_peft(gcs, tiny_hf_model_dir, tmp_path):
    import peft
    import torch
    from transformers import MT5EncoderModel

    from mst5_jax import SentenceEncoder

    torch.manual_seed(0)
    pm = peft.get_peft_model(MT5EncoderModel.from_pretrained(tiny_hf_model_dir),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    fs.upload_dir(tmp_path / "adapter", f"{gcs}/adapter")
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir, adapter=f"{gcs}/adapter")
    err = rel_err(enc.encode(SENTENCES), _hf_embed(tiny_hf_model_dir, SENTENCES, adapter=tmp_path / "adapter"))
    print(f"gs:// adapter vs peft: rel_err={err:.2e}")
    assert err <= 1e-4 and enc.adapter == f"{gcs}/adapter"


def test_save_pretrained_to_gs_then_reload(gcs, tiny_hf_model_dir, tmp_path):
    from mst5_jax import SentenceEncoder

    out = SentenceEncoder.from_pretrained(tiny_hf_model_dir).save_pretrained(f"{gcs}/saved")
    assert str(out) == f"{gcs}/saved"
    names = set(fs.list_files(f"{gcs}/saved"))
    assert {"config.json", "model.safetensors"} <= names and names & {"tokenizer.json", "spiece.model"}
    local = tmp_path / "downloaded"
    for rel in names:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(fs.as_path(f"{gcs}/saved/{rel}").read_bytes())
    # The saved files, read by transformers, give the original model's embeddings.
    err = rel_err(_hf_embed(local, SENTENCES), _hf_embed(tiny_hf_model_dir, SENTENCES))
    assert err <= 1e-6
    err = rel_err(SentenceEncoder.from_pretrained(f"{gcs}/saved").encode(SENTENCES), _hf_embed(local, SENTENCES))
    assert err <= 1e-4


def test_vocabulary_from_gs_gives_the_local_ids(gcs, tiny_hf_model_dir):
    from mst5_jax.formats.tokenizer import Tokenizer

    local = pathlib.Path(tiny_hf_model_dir) / "spiece.model"
    url = f"{gcs}/vocab/spiece.model"
    fs.as_path(url).write_bytes(local.read_bytes())
    ours, ref = Tokenizer.from_pretrained(url), Tokenizer.from_pretrained(local)
    assert ours.source == url
    assert ours.encode_batch(SENTENCES) == ref.encode_batch(SENTENCES)
    with pytest.raises(FileNotFoundError, match="no such gs:// object"):
        Tokenizer.from_pretrained(f"{gcs}/vocab/missing.model")


def test_atomic_write_and_read_lines_on_gs(gcs):
    url = f"{gcs}/out/lines.txt"
    files.write_text_atomic(url, "\ufeffeins\r\nzwei\ndrei")
    assert files.read_lines(url) == ["eins", "zwei", "drei"]
    with pytest.raises(RuntimeError):
        with files.atomic_write(url) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert files.read_lines(url) == ["eins", "zwei", "drei"]  # the failed write changed nothing
    files.write_json_atomic(f"{gcs}/out/x.json", {"a": 1})
    assert fs.as_path(f"{gcs}/out/x.json").read_text() == '{\n  "a": 1\n}\n'
    import hashlib

    assert files.sha256_file(url) == hashlib.sha256("\ufeffeins\r\nzwei\ndrei".encode()).hexdigest()


def test_evaluator_reads_a_gs_data_dir(gcs, data_dir):
    """xsts on a gs:// DATA_DIR equals xsts on the local folder (hash encoder, scipy spearman)."""
    from mst5_jax.evals import HashEncoder
    from mst5_jax.evals.sts import xsts

    src = pathlib.Path(data_dir) / "sts17"
    fs.upload_dir(src, f"{gcs}/data/sts17")
    enc = HashEncoder(dim=64)
    remote = xsts(enc.encode, f"{gcs}/data", extended=False)
    local = xsts(enc.encode, data_dir, extended=False)
    strip = lambda r: {k: v for k, v in r.items() if k != "meta"}  # noqa: E731
    assert strip(remote) == strip(local) and strip(local)
    assert all(f["path"].startswith(gcs) for f in remote["meta"]["data_files"])


# ------------------------------------------------------------------------- training into gs://
def _train_cli(model_dir, *extra):
    """`python -m mst5_jax.train` in process (the emulator serves from this process)."""
    from mst5_jax import train
    from test_train import TINY

    return train.main([*TINY, f"--gin.MODEL_DIR='{model_dir}'", *extra])


def _gcs_losses(model_dir):
    import json

    text = fs.as_path(f"{model_dir}/metrics.jsonl").read_text()
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def test_training_run_into_gs_writes_resumes_and_loads(gcs, tmp_path, monkeypatch):
    """2 steps into gs://, then resumed to 4, equal 4 uninterrupted steps into a local folder."""
    from mst5_jax import SentenceEncoder
    from mst5_jax.formats import manifest

    monkeypatch.setenv("MST5_NO_SEQIO", "1")  # train.main sets it; restored after the test
    local, url = tmp_path / "local", f"{gcs}/run"
    assert _train_cli(local, "--gin.TRAIN_STEPS=4", "--gin.SCHEDULE_STEPS=4") == 0
    assert _train_cli(url, "--gin.TRAIN_STEPS=2", "--gin.SCHEDULE_STEPS=4") == 0
    first = set(fs.list_files(url))
    assert {"run.json", "operative_config.gin", "metrics.jsonl", "checkpoints/2/manifest.json"} <= first, first
    # the arrays themselves, written by tensorstore (ocdbt data files under params/d/)
    assert any(f.startswith("checkpoints/2/params/d/") for f in first), first
    assert _train_cli(url, "--gin.TRAIN_STEPS=4", "--gin.SCHEDULE_STEPS=4") == 0
    names = set(fs.list_files(url))
    assert {"checkpoints/4/manifest.json", "summary.json", "tokenizer/spiece.model"} <= names, names
    assert manifest.verify(f"{url}/checkpoints/4") == []
    recorded = fs.as_path(f"{url}/checkpoints/4/manifest.json").read_text()
    assert '"hashed": true' in recorded

    remote_losses = _gcs_losses(url)
    local_losses = {s: loss for s, loss in _gcs_losses(local).items()}
    assert sorted(remote_losses) == [1, 2, 3, 4]  # each step once, across the resume
    for s in (1, 2, 3, 4):
        assert remote_losses[s] == pytest.approx(local_losses[s], rel=1e-6), (s, remote_losses, local_losses)
    print("gs:// run (2 + 2 steps) vs local (4 steps) losses:", remote_losses, local_losses)

    sents = ["A man is playing a guitar.", "Un homme joue de la guitare.", "x"]
    ours = SentenceEncoder.from_pretrained(url).encode(sents)
    ref = SentenceEncoder.from_pretrained(local).encode(sents)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_manifest_verification_on_gs_names_a_corrupted_file(gcs, tmp_path):
    """A byte flipped in one object of a gs:// step: verify names that object, resume skips it."""
    from mst5_jax.formats import manifest

    step = tmp_path / "checkpoints" / "3"
    (step / "params").mkdir(parents=True)
    (step / "params" / "a.bin").write_bytes(b"\x00" * 100)
    (step / "meta.json").write_text('{"step": 3}')
    manifest.write(step)
    fs.upload_dir(tmp_path / "checkpoints", f"{gcs}/checkpoints")
    assert manifest.verify(f"{gcs}/checkpoints/3") == []
    assert manifest.build(f"{gcs}/checkpoints/3") == manifest.build(step)
    fs.as_path(f"{gcs}/checkpoints/3/params/a.bin").write_bytes(b"\x00" * 99 + b"\x01")
    problems = manifest.verify(f"{gcs}/checkpoints/3")
    assert len(problems) == 1 and problems[0].startswith(f"{gcs}/checkpoints/3/params/a.bin: sha256"), problems
    assert manifest.newest_verified_step(f"{gcs}/checkpoints", quarantine=True) is None
    moved = fs.list_files(f"{gcs}/checkpoints_rejected")
    assert any(f.endswith("/params/a.bin") for f in moved) and not fs.list_files(f"{gcs}/checkpoints")


def test_training_from_a_gs_pretrained_model_and_vocabulary(gcs, tiny_hf_model_dir, tmp_path, monkeypatch):
    """LoRA on a gs:// PRETRAINED with a gs:// vocabulary equals the same run on the local files."""
    import json

    from mst5_jax import SentenceEncoder

    monkeypatch.setenv("MST5_NO_SEQIO", "1")
    fs.upload_dir(tiny_hf_model_dir, f"{gcs}/base")
    lora = ["--gin.TRAIN_STEPS=2", "--gin.TrainConfig.model_overrides={}", "--gin.TrainConfig.lora=@LoRAConfig()",
            "--gin.LoRAConfig.rank=4", "--gin.LoRAConfig.alpha=8", "--gin.LoRAConfig.targets=['q', 'v']"]
    local, url = tmp_path / "local", f"{gcs}/run"
    assert _train_cli(local, *lora, f"--gin.PRETRAINED='{tiny_hf_model_dir}'",
                      f"--gin.TrainConfig.vocab='{pathlib.Path(tiny_hf_model_dir) / 'spiece.model'}'") == 0
    assert _train_cli(url, *lora, f"--gin.PRETRAINED='{gcs}/base'",
                      f"--gin.TrainConfig.vocab='{gcs}/base/spiece.model'") == 0
    info = json.loads(fs.as_path(f"{url}/run.json").read_text())
    assert info["mode"] == "lora" and info["base"]["path"] == f"{gcs}/base", info["base"]
    remote_losses, local_losses = _gcs_losses(url), _gcs_losses(local)
    assert sorted(remote_losses) == [1, 2]
    for s in (1, 2):
        assert remote_losses[s] == pytest.approx(local_losses[s], rel=1e-6), (s, remote_losses, local_losses)
    ours = SentenceEncoder.from_pretrained(url).encode(SENTENCES)
    ref = SentenceEncoder.from_pretrained(local).encode(SENTENCES)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
