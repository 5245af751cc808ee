"""What `gpu_bench.py` and its two workers (`_bench_jax.py`, `_bench_torch.py`) share.

No jax and no torch here: the parent process imports this module and must never touch
the accelerator (neither framework hands device memory back, and JAX cannot reset its
peak-memory counter), so every measurement runs in a worker subprocess.

Protocol. The parent writes a spec (JSON) and the pre-tokenised ids (`ids.npz`) into a
work folder, then runs one worker per configuration:

    python benchmarks/_bench_jax.py TASK --spec WORK/spec.json --job JOB.json --rows OUT/gpu_bench.jsonl

Both workers implement one entry, `run(task: str, spec: dict, job: dict, rows: RowWriter)`,
which `worker_main` calls; `TASKS` names what each accepts. A worker imports `mst5_jax`
(the JAX side): the package must be installed or the repository root on PYTHONPATH
(`gpu_bench.py` puts it there for its workers; the GPU machine has no pip install).

A worker appends one JSON object per result row to the rows file, flushing after each
(`RowWriter`), so rows survive a worker that is killed later. An out-of-memory error is
caught and written as a row with status "OOM at <batch>"; anything else is a row with
status "error: ...". Arrays that the parent compares (parity embeddings and gradients)
go to `WORK/parity/<model>-<side>.npz`.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2.0**30

# LoRA of the benchmark, identical on both sides: r=8 on q and v, alpha 16, no dropout.
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q", "v")
# LoRA B starts non-zero in the shared adapter, so the step-1 gradient of A is non-zero too.
LORA_B_STD = 0.01
# Optimizer of every step row, identical on both sides (torch.optim.AdamW / optax.adamw).
LEARNING_RATE = 1e-4
TEMPERATURE = 0.05

# Tiny architectures of --quick (CPU). "xxl" and "base" keep their roles, not their sizes.
QUICK_MODELS = {
    "xxl": dict(vocab_size=1024, d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2),
    "base": dict(vocab_size=2048, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2),
}
CORE_MODELS = {"xxl": "mt5-xxl", "base": "mt5-base"}

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError",
               "CUDA error: out of memory", "Failed to allocate")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def is_oom(text: str) -> bool:
    return any(m in text for m in OOM_MARKERS)


# ---------------------------------------------------------------------- rows
class RowWriter:
    """Appends result rows (JSON lines) to a file, flushed and fsynced after each row."""

    def __init__(self, path: str | os.PathLike, common: Optional[dict] = None):
        self.path = pathlib.Path(path)
        self.common = dict(common or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row: Any) -> dict:
        row = {**self.common, **row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log(f"row: {_short(row)}")
        return row


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _short(row: dict) -> str:
    keys = ("section", "side", "config", "status", "value", "unit", "peak_gib")
    return " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)


def read_rows(path: str | os.PathLike) -> list[dict]:
    p = pathlib.Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def guarded(rows: RowWriter, oom_label: str, fn: Callable[[], Any], **row: Any) -> Any:
    """Runs `fn`; an OOM becomes a row "OOM at <oom_label>", any other error an error row.

    Returns fn's result, or None after writing the failure row.
    """
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 (report everything; the parent decides)
        if isinstance(e, KeyboardInterrupt):
            raise
        text = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        if is_oom(text):
            rows.write(**row, status=f"OOM at {oom_label}", error=text[:500])
        else:
            rows.write(**row, status=f"error: {text[:300]}")
        return None


# ---------------------------------------------------------------------- token ids
def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    """int32 [batch, length]: random pieces in [2, vocab), EOS (1) last, then pad (0).

    Lengths are uniform in [length/4, length]; row 0 is full, so no batch is all short.
    Both sides always compute the full padded length (no padding removal on either).
    """
    lengths = rng.integers(max(2, length // 4), length + 1, size=batch)
    lengths[0] = length
    ids = np.zeros((batch, length), np.int32)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = rng.integers(2, vocab, size=n - 1)
        ids[i, n - 1] = 1
    return ids


def triplets(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    return {c: random_ids(rng, batch, length, vocab) for c in ("anchor", "positive", "negative")}


def load_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def timed_loop(run_once: Callable[[], Any], sync: Callable[[Any], None], iters: int,
               repeats: int = 1) -> tuple[float, list[float]]:
    """Seconds per iteration: `iters` dispatches with one sync at the end, `repeats` times.

    Returns (median seconds per iteration, every repeat's seconds per iteration).
    """
    per_iter = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = run_once()
        sync(out)
        per_iter.append((time.perf_counter() - t0) / iters)
    return float(np.median(per_iter)), per_iter


def fwd_task(spec: dict, name: str, side: str, ids, rows: RowWriter, load_s: float,
             parity: Callable[[], dict], encode: Callable[[np.ndarray], tuple],
             parts: tuple[str, ...] = ("parity", "encode")) -> None:
    """The parts of a `fwd` task ("parity", "encode"), each guarded, on either side.

    The suite runs each part in its own worker, so an encode row's peak memory is the
    encode's (weights + activations), not a parity backward pass's.

    `parity()` returns the arrays the parent compares ("embeddings" [P, d], "loss", and
    the LoRA gradients "q.lora_A" [L, r, in], "q.lora_B" [L, out, r], ... in peft's
    layout), saved to WORK/parity/<name>-<side>.npz. `encode(ids)` times the model on
    the encode ids and returns (seconds per batch, per-repeat seconds, first-call
    seconds, peak GiB or None).
    """
    def save_parity():
        arrays = parity()
        out = pathlib.Path(spec["parity_dir"]) / f"{name}-{side}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **arrays)
        rows.write(section="parity-arrays", side=side, model=name, config=f"{name} parity arrays", status="ok",
                   notes=str(out), load_s=load_s)

    if "parity" in parts:
        guarded(rows, f"{ids[f'parity_sent_{name}'].shape[0]} sentences", save_parity,
                section="parity-arrays", side=side, model=name, config=f"{name} parity arrays")
    if "encode" not in parts:
        return
    enc = ids[f"encode_{name}"]
    b, length = enc.shape
    row = dict(section="encode", side=side, model=name, config=f"{name} {b}x{length}", kind="encode", batch=b,
               length=length)

    def timed():
        sec, reps, first_s, peak = encode(enc)
        rows.write(**row, status="ok", value=b / sec, unit="sentences/s", time_s=sec, repeats_s=reps,
                   compile_s=first_s, peak_gib=peak, load_s=load_s)

    guarded(rows, f"{b}x{length}", timed, **row)


def worker_main(doc: str, tasks: dict[str, Callable], device_info: Callable[[], dict],
                setup: Optional[Callable[[dict], None]] = None) -> int:
    """Command line of a worker: `TASK --spec S --job JSON --rows R`; runs one task
    through `tasks[TASK](spec, job, rows)` (a worker's `run` dispatches the same way)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(tasks))
    ap.add_argument("--spec", required=True)
    ap.add_argument("--job", required=True, help="the job as JSON text")
    ap.add_argument("--rows", required=True)
    args = ap.parse_args()
    spec, job = load_json(args.spec), json.loads(args.job)
    if setup is not None:
        setup(spec)
    info = device_info()
    rows = RowWriter(args.rows, {**info, "suite": spec["suite"], "job": job.get("job_id")})
    log(f"{args.task} {job} on {info['device']}")
    tasks[args.task](spec, job, rows)
    return 0

