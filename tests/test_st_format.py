"""sentence-transformers directories both ways, against `SentenceTransformer(path)` itself.

The ST5-style reference (T5 v1.0 encoder, mean Pooling, bias-free Dense, Normalize) is
built with the sentence-transformers API; the other direction is checked against HF
PyTorch plus numpy (mean pool, projection, L2).
"""
import json
import shutil

import numpy as np
import pytest
import torch

from fixtures_models import tiny_hf_model_dir, tiny_t5_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax.formats import st_format
from mst5_jax.inference.encoder import SentenceEncoder

LANGS = ("deu", "jpn", "rus", "heb", "tur")


@pytest.fixture(scope="module")
def sentences(data_dir):
    out = []
    for lang in LANGS:
        with open(data_dir / "tatoeba" / f"tatoeba.{lang}-eng.{lang}", encoding="utf-8") as f:
            out += f.read().split("\n")[20:30]
    return out + ["", "x"]


@pytest.fixture(scope="module")
def st5_dir(tiny_t5_model_dir, tmp_path_factory):
    """A tiny random ST5-style model saved by sentence-transformers 6.x."""
    from sentence_transformers import SentenceTransformer, models

    t = models.Transformer(str(tiny_t5_model_dir))
    torch.manual_seed(11)
    dense = models.Dense(32, 20, bias=False, activation_function=torch.nn.Identity())
    d = tmp_path_factory.mktemp("st5") / "st5"
    SentenceTransformer(modules=[t, models.Pooling(32, pooling_mode="mean"), dense, models.Normalize()],
                        device="cpu").save(str(d))
    return d


def st_encode(path, sentences):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(sentences, batch_size=8)


def test_reads_st5_directory(st5_dir, sentences):
    ref = st_encode(st5_dir, sentences)
    enc = SentenceEncoder.from_pretrained(st5_dir)
    assert enc.config.feed_forward == "relu" and enc.config.projection_dim == 20 and enc.config.normalize
    got = enc.encode(sentences)
    assert got.shape == (len(sentences), 20)
    assert rel_err(got, ref) < 1e-4


def test_reads_legacy_layout(st5_dir, sentences, tmp_path):
    """The hub's sentence-t5-* layout: 0_Transformer/, legacy pooling flags, Dense as pytorch_model.bin."""
    from safetensors.torch import load_file

    d = tmp_path / "legacy"
    tr = d / "0_Transformer"
    tr.mkdir(parents=True)
    for f in st5_dir.iterdir():
        if f.is_file() and f.name not in ("modules.json", "README.md"):
            shutil.copy(f, tr / f.name)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (d / "2_Dense").mkdir()
    shutil.copy(st5_dir / "2_Dense" / "config.json", d / "2_Dense" / "config.json")
    torch.save(load_file(st5_dir / "2_Dense" / "model.safetensors"), d / "2_Dense" / "pytorch_model.bin")
    (d / "3_Normalize").mkdir()
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    ref = st_encode(d, sentences)
    assert rel_err(SentenceEncoder.from_pretrained(d).encode(sentences), ref) < 1e-4
    assert rel_err(ref, st_encode(st5_dir, sentences)) < 1e-5  # the layouts are the same model


def test_writes_st5_directory_sentence_transformers_loads(tiny_hf_model_dir, sentences, tmp_path):
    """Ours -> ST, checked against HF torch + numpy (mean pool, projection, L2)."""
    import transformers

    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    w = np.random.default_rng(0).standard_normal((12, 32)).astype(np.float32) * 0.2  # [out, in]
    st_format.attach_projection(enc.model, w)
    enc.model.cfg = enc.model.cfg.replace(normalize=True)
    enc = SentenceEncoder(enc.model, enc.tokenizer)
    out = tmp_path / "ours_st"
    enc.save_pretrained(out, format="sentence-transformers")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]

    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    model = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state.numpy().astype(np.float64)
    m = batch["attention_mask"].numpy()[..., None]
    ref = ((h * m).sum(1) / m.sum(1)) @ w.T.astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)

    assert rel_err(enc.encode(sentences), ref) < 1e-4
    assert rel_err(st_encode(out, sentences), ref) < 1e-4
    back = SentenceEncoder.from_pretrained(out)
    np.testing.assert_array_equal(back.encode(sentences), enc.encode(sentences))


