"""End-to-end `SentenceEncoder.encode` vs sentence-transformers loading our own export.

    PYTHONPATH=. MST5_DATA_DIR=../shared/data python benchmarks/encode_bench.py [--lines 2000]
        [--batch_size 64] [--max_length 128] [--repeats 2]

One process, one model: a random mt5-small-shaped encoder (8 layers, d_model 512, 6 heads
of 64, d_ff 1024, gated-GELU, float32) with the tests' 300-piece SentencePiece vocabulary
(no mT5 vocabulary offline), saved by `SentenceEncoder.save_pretrained(...,
format="sentence-transformers")` and loaded by `sentence_transformers.SentenceTransformer`
from that folder. Both encode the same `--lines` Tatoeba lines (round-robin over every
language file, so the languages are mixed) with the same batch size and max_length,
tokenisation included. Each side runs once to warm up (our first call compiles every bucket
shape), then `--repeats` timed runs; the best is kept. It checks that the embeddings agree
(max relative difference <= 1e-5) and prints sentences/s, the padding fraction (padded token
positions that are padding; sentence-transformers pads each batch of its length-sorted order to
its longest member) and the ratio. Goal (docs/BENCHMARKS.md): ours >= 4x sentence-transformers.

It also measures this machine's float32 matmul rate (a jitted [4096, 512] x [512, 1024] GEMM)
and prints the floor: the real tokens' linear-layer FLOPs at that rate, the time no float32
implementation of the same sentences can beat without changing the embeddings, and so the
highest ratio reachable here.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mst5_jax.inference.encoder import SentenceEncoder  # noqa: E402

SMALL = dict(model_type="mt5", feed_forward_proj="gated-gelu", vocab_size=300, d_model=512, d_ff=1024,
             num_heads=6, d_kv=64, num_layers=8)


def tatoeba_mixed(n: int) -> list[str]:
    """`n` non-empty lines, taken round-robin from every Tatoeba file (mixed languages)."""
    root = pathlib.Path(os.environ.get("MST5_DATA_DIR", REPO.parent / "shared" / "data")) / "tatoeba"
    files = sorted(root.glob("tatoeba.*-eng.*"))
    if not files:
        raise SystemExit(f"no Tatoeba files under {root}")
    per_file = [[s for s in f.read_text(encoding="utf-8").split("\n") if s.strip()] for f in files]
    out, k = [], 0
    while len(out) < n and k < max(len(p) for p in per_file):
        out.extend(p[k] for p in per_file if k < len(p))
        k += 1
    return out[:n]


def mt5_small_shape(out: pathlib.Path) -> pathlib.Path:
    """A random mt5-small-shaped HF encoder directory, written by transformers (not mst5_jax)."""
    import shutil  # noqa: PLC0415

    from fixtures_models import cached_tiny_model_dir  # noqa: PLC0415
    from hf_reference import hf_config, random_encoder, save_hf_dir  # noqa: PLC0415

    tiny = cached_tiny_model_dir(REPO / ".cache" / "tests", pathlib.Path(os.environ["MST5_DATA_DIR"]))
    save_hf_dir(random_encoder(hf_config(**SMALL), seed=0), out)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).is_file():
            shutil.copy(tiny / name, out / name)
    return out


def st_padding(st, sentences: list[str], batch_size: int) -> float:
    """Padding fraction of sentence-transformers' batches: its order (longest text first), each
    batch padded to its longest tokenised member."""
    tok = st.tokenizer
    lens = np.array([len(x) for x in tok(sentences, truncation=True, max_length=st.max_seq_length)["input_ids"]])
    order = np.argsort([-len(s) for s in sentences], kind="stable")
    padded = sum(len(b) * lens[b].max() for b in np.array_split(order, range(batch_size, len(order), batch_size)))
    return 1.0 - lens.sum() / padded


def matmul_gflops(repeats: int = 20) -> float:
    """This machine's float32 GEMM rate through XLA, GFLOP/s (best of `repeats` calls)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    m, k, n = 4096, 512, 1024
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best, _ = best_of(lambda: f(a, b).block_until_ready(), repeats)
    return 2 * m * k * n / best / 1e9


def linear_flops_per_token(cfg: dict) -> int:
    """Multiply-adds x 2 of one token through the encoder's linear layers (attention's
    q, k, v, o and the gated feed-forward's wi_0, wi_1, wo); attention scores excluded."""
    inner = cfg["num_heads"] * cfg["d_kv"]
    return 2 * cfg["num_layers"] * (4 * cfg["d_model"] * inner + 3 * cfg["d_model"] * cfg["d_ff"])


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import jax  # noqa: PLC0415
    import sentence_transformers  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    sentences = tatoeba_mixed(args.lines)
    tmp = tempfile.TemporaryDirectory()
    hf_dir = mt5_small_shape(pathlib.Path(tmp.name) / "hf")
    export = SentenceEncoder.from_pretrained(hf_dir).save_pretrained(pathlib.Path(tmp.name) / "st",
                                                                     format="sentence-transformers")
    ours = SentenceEncoder.from_pretrained(export)
    st = sentence_transformers.SentenceTransformer(str(export), device="cpu")
    st.max_seq_length = args.max_length
    st.eval()

    def run_ours():
        return ours.encode(sentences, batch_size=args.batch_size, max_length=args.max_length)

    def run_st():
        with torch.inference_mode():
            return st.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True)

    t0 = time.perf_counter()
    run_ours()
    first_ours = time.perf_counter() - t0
    run_st()
    t_ours, emb_ours = best_of(run_ours, args.repeats)
    stats = ours.last_stats
    t_st, emb_st = best_of(run_st, args.repeats)
    err = float(np.max(np.abs(emb_ours - emb_st)) / np.max(np.abs(emb_st)))
    pad_st = st_padding(st, sentences, args.batch_size)
    n = len(sentences)
    print(f"machine: {os.cpu_count()} CPUs; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")
    print(f"{n} Tatoeba lines (mixed languages), {stats.real_tokens} tokens, batch {args.batch_size}, "
          f"max_length {args.max_length}, mt5-small shape, float32")
    print("| encoder | sentences/s | seconds | padding fraction |\n|---|---|---|---|")
    print(f"| mst5_jax SentenceEncoder.encode | {n / t_ours:.1f} | {t_ours:.2f} | {stats.padding_fraction:.1%} |")
    print(f"| sentence-transformers (our export) | {n / t_st:.1f} | {t_st:.2f} | {pad_st:.1%} |")
    print(f"ratio {t_st / t_ours:.2f}x (goal >= 4x); max relative difference {err:.1e} (must be <= 1e-5); "
          f"our first call (compiles) {first_ours:.1f} s, {stats.batches} batches")
    peak = matmul_gflops()
    floor_s = stats.real_tokens * linear_flops_per_token(SMALL) / (peak * 1e9)
    print(f"float32 matmul {peak:.0f} GFLOP/s here; ours ran {stats.padded_tokens * linear_flops_per_token(SMALL) / t_ours / 1e9:.0f} "
          f"GFLOP/s on its padded positions, sentence-transformers about "
          f"{stats.real_tokens / (1 - pad_st) * linear_flops_per_token(SMALL) / t_st / 1e9:.0f}. Floor: the real tokens alone "
          f"take {floor_s:.1f} s at that rate, so no float32 encoder exceeds {t_st / floor_s:.2f}x here")
    if not err <= 1e-5:
        raise SystemExit(f"embeddings differ: max relative difference {err:.1e} > 1e-5")


if __name__ == "__main__":
    main()
