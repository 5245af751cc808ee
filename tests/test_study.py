"""The scaling study: power-law fit, lang2vec distances, report and plots, the CLI end to end.

References: scipy (linregress, spearmanr, cosine) and lang2vec 1.1.2's own `get_features`
(run with a stand-in `pkg_resources`, which setuptools >= 81 no longer ships); the
resource classes are read back with the csv module.
"""
import csv
import importlib
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cosine as scipy_cosine

from mst5_jax.analysis import study

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the fit
def test_fit_recovers_a_known_exponent():
    n = np.geomspace(3e5, 6e9, 6)
    exact = study.fit_power_law(n, 21.0 * n**0.083)
    assert exact["exponent"] == pytest.approx(0.083, abs=1e-12)
    assert exact["coefficient"] == pytest.approx(21.0, rel=1e-9)
    assert exact["r2"] == pytest.approx(1.0, abs=1e-12)

    rng = np.random.default_rng(0)
    noisy = 21.0 * n**0.083 * np.exp(rng.normal(0, 0.02, n.shape))
    fit = study.fit_power_law(n, noisy)
    ref = stats.linregress(np.log(n), np.log(noisy))
    assert fit["exponent"] == pytest.approx(ref.slope, rel=1e-10)
    assert math.log(fit["coefficient"]) == pytest.approx(ref.intercept, rel=1e-10)
    assert fit["r2"] == pytest.approx(ref.rvalue**2, rel=1e-10)
    assert abs(fit["exponent"] - 0.083) < 0.01


def test_fit_errors_name_the_bad_points():
    with pytest.raises(ValueError, match=r"positive.*\(1000000.0, -3.0\)"):
        study.fit_power_law([1e6, 1e7, 1e8], [-3.0, 5.0, 9.0])
    with pytest.raises(ValueError, match=">= 2"):
        study.fit_power_law([1e6], [3.0])
    assert study.fit_power_law([1e6, 1e8], [10.0, 20.0])["r2"] is None


def test_sizes_parse_and_unknown_sizes_are_named():
    sizes = study.parse_sizes("small,tiny-32,xxl")
    assert [s.gin_files for s in sizes] == [["mt5_small.gin"], ["tiny.gin"], ["mt5_xxl.gin"]]
    assert "'d_model': 32" in sizes[1].bindings[0] and "'num_heads': 2" in sizes[1].bindings[0]
    with pytest.raises(ValueError, match="'huge'"):
        study.parse_sizes("small,huge")


# ---------------------------------------------------------------------- lang2vec
@pytest.fixture(scope="module")
def lang2vec_lib():
    """lang2vec.lang2vec imported with a minimal pkg_resources stand-in (resource_filename)."""
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package, name):
            spec = importlib.util.find_spec(package)
            return str(pathlib.Path(spec.origin).parent / name)

        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim
    import lang2vec.lang2vec as l2v

    return l2v


def _library_vector(values):
    return np.array([np.nan if v == "--" else float(v) for v in values])


@pytest.mark.parametrize("feature_sets", ["syntax_knn+phonology_knn+inventory_knn", "syntax_wals+phonology_wals"])
def test_lang2vec_vectors_and_distances_match_the_library(lang2vec_lib, feature_sets):
    langs = ["eng", "deu", "swh", "cmn", "jpn", "tur"]
    ref = lang2vec_lib.get_features(langs, feature_sets)
    ours, missing = study.lang2vec_features(langs, feature_sets)
    assert missing == []
    for lang in langs:
        np.testing.assert_array_equal(ours[lang], _library_vector(ref[lang]))
    dist, missing = study.typological_distances(langs, feature_sets)
    assert missing == []
    for lang in langs:
        a, b = _library_vector(ref[lang]), _library_vector(ref["eng"])
        both = ~(np.isnan(a) | np.isnan(b))
        assert dist[lang] == pytest.approx(scipy_cosine(a[both], b[both]), abs=1e-12)
    assert dist["eng"] == pytest.approx(0.0, abs=1e-12)


def test_a_language_lang2vec_lacks_is_listed_not_imputed(lang2vec_lib):
    with pytest.raises(Exception, match="ber not found"):
        lang2vec_lib.get_features(["ber"], "syntax_knn")
    dist, missing = study.typological_distances(["deu", "ber"])
    assert missing == ["ber"] and set(dist) == {"deu"}


# ---------------------------------------------------------------------- report on synthetic results
def _joshi_csv():
    lines = [l for l in (REPO / "docs/data/joshi2020_classes.csv").read_text().splitlines() if not l.startswith("#")]
    return {r["iso639_3"]: int(r["joshi_class"]) for r in csv.DictReader(lines)}


XNLI = {"de": 1.0, "fr": 1.1, "ru": 1.3, "hi": 1.6, "ur": 1.9, "sw": 2.4, "th": 2.0}
EXPONENT = 0.12


def _synthetic_sizes():
    """4 sizes whose scores are a_lang * N^EXPONENT exactly, so the average follows the law."""
    out = []
    for name, n in (("s", 3e5), ("m", 3e6), ("l", 3e7), ("xl", 3e8)):
        scale = n**EXPONENT
        xx2en = {xx: a * scale for xx, a in XNLI.items()}
        tat = {"deu": 1.2 * scale, "ber": 0.9 * scale}  # ber: in neither table
        out.append({"name": name, "params": int(n), "results": {
            "xnli_retrieval": {"xx2en": xx2en, "avg_xx2en": float(np.mean(list(xx2en.values())))},
            "tatoeba": {"per_lang": {l: {"mean": v} for l, v in tat.items()}, "avg": {"tatoeba14": None},
                        "avg_present": {"all": float(np.mean(list(tat.values())))}},
        }})
    return out