def test_st_save_merges_lora(tiny_hf_model_dir, sentences, tmp_path):
    import peft
    import transformers

    base = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    torch.manual_seed(2)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q", "k"], init_lora_weights=False)).eval()
    ad = tmp_path / "adapter"
    pm.save_pretrained(ad)
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir, adapter=ad)
    before = enc.encode(sentences)
    enc.save_pretrained(tmp_path / "st", format="sentence-transformers")
    np.testing.assert_array_equal(enc.encode(sentences), before)  # unmerged again afterwards
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = pm(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = ((h * mask).sum(1) / mask.sum(1)).numpy()
    assert rel_err(st_encode(tmp_path / "st", sentences), ref) < 1e-4
    with pytest.raises(ValueError, match="merge_lora=True"):
        enc.save_pretrained(tmp_path / "st2", format="sentence-transformers", merge_lora=False)


def test_unsupported_modules_are_named(st5_dir, tmp_path):
    d = tmp_path / "bias"
    shutil.copytree(st5_dir, d)
    cfg = json.loads((d / "2_Dense" / "config.json").read_text())
    (d / "2_Dense" / "config.json").write_text(json.dumps(dict(cfg, bias=True)))
    with pytest.raises(st_format.STFormatError, match=r"2_Dense/config.json: Dense with bias=true"):
        SentenceEncoder.from_pretrained(d)
    (d / "2_Dense" / "config.json").write_text(json.dumps(dict(cfg, activation_function="torch.nn.modules.activation.Tanh")))
    with pytest.raises(st_format.STFormatError, match="Tanh"):
        SentenceEncoder.from_pretrained(d)
    (d / "2_Dense" / "config.json").write_text(json.dumps(cfg))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "weightedmean"}))
    with pytest.raises(st_format.STFormatError, match="1_Pooling/config.json: pooling 'weightedmean'"):
        SentenceEncoder.from_pretrained(d)


def test_encode_extras_match_sentence_transformers(st5_dir, sentences):
    """normalize_embeddings and similarity() as sentence-transformers defines them."""
    from sentence_transformers import SentenceTransformer

    enc = SentenceEncoder.from_pretrained(st5_dir)
    st = SentenceTransformer(str(st5_dir), device="cpu")
    emb = enc.encode(sentences)
    raw = SentenceEncoder.from_pretrained(st5_dir, normalize=False).encode(sentences, normalize_embeddings=True)
    assert rel_err(raw, emb) < 1e-5
    sim = enc.similarity(emb[:5], emb[5:9])
    ref = st.similarity(torch.tensor(emb[:5]), torch.tensor(emb[5:9])).numpy()
    assert sim.shape == (5, 4) and rel_err(sim, ref) < 1e-5


def test_quantize_matches_sentence_transformers(st5_dir, sentences):
    """encode(precision=...) equals `quantize_embeddings` exactly.

    binary/ubinary: sign bits packed per row (8 dimensions per byte, the last byte
    zero-padded); the ST5 fixture is 20 wide, not a multiple of 8, so a flat packing fails.
    int8/uint8: floor((x - min) / step) clipped to [0, 255] (minus 128 for int8), ranges
    from the batch itself.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    enc = SentenceEncoder.from_pretrained(st5_dir)
    ref = SentenceTransformer(str(st5_dir), device="cpu").encode(sentences)
    emb = enc.encode(sentences)
    for precision, width in (("int8", 20), ("uint8", 20), ("binary", 3), ("ubinary", 3)):
        got = enc.encode(sentences, precision=precision)
        assert got.shape == (len(sentences), width), precision
        src = emb if precision.endswith("int8") else ref  # int8 bins are 1/255 of the range: same input
        np.testing.assert_array_equal(got, quantize_embeddings(src, precision=precision), err_msg=precision)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["hf", "sentence-transformers"])
def test_save_with_merge_leaves_every_kernel_bit_identical(tiny_hf_model_dir, tmp_path, fmt, dtype):
    """Saving merged writes peft's merged weights and leaves the encoder's own kernels, bit for bit."""
    import peft
    import transformers
    from flax import nnx
    from safetensors.numpy import load_file

    base = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    torch.manual_seed(3)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q", "wo"], init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir, adapter=tmp_path / "adapter", dtype=dtype)

    def bits():
        return {p: np.asarray(v.get_value()).view(np.uint8).copy() for p, v in nnx.to_flat_state(nnx.state(enc.model))}

    before = bits()
    out = enc.save_pretrained(tmp_path / "out", format=fmt)
    after = bits()
    assert after.keys() == before.keys()
    for p in before:
        np.testing.assert_array_equal(after[p], before[p], err_msg="/".join(map(str, p)))
    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    saved = load_file(str(out / "model.safetensors"))[name].astype(np.float32)
    want = pm.merge_and_unload().state_dict()[name].numpy()
    assert rel_err(saved, want) <= (1e-6 if dtype == "float32" else 1e-2)  # bf16 keeps 8 mantissa bits
