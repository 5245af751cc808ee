"""Extension points: a new evaluator is one `register` call, with no project file edited."""
import json
import pathlib

import numpy as np


def test_toy_evaluator_through_evaluate(tmp_path, capsys):
    from mst5_jax import evaluate
    from mst5_jax.evals import registry
    from mst5_jax.evals.hash_encoder import hash_encode

    pairs = [("a cat sat on the mat", "the cat sat on a mat"), ("a dog ran home", "un chien court"),
             ("hello world", "hello, world!")]
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")

    def toy_pairs(encode, data_dir, *, max_length=None, batch_size=None, device=None, scale=1.0):
        """Mean cosine x 100 x scale of the tab-separated pairs in <data_dir>/toy/pairs.tsv."""
        rows = [line.split("\t") for line in (pathlib.Path(data_dir) / "toy" / "pairs.tsv").read_text().splitlines()]
        a = encode([r[0] for r in rows])
        b = encode([r[1] for r in rows])
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        per_pair = [float(100 * scale * (x @ y)) for x, y in zip(a, b)]
        return {"per_pair": per_pair, "mean": float(np.mean(per_pair)), "meta": {"device": device}}

    registry.register(registry.Evaluator(
        "toy_pairs", toy_pairs, headline=lambda r: r["mean"],
        table_rows=lambda r: [("mean cosine", "mean")], defaults={"scale": 0.5}))
    try:
        out = tmp_path / "r.json"
        rc = evaluate.main(["--encoder", "hash", "--tasks", "toy_pairs", "--data_dir", str(tmp_path),
                            "--output", str(out)])
        table = capsys.readouterr().out
    finally:
        registry.unregister("toy_pairs")
    assert rc == 0

    # Brute force: the hash embeddings (evaluate's default --hash_dim 256), cosine in float64, loops.
    expected = []
    for a, b in pairs:
        x, y = (hash_encode([s], dim=256)[0].astype(np.float64) for s in (a, b))
        expected.append(100 * 0.5 * sum(p * q for p, q in zip(x, y)) / (np.sqrt(x @ x) * np.sqrt(y @ y)))
    result = json.loads(out.read_text())["results"]["toy_pairs"]
    np.testing.assert_allclose(result["per_pair"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["mean"], np.mean(expected), rtol=1e-5)
    assert f"| toy_pairs | mean cosine | {result['mean']:.2f} |" in table
    assert "toy_pairs" not in registry.names()