def test_report_on_synthetic_results(tmp_path):
    import matplotlib.image

    sizes = _synthetic_sizes()
    analysis = study.write_report(tmp_path, sizes, {"setting": "cross", "tasks": ["xnli_retrieval", "tatoeba"]})
    assert analysis["fit"]["exponent"] == pytest.approx(EXPONENT, abs=1e-9)
    assert analysis["fit"]["r2"] == pytest.approx(1.0, abs=1e-9)

    doc = json.loads((tmp_path / "results.json").read_text())
    classes = _joshi_csv()
    gains = {(g["task"], g["lang"]): g for g in doc["analysis"]["gains"]}
    lo, hi = 3e5**EXPONENT, 3e8**EXPONENT
    xnli3 = {"de": "deu", "fr": "fra", "ru": "rus", "hi": "hin", "ur": "urd", "sw": "swh", "th": "tha"}
    for xx, a in XNLI.items():
        g = gains[("xnli_retrieval", xnli3[xx])]
        assert g["gain"] == pytest.approx(a * (hi - lo), rel=1e-9)
        assert g["resource_class"] == classes[xnli3[xx]]
    pts = [gains[("xnli_retrieval", xnli3[xx])] for xx in XNLI]
    rho = stats.spearmanr([classes[p["lang"]] for p in pts], [p["gain"] for p in pts]).statistic
    assert doc["analysis"]["spearman"]["xnli_retrieval"]["gain_vs_resource_class"] == pytest.approx(rho)
    assert rho < 0  # constructed: lower-resource languages gain more
    assert doc["analysis"]["missing"] == {"resource_class": ["ber"], "typology": ["ber"]}
    assert gains[("tatoeba", "ber")]["resource_class"] is None and gains[("tatoeba", "ber")]["distance"] is None

    md = (tmp_path / "results.md").read_text()
    assert f"N^{EXPONENT:.4f}" in md and "resource class: ber; typology: ber" in md
    assert "| xnli_retrieval | sw->en | swh |" in md
    for png in ("scaling.png", "gains.png"):
        img = matplotlib.image.imread(tmp_path / png)
        assert img.shape[0] > 400 and img.shape[1] > 600 and img.std() > 0.01, png


# ---------------------------------------------------------------------- the command
def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                MST5_NO_SEQIO="1")


def test_dry_run_builds_every_size_on_its_hardware(tmp_path):
    cmd = [sys.executable, "-m", "mst5_jax.study", "--sizes", "small,xxl", "--setting", "cross",
           "--recipe", "xxl_lora.gin", "--out", str(tmp_path), "--dry_run"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[study] small: task mst5_msimcse_cross_all" in p.stdout and "[study] xxl:" in p.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_study_end_to_end_on_tiny_sizes(tmp_path, data_dir):
    from mst5_jax.inference.encoder import SentenceEncoder
    from mst5_jax.evals import xnli_retrieval
    import jax
    from flax import nnx

    kwargs = {"xnli_retrieval": {"max_premises": 100, "langs": ["en", "de", "sw", "ur", "zh"]}}
    cmd = [sys.executable, "-m", "mst5_jax.study", "--sizes", "tiny-16,tiny-32,tiny-64", "--setting", "cross",
           "--data", "local", "--recipe", "demo_cpu.gin", "--tasks", "xnli_retrieval,xsts",
           "--task_kwargs", json.dumps(kwargs), "--max_length", "32", "--data_dir", str(data_dir),
           "--out", str(tmp_path), "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=16", "--gin.MAX_LENGTH=16",
           "--gin.MIN_HELDOUT_GAIN=0", "--gin.TrainConfig.heldout_eval=False", "--gin.CHECKPOINT_EVERY=1000"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("results.json", "results.md", "scaling.png", "gains.png"):
        assert (tmp_path / f).is_file(), f
    doc = json.loads((tmp_path / "results.json").read_text())
    by_name = {s["name"]: s for s in doc["sizes"]}
    assert list(by_name) == ["tiny-16", "tiny-32", "tiny-64"]

    # Parameters: counted from the trained checkpoint's arrays.
    enc = SentenceEncoder.from_pretrained(tmp_path / "runs" / "tiny-64")
    counted = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(enc.model, nnx.Param))))
    assert by_name["tiny-64"]["params"] == counted
    assert enc.config.d_model == 64

    # Scores: the evaluator called directly on the trained model gives the same numbers.
    direct = xnli_retrieval(lambda s: enc.encode(s, batch_size=64, max_length=32), data_dir, **kwargs["xnli_retrieval"])
    assert by_name["tiny-64"]["results"]["xnli_retrieval"]["xx2en"] == pytest.approx(direct["xx2en"], abs=1e-9)

    # Average and fit: recomputed from the raw results with numpy / scipy.
    avgs = [np.mean([by_name[n]["results"]["xnli_retrieval"]["avg_xx2en"], by_name[n]["results"]["xsts"]["avg"]])
            for n in by_name]
    assert [a["avg"] for a in doc["analysis"]["sizes"]] == pytest.approx(avgs, abs=1e-9)
    ref = stats.linregress(np.log([by_name[n]["params"] for n in by_name]), np.log(avgs))
    assert doc["analysis"]["fit"]["exponent"] == pytest.approx(ref.slope, rel=1e-9)
    rows = {(r["size"], r["task"], r["row"]) for r in doc["per_language"]}
    assert ("tiny-16", "xnli_retrieval", "sw->en") in rows and ("tiny-64", "xsts", "ar-en") in rows
