"""`python -m mst5_jax.convert`: every direction round-trips with identical embeddings.

References: HF PyTorch (`MT5EncoderModel` + masked mean), peft (`PeftModel` on the torch
base) and sentence-transformers (`SentenceTransformer(path)`), on real Tatoeba lines.
"""
import dataclasses
import pathlib
import re

import numpy as np
import pytest
import torch

from fixtures_models import tiny_hf_model_dir, tiny_t5_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax.convert import ConvertError, main as convert_main
from mst5_jax.inference.encoder import SentenceEncoder

SENTS_FILES = ("deu", "fra", "rus", "ara")


@pytest.fixture(scope="module")
def sentences(data_dir):
    out = []
    for lang in SENTS_FILES:
        with open(data_dir / "tatoeba" / f"tatoeba.{lang}-eng.{lang}", encoding="utf-8") as f:
            out += f.read().split("\n")[:8]
    return out


def torch_embed(model, tok_dir, sentences):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()


def ours(path, sentences, **kw):
    return SentenceEncoder.from_pretrained(path, **kw).encode(sentences)


def convert(*args):
    return convert_main([str(a) for a in args])


def card_license(d):
    return re.search(r"^license: (\S+)$", (pathlib.Path(d) / "README.md").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def peft_dir(tiny_hf_model_dir, tmp_path_factory):
    """A random PEFT adapter (A and B non-zero) named like the m-ST5 adapter, with its torch reference."""
    import peft
    import transformers

    base = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    torch.manual_seed(7)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wo"],
                                                   init_lora_weights=False)).eval()
    d = tmp_path_factory.mktemp("adapters") / "m-ST5-tiny"
    pm.save_pretrained(d)
    return d, pm


def test_peft_plus_base_to_merged_hf(peft_dir, tiny_hf_model_dir, sentences, tmp_path):
    import transformers

    adapter, pm = peft_dir
    ref = torch_embed(pm, tiny_hf_model_dir, sentences)
    out = tmp_path / "merged"
    convert("--input", adapter, "--base", tiny_hf_model_dir, "--to", "hf", "--output", out)
    merged_torch = transformers.MT5EncoderModel.from_pretrained(out).float().eval()
    assert rel_err(torch_embed(merged_torch, out, sentences), ref) < 1e-4
    assert rel_err(ours(out, sentences), ref) < 1e-4
    # hf + --adapter is the same conversion spelled from the base's side.
    out2 = tmp_path / "merged2"
    convert("--input", tiny_hf_model_dir, "--adapter", adapter, "--to", "hf", "--output", out2)
    np.testing.assert_array_equal(ours(out2, sentences), ours(out, sentences))
    assert card_license(out) == "cc-by-nc-4.0"
    card = (out / "README.md").read_text()
    assert "m-ST5-tiny" in card and "XNLI" in card and "Non-commercial" in card


