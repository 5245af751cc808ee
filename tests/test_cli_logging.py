"""Repeated warnings become one summary: truncation is warned once per evaluation, not per encode call."""
import logging

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from mst5_jax.inference.encoder import SentenceEncoder, truncation_summary

LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


def test_truncation_is_summarised_once_per_block(tiny_hf_model_dir, caplog):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    caplog.set_level(logging.WARNING, logger="mst5_jax.inference.encoder")
    enc.encode([LONG, "short"], max_length=8)
    assert [r.getMessage() for r in caplog.records] == ["encode: 1 of 2 sentences were truncated to max_length=8 tokens"]
    caplog.clear()
    with truncation_summary("held-out eval") as counts:
        for _ in range(3):  # e.g. one call per language
            enc.encode([LONG, LONG, "short"], max_length=8)
        assert not caplog.records  # nothing until the block ends
    assert counts["truncated"] == 6 and counts["sentences"] == 9
    assert [r.getMessage() for r in caplog.records] == [
        "held-out eval: 6 of 9 sentences were truncated to max_length=8 tokens"]
