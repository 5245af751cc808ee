"""`python -m mst5_jax.convert`: every direction round-trips with identical embeddings.

References: HF PyTorch (`MT5EncoderModel` + masked mean), peft (`PeftModel` on the torch
base) and sentence-transformers (`SentenceTransformer(path)`), on real Tatoeba lines.
"""
import dataclasses
import inspect
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

from fixtures_models import tiny_hf_model_dir, tiny_t5_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax import convert as convert_module
from mst5_jax.convert import main as convert_main
from mst5_jax.formats import model_card
from mst5_jax.inference.conversion import ConvertError
from mst5_jax.utils import cli
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
    assert convert_main([str(a) for a in args]) == 0


def convert_fails(capsys, *args) -> str:
    """Runs the CLI expecting a user error: exit 2, one or two lines on stderr, no traceback."""
    capsys.readouterr()
    assert convert_main([str(a) for a in args]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    prefix = "python -m mst5_jax.convert: error: "
    assert "Traceback" not in err and prefix in err, err
    message = err[err.index(prefix):]  # log lines may come before it
    assert 1 <= len(message.strip().splitlines()) <= 2, err
    return message


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


def test_st5_with_dense_to_st_and_not_hf(tiny_t5_model_dir, sentences, tmp_path, capsys):
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
    assert "--to st" in convert_fails(capsys, "--input", src, "--to", "hf", "--output", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert card_license(out) == "other" and "unknown (not stated in the input)" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def lora_run(tiny_hf_model_dir, tmp_path_factory):
    """A training-run directory as `mst5_jax.train` writes it: run.json, tokenizer/, an orbax LoRA step."""
    import jax
    from flax import nnx

    from mst5_jax.formats import huggingface
    from mst5_jax.core import lora
    from mst5_jax.formats import run_dir
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
    mngr = run_dir.RunCheckpoints(run / "checkpoints")
    mngr.save(3, params, {"count": np.zeros((), np.int32)}, {"step": 3})
    mngr.close()
    run_dir.write_run_info(run, {
        "encoder_config": dataclasses.asdict(cfg), "mode": "lora", "lora": dataclasses.asdict(lcfg),
        "base": {"path": str(tiny_hf_model_dir), "fingerprint": run_dir.fingerprint(tiny_hf_model_dir)},
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


def test_errors_say_what_to_do(tiny_hf_model_dir, tmp_path, capsys):
    assert "no LoRA factors" in convert_fails(capsys, "--input", tiny_hf_model_dir, "--to", "peft",
                                              "--output", tmp_path / "p")
    t5x = tmp_path / "t5x_ckpt"
    t5x.mkdir()
    (t5x / "checkpoint").write_bytes(b"msgpack")
    assert re.search("T5X checkpoint.*convert_t5x_checkpoint_to_pytorch",
                     convert_fails(capsys, "--input", t5x, "--to", "hf", "--output", tmp_path / "q"))
    err = convert_fails(capsys, "--input", tmp_path / "missing", "--to", "hf", "--output", tmp_path / "r")
    assert f"{tmp_path / 'missing'}: not a directory" in err
    err = convert_fails(capsys, "--input", tiny_hf_model_dir, "--to", "hf", "--output", tiny_hf_model_dir)
    assert "is also an input" in err
    err = convert_fails(capsys, "--input", tiny_hf_model_dir, "--to", "hf", "--output", tmp_path / "no" / "dir")
    assert "does not exist; create it first" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    assert str(broken) in convert_fails(capsys, "--input", broken, "--to", "hf", "--output", tmp_path / "s")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    with pytest.raises(ConvertError, match="no LoRA factors"):  # --debug: the exception and its traceback
        convert_main(["--input", str(tiny_hf_model_dir), "--to", "peft", "--output", str(tmp_path / "p"), "--debug"])


def test_outputs_are_never_destroyed(tiny_hf_model_dir, sentences, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    err = convert_fails(capsys, "--input", tiny_hf_model_dir, "--to", "hf", "--output", out)
    assert "exists; pass --overwrite" in err and (out / "keep.txt").read_text() == "old"
    # A failing --overwrite leaves the old output as it was.
    convert_fails(capsys, "--input", tiny_hf_model_dir, "--to", "peft", "--output", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    convert("--input", tiny_hf_model_dir, "--to", "hf", "--output", out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "README.md").is_file()
    np.testing.assert_array_equal(ours(out, sentences), ours(tiny_hf_model_dir, sentences))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_help_shows_every_flag_default_and_example_once(capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    title = convert_module.__doc__.strip().splitlines()[0]
    assert text.count(title) == 1
    assert "example:\n  python -m mst5_jax.convert --input" in text
    flags = [a for a in convert_module.build_parser()._actions if a.option_strings and a.dest != "help"]
    options = text.split("options:", 1)[1]
    for action in flags:
        block = options.split(action.option_strings[-1], 1)[1].split("\n  --", 1)[0]
        assert "(default:" in block, action.option_strings



def _run_variant(lora_run, root: pathlib.Path, task: str, base_dir=None) -> pathlib.Path:
    """A copy of `lora_run` recording another task; with `base_dir`, trained from random init."""
    run = root / f"run_{task}"
    shutil.copytree(lora_run, run)
    info = json.loads((run / "run.json").read_text())
    info["task"] = task
    if base_dir is not None:  # what train.py records and writes for a LoRA run without PRETRAINED
        shutil.copytree(base_dir, run / "base")
        info["base"] = {"path": "base", "random_init": True}
    (run / "run.json").write_text(json.dumps(info))
    return run


def _card_rows(d: pathlib.Path) -> dict[str, list[tuple[str, str]]]:
    rows = {}
    for role, name, lic in re.findall(r"^\| ([^|]+) \| `([^`]+)` \| ([^|]+) \|$", (d / "README.md").read_text(), re.M):
        rows.setdefault(role.strip(), []).append((name, lic.strip()))
    return rows


def test_model_card_takes_licence_and_data_from_the_run_task(lora_run, tiny_hf_model_dir, tmp_path):
    # An mSimCSE run from random init: XNLI + SNLI + MultiNLI, CC BY-NC 4.0, no base model named.
    run = _run_variant(lora_run, tmp_path, "mst5_msimcse_cross_all", base_dir=tiny_hf_model_dir)
    out = tmp_path / "msimcse_hf"
    convert("--input", run, "--to", "hf", "--output", out)
    rows, card = _card_rows(out), (out / "README.md").read_text()
    assert card_license(out) == "cc-by-nc-4.0" and "Non-commercial" in card
    assert rows["training data"] == [("XNLI (task mst5_msimcse_cross_all)", "cc-by-nc-4.0"),
                                     ("SNLI (task mst5_msimcse_cross_all)", "cc-by-sa-4.0"),
                                     ("MultiNLI (task mst5_msimcse_cross_all)", "other (OANC's licence; parts CC BY-SA 3.0)")]
    assert "base" not in rows and "random initialisation" in card and str(run / "base") not in card
    # A peft output of that run still points at the run's own random base, which exists.
    ad = tmp_path / "msimcse_peft"
    convert("--input", run, "--to", "peft", "--output", ad)
    base_ref = json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert pathlib.Path(base_ref).is_dir() and pathlib.Path(base_ref) == (run / "base").resolve()
    # The demo's task reads XNLI only; its pretrained base is named with its own licence.
    out = tmp_path / "demo_st"
    convert("--input", _run_variant(lora_run, tmp_path, "mst5_demo_cpu"), "--to", "st", "--output", out)
    rows = _card_rows(out)
    assert rows["training data"] == [("XNLI (task mst5_demo_cpu)", "cc-by-nc-4.0")]
    assert rows["base"] == [(str(tiny_hf_model_dir), "unknown (not stated in the input)")]
    assert card_license(out) == "cc-by-nc-4.0"
    # A user's own task: the card says the data licence is unknown and the front matter is "other".
    out = tmp_path / "mine_hf"
    convert("--input", _run_variant(lora_run, tmp_path, "my_nli"), "--to", "hf", "--output", out)
    assert card_license(out) == "other"
    assert _card_rows(out)["training data"] == [
        ("task my_nli", "unknown (not a built-in task: state its data's licence with --license)")]


def test_task_datasets_match_the_registry():
    """Every built-in task's datasets, read off what tasks/registry.py's builders call."""
    from tasks import registry

    def datasets_read_by(task) -> set:
        parts = inspect.getclosurevars(task.build).nonlocals.get("names")  # register_concatenated_task
        if parts:
            return set().union(*(datasets_read_by(registry.TASKS[p]) for p in parts))
        source = inspect.getsource(task.build)
        return ({"XNLI"} if "load_xnli" in source else set()) | (
            {"SNLI", "MultiNLI"} if '"snli"' in source and '"multi_nli"' in source else set())

    for name, task in registry.TASKS.items():
        if not name.startswith("mst5_"):
            continue  # tasks other tests registered
        expected = datasets_read_by(task)
        assert expected and set(model_card.task_datasets(name)) == expected, name
    for name, mix in registry.MIXTURES.items():
        if not name.startswith("mst5_"):
            continue
        expected = set().union(*(model_card.task_datasets(t) for t in mix.task_names))
        assert set(model_card.task_datasets(name)) == expected, name
