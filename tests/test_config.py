"""EncoderConfig: presets, parameter counts of the paper (docs/MODELS.md), HF config round trip, bad input."""
import json

import pytest
from flax import nnx

from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import abstract_model, count_params

# The paper's encoder sizes (docs/MODELS.md): total and non-embedding encoder parameters, in millions.
PAPER_COUNTS = {
    "mt5-small": (146.9, 18.9),
    "mt5-base": (277.0, 85.0),
    "mt5-large": (564.4, 308.3),
    "mt5-xl": (1670.0, 1157.7),
    "mt5-xxl": (5655.2, 4630.7),
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_encoder_param_counts_match_paper_abstractly(name):
    cfg = EncoderConfig.preset(name)
    model = abstract_model(cfg)  # ShapeDtypeStructs only: nothing is allocated
    counted = count_params(nnx.state(model, nnx.Param))
    total, non_emb = PAPER_COUNTS[name]
    assert round(counted / 1e6, 1) == total
    assert round((counted - cfg.vocab_size * cfg.d_model) / 1e6, 1) == non_emb
    assert counted == cfg.num_params()


def test_presets_cover_families():
    assert EncoderConfig.preset("t5-11b").d_kv == 128 and EncoderConfig.preset("t5-11b").feed_forward == "relu"
    assert EncoderConfig.preset("google/t5-v1_1-base").gated
    assert EncoderConfig.preset("tiny").num_layers == 2
    with pytest.raises(KeyError, match="unknown model preset"):
        EncoderConfig.preset("mt5-huge")


def test_hf_dict_round_trip_and_errors(tmp_path):
    cfg = EncoderConfig.preset("mt5-base")
    again = EncoderConfig.from_hf_dict(cfg.to_hf_dict())
    for f in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers", "feed_forward",
              "relative_attention_num_buckets", "relative_attention_max_distance"):
        assert getattr(again, f) == getattr(cfg, f), f
    bert = tmp_path / "config.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ValueError, match=r"config.json: model_type='bert'"):
        EncoderConfig.from_hf_json(bert)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        EncoderConfig.from_hf_json(broken)
    with pytest.raises(ValueError, match="missing keys"):
        EncoderConfig.from_hf_dict({"model_type": "mt5", "d_model": 8})
    with pytest.raises(ValueError, match="float16"):
        EncoderConfig(dtype="float16")
