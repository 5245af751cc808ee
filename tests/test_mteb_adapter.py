"""mst5_jax.evals.mteb_adapter against mteb's encoder protocols, with fake tasks (mteb is not installed).

The fake mteb-2 task feeds a torch `DataLoader` of {"text": ...} rows, as mteb's
`_create_dataloader_from_texts` does, and scores bitext retrieval with `model.similarity`
and top-1, as mteb's BitextMiningEvaluator does; the reference is a numpy argmax over
cosines of the encoder's own embeddings, and HF torch for the values.
"""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax.inference.encoder import SentenceEncoder
from mst5_jax.evals.mteb_adapter import MTEBEncoder


@pytest.fixture(scope="module")
def pairs(data_dir):
    def lines(name):
        with open(data_dir / "tatoeba" / name, encoding="utf-8") as f:
            return f.read().split("\n")[:60]
    return lines("tatoeba.deu-eng.deu"), lines("tatoeba.deu-eng.eng")


class FakeMetadata:
    name, type = "Tatoeba", "BitextMining"


class FakeBitextTask:
    """mteb-2 style: DataLoader in, similarity() for scores, top-1 accuracy out."""

    def evaluate(self, model, src, tgt):
        def loader(texts):
            return DataLoader([{"text": t} for t in texts], batch_size=16)

        kw = dict(task_metadata=FakeMetadata(), hf_split="test", hf_subset="deu-eng", prompt_type=None)
        a = model.encode(loader(src), **kw)
        b = model.encode(loader(tgt), **kw)
        sim = model.similarity(a, b)
        top = torch.topk(torch.tensor(sim), 1, dim=1).indices[:, 0].numpy()
        return a, b, float(np.mean(top == np.arange(len(src))))


def test_mteb2_protocol_dataloader(tiny_hf_model_dir, pairs):
    import transformers

    src, tgt = pairs
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    a, b, acc = FakeBitextTask().evaluate(MTEBEncoder(enc, batch_size=16), src, tgt)
    assert a.dtype == np.float32 and a.shape == (60, 32)
    np.testing.assert_array_equal(a, enc.encode(src, batch_size=16))
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    model = transformers.MT5EncoderModel.from_pretrained(tiny_hf_model_dir).float().eval()
    batch = tok(src, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    assert rel_err(a, ((h * m).sum(1) / m.sum(1)).numpy()) < 1e-4
    au = a / np.linalg.norm(a, axis=1, keepdims=True)
    bu = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert acc == pytest.approx(np.mean(np.argmax(au @ bu.T, axis=1) == np.arange(60)))


def test_mteb1_protocol_and_similarity(tiny_hf_model_dir, pairs):
    import scipy.spatial.distance

    src, tgt = pairs
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    model = MTEBEncoder(enc)
    a = model.encode(src, task_name="Tatoeba", prompt_type="query")
    np.testing.assert_array_equal(a, enc.encode(src))
    b = model.encode(tgt, task_name="Tatoeba")
    ref = 1 - scipy.spatial.distance.cdist(a.astype(np.float64), b.astype(np.float64), "cosine")
    assert rel_err(model.similarity(a, b), ref) < 1e-5
    pw = model.similarity_pairwise(a, b)
    assert rel_err(pw, np.diag(ref)) < 1e-5
    with pytest.raises(TypeError, match="no 'text' entry"):
        model.encode([{"image": [1]}], task_metadata=FakeMetadata(), hf_split="test", hf_subset="x")