def test_hf_to_st_to_hf(tiny_hf_model_dir, sentences, tmp_path):
    import transformers
    from sentence_transformers import SentenceTransformer

    ref = torch_embed(transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval(),
                      tiny_hf_model_dir, sentences)
    st = tmp_path / "st"
    convert("--input", tiny_hf_model_dir, "--to", "st", "--output", st)
    assert rel_err(SentenceTransformer(str(st), device="cpu").encode(sentences), ref) < 1e-4
    back = tmp_path / "hf"
    convert("--input", st, "--to", "hf", "--output", back)
    a, b, c = ours(tiny_hf_model_dir, sentences), ours(st, sentences), ours(back, sentences)
    assert rel_err(a, ref) < 1e-4
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_st5_with_dense_to_st_and_not_hf(tiny_t5_model_dir, sentences, tmp_path):
    from sentence_transformers import SentenceTransformer, models

    t = models.Transformer(str(tiny_t5_model_dir))
    torch.manual_seed(3)
    src = tmp_path / "st5"
    SentenceTransformer(modules=[t, models.Pooling(32, pooling_mode="mean"),
                                 models.Dense(32, 24, bias=False, activation_function=torch.nn.Identity()),
                                 models.Normalize()], device="cpu").save(str(src))
    ref = SentenceTransformer(str(src), device="cpu").encode(sentences)
    out = tmp_path / "st5_copy"
    convert("--input", src, "--to", "st", "--output", out)
    assert rel_err(SentenceTransformer(str(out), device="cpu").encode(sentences), ref) < 1e-4
    np.testing.assert_array_equal(ours(out, sentences), ours(src, sentences))
    with pytest.raises(SystemExit, match="--to st"):
        convert("--input", src, "--to", "hf", "--output", tmp_path / "nope")
    assert card_license(out) == "other" and "unknown (not stated in the input)" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def lora_run(tiny_hf_model_dir, tmp_path_factory):
    """A training-run directory as `mst5_jax.train` writes it: run.json, tokenizer/, an orbax LoRA step."""
    import jax
    from flax import nnx

    from mst5_jax.formats import huggingface
    from mst5_jax.core import lora
    from mst5_jax.training import run_checkpoints
    from mst5_jax.core.config import EncoderConfig
    from mst5_jax.formats.tokenizer import Tokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = EncoderConfig.from_hf_json(tiny_hf_model_dir / "config.json")
    lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "wo"))
    model = huggingface.load_hf_weights(tiny_hf_model_dir, cfg)
    lora.apply_lora(model, lcfg, 0)
    params = nnx.to_pure_dict(nnx.state(model, lora.trainable_filter("lora")))
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params)
    mngr = run_checkpoints.RunCheckpoints(run / "checkpoints")
    mngr.save(3, params, {"count": np.zeros((), np.int32)}, {"step": 3})
    mngr.close()
    run_checkpoints.write_run_info(run, {
        "encoder_config": dataclasses.asdict(cfg), "mode": "lora", "lora": dataclasses.asdict(lcfg),
        "base": {"path": str(tiny_hf_model_dir), "fingerprint": run_checkpoints.fingerprint(tiny_hf_model_dir)},
        "task": "mst5_xnli_cross", "best_metric": None, "best_mode": "max"})
    Tokenizer.from_pretrained(tiny_hf_model_dir).save(run / "tokenizer")
    return run


def test_run_to_hf_peft_st(lora_run, tiny_hf_model_dir, sentences, tmp_path):
    import peft
    import transformers
    from sentence_transformers import SentenceTransformer

    run_emb = ours(lora_run, sentences)
    base = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    assert rel_err(run_emb, torch_embed(base, tiny_hf_model_dir, sentences)) > 1e-2  # the adapter matters

    ad = tmp_path / "peft"
    convert("--input", lora_run, "--to", "peft", "--output", ad)
    pm = peft.PeftModel.from_pretrained(base, ad).eval()
    ref = torch_embed(pm, tiny_hf_model_dir, sentences)
    assert rel_err(run_emb, ref) < 1e-4

    hf = tmp_path / "hf"
    convert("--input", lora_run, "--step", "3", "--to", "hf", "--output", hf)
    merged = transformers.MT5EncoderModel.from_pretrained(hf).float().eval()
    assert rel_err(torch_embed(merged, hf, sentences), ref) < 1e-4

    st = tmp_path / "st"
    convert("--input", lora_run, "--to", "st", "--output", st)
    assert rel_err(SentenceTransformer(str(st), device="cpu").encode(sentences), ref) < 1e-4

    for d in (ad, hf, st):
        assert card_license(d) == "cc-by-nc-4.0" and "XNLI (task mst5_xnli_cross)" in (d / "README.md").read_text()
    a = ours(tiny_hf_model_dir, sentences, adapter=ad)
    assert rel_err(a, run_emb) < 1e-6 and rel_err(ours(hf, sentences), run_emb) < 1e-5
    assert rel_err(ours(st, sentences), run_emb) < 1e-5
    # peft -> merged hf -> st closes the loop.
    st2 = tmp_path / "st2"
    convert("--input", ad, "--to", "st", "--output", st2)
    np.testing.assert_array_equal(ours(st2, sentences), ours(st, sentences))


def test_errors_say_what_to_do(tiny_hf_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no LoRA factors"):
        convert("--input", tiny_hf_model_dir, "--to", "peft", "--output", tmp_path / "p")
    t5x = tmp_path / "t5x_ckpt"
    t5x.mkdir()
    (t5x / "checkpoint").write_bytes(b"msgpack")
    with pytest.raises(SystemExit, match="T5X checkpoint.*convert_t5x_checkpoint_to_pytorch"):
        convert("--input", t5x, "--to", "hf", "--output", tmp_path / "q")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        convert("--input", tiny_hf_model_dir, "--to", "hf", "--output", tmp_path / "full")
