"""GPU benchmark: this project against HF PyTorch + PEFT, side by side, one card.

    python benchmarks/gpu_bench.py                      # --suite core, on the GPU machine
    python benchmarks/gpu_bench.py --quick              # CPU, tiny sizes: checks every row runs
    python benchmarks/gpu_bench.py --sections xxl_step,gradcache --budget 280
    python benchmarks/gpu_bench.py --resume             # rerun only what an earlier run did not finish
    python benchmarks/gpu_bench.py --core               # the one-device-call set (benchmarks/run_on_gpu.sh --core)
    python benchmarks/gpu_bench.py --cap encode_xxl=200 --min-s step=40   # per-job-size caps / minimum budget

Imports `mst5_jax` (for sizes and FLOPs) and the sibling `_bench_common`: run it as a script
from the repository root with the package installed, or with `PYTHONPATH=.` (the GPU
machine has no pip install; benchmarks/run_on_gpu.sh sets PYTHONPATH itself).

--core: the bf16 matmul peak; our xxl LoRA step at the best policy (--best-remat)
and at the memory-bound one (full remat) against the reference (sdpa and eager, with and
without gradient checkpointing); xxl and base encode against the reference, without the
parity passes. Budget 480 s, sized for one cold H100/H200 device call of 9 minutes.

Rows (core suite, mT5 sizes, bf16 compute and weights, LoRA r=8 on q and v, dropout 0):
  matmul     bf16 8192^3 matmul in jax and in torch: the peak that MFU divides by.
  xxl_fwd    parity: embeddings of the same ids on the same weights, ours vs HF + peft
             (cosine >= 0.999), and the step-1 LoRA gradients with B non-zero (cosine
             >= 0.99); then encode xxl 256 x 64, model only, adapters merged, both sides.
  xxl_step   LoRA train step, xxl, 32 triplets x 64 tokens: ours with the best remat
             policy (--best-remat) and full remat; the reference with sdpa and with eager
             attention (each row records `attn_implementation`), with and without
             gradient checkpointing.
  gradcache  ours, 1024 triplets x 64 tokens, GradCache micro-batches of 128 with cached
             layer inputs (`mst5_jax.core.gradcache`: the FLOPs of one full-remat step):
             triplets/s and peak memory over 3 steps.
  base_fwd   parity and encode for mT5-base, 512 x 64.
  e2e        `SentenceEncoder.encode` end to end on real Tatoeba text (tokenisation included).
  step128    ours, 128 triplets, the GradCache remat policy, no GradCache: the baseline
             GradCache's throughput is compared with.
  gradcache_plain  the same GradCache without cached layer inputs (bounded memory, one
             extra forward: at most ~74% of step128 by FLOPs); last, as the budget allows.

Rules: every configuration runs in its own subprocess (JAX cannot reset its
peak-memory counter, and neither framework hands memory back); an out-of-memory
configuration is a row "OOM at N", not a crash; each section has a time cap and the
whole run a budget (--budget, default 300 s); rows are flushed to OUT/gpu_bench.jsonl
as they are produced; the end prints a markdown table (also OUT/gpu_bench.md, with the
ratios in OUT/gpu_bench_summary.json). The JAX compilation cache lives in the git-ignored
`.cache/jax_cc`, the shared weights (written once, reused on a warm machine) in
`.cache/gpu_bench/weights`.

Same work on both sides: the same pre-tokenised ids (random pieces, EOS, padding, no
padding removal on either side), the same weights (safetensors on local disk), r=8 on
q and v, bf16 compute, the full N x 2N contrastive loss (temperature 0.05), gradients
for every LoRA parameter, AdamW (lr 1e-4, no weight decay).

MFU = model FLOPs / (time x the larger bf16 matmul peak measured in this run), model FLOPs
= forward 2·N_nonemb·tokens + attention products, plus for a train step the activation
gradients (as much again) and the LoRA weight gradients (`mst5_jax.training.flops.model_flops_per_triplet`);
recompute is not counted. Our step rows also give HFU: the matmul FLOPs the traced program
executes (`mst5_jax.training.flops.matmul_flops`, recompute and GradCache passes included) over the
same time x peak, so MFU / HFU separates the cost of a policy from how well the GPU runs it.

The reference rows need torch, transformers and peft; where they are not importable
(the Python 3.12 check venv) they are skipped, and the table says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

import _bench_common as common  # the sibling module: this file runs as a script

HERE = pathlib.Path(__file__).resolve().parent

REPO = common.REPO
SECTIONS = ("xxl_fwd", "xxl_step", "gradcache", "base_fwd", "e2e", "step128", "gradcache_plain")
EMBEDDING_COSINE = 0.999
GRADIENT_COSINE = 0.99
HISTORY = "history.jsonl"  # every run's rows, in the work folder (--resume reads it)
OUT_FILES = ("gpu_bench.jsonl", "gpu_bench.md", "gpu_bench_summary.json", "workers.log")


# ---------------------------------------------------------------------- sizes
def suite_sizes(quick: bool) -> dict:
    """Every size of the run. Core: the shapes of docs/BENCHMARKS.md's targets; quick: tiny, for a CPU."""
    if quick:
        return {
            "models": {k: {"fields": v} for k, v in common.QUICK_MODELS.items()},
            "matmul": {"n": 256, "iters": 3},
            "parity": {"sentences": 4, "triplets": 4, "length": 16},
            "encode": {"xxl": [8, 16], "base": [8, 16], "warmup": 1, "iters": 3, "repeats": 1},
            "step": {"triplets": 4, "length": 16, "warmup": 2, "iters": 2},
            "gradcache": {"triplets": 8, "length": 16, "microbatch": 4, "warmup": 1, "iters": 2},
            "e2e": {"langs": ["deu", "fra", "spa"], "per_file": 100, "batch_size": 16, "max_length": 32,
                    "vocab_size": 400},
            "caps": {"prep": 90, "parity_xxl": 90, "parity_base": 90, "encode_xxl": 90, "encode_base": 90,
                     "step": 90, "gradcache": 90, "e2e": 90},
            "min_s": {"prep": 5, "parity_xxl": 5, "parity_base": 5, "encode_xxl": 5, "encode_base": 5,
                      "step": 5, "gradcache": 5, "e2e": 5},
            "budget": 240,
        }
    return {
        "models": {k: {"preset": v} for k, v in common.CORE_MODELS.items()},
        "matmul": {"n": 8192, "iters": 10},
        "parity": {"sentences": 16, "triplets": 8, "length": 64},
        "encode": {"xxl": [256, 64], "base": [512, 64], "warmup": 2, "iters": 5, "repeats": 3},
        "step": {"triplets": 32, "length": 64, "warmup": 2, "iters": 5},
        "gradcache": {"triplets": 1024, "length": 64, "microbatch": 128, "warmup": 1, "iters": 2},
        "e2e": {"langs": ["deu", "fra", "spa", "rus", "cmn", "jpn", "ara", "hin", "tur", "vie", "kor", "pol"],
                "per_file": 1000, "batch_size": 512, "max_length": 64, "vocab_size": 8000},
        # Per-job-size caps (s) and the least budget left to start such a job (a job that
        # cannot finish is not started); --cap / --min-s override. The run stops at --budget.
        "caps": {"prep": 150, "parity_xxl": 120, "parity_base": 60, "encode_xxl": 150, "encode_base": 60,
                 "step": 120, "gradcache": 150, "e2e": 60},
        "min_s": {"prep": 60, "parity_xxl": 60, "parity_base": 20, "encode_xxl": 60, "encode_base": 20,
                  "step": 60, "gradcache": 90, "e2e": 20},
        "budget": 300,
    }


def model_vocab(spec: dict, name: str) -> int:
    m = spec["models"][name]
    if "fields" in m:
        return m["fields"]["vocab_size"]
    from mst5_jax.core.config import EncoderConfig  # pure Python, no jax

    return EncoderConfig.preset(m["preset"]).vocab_size


# ---------------------------------------------------------------------- jobs
@dataclasses.dataclass
class Job:
    section: str
    worker: str  # "jax" or "torch"
    task: str
    side: str  # "ours", "ref" or "-"
    config: str
    job: dict
    cap_s: float
    oom_label: str = ""
    min_s: float = 15.0  # the least budget left to start it (set per job size by plan_jobs)

    def __post_init__(self):
        self.job["job_id"] = self.id

    @property
    def id(self) -> str:
        """Names the job in every row it produces (how --resume recognises finished jobs)."""
        return f"{self.section}/{self.side}/{self.task}/{self.config}"


def plan_jobs(sizes: dict, sections: list[str], best_remat: str, gradcache_remat: str,
              parity: bool = True) -> list[Job]:
    """The jobs of the run in priority order (what the budget cuts first comes last).

    Each job's cap and min_s come from sizes["caps"] / sizes["min_s"] by its size key
    (prep, parity_<model>, encode_<model>, step, gradcache, e2e)."""
    caps, st, gc = sizes["caps"], sizes["step"], sizes["gradcache"]
    jobs: list[Job] = []
    need = [m for m, secs in (("xxl", ("xxl_fwd", "xxl_step")), ("base", ("base_fwd", "e2e")))
            if any(s in sections for s in secs)]
    jobs.append(Job("prep", "jax", "prep", "-", "bf16 matmul peak + shared weights (" + ", ".join(need) + ")",
                    {"matmul": True, "models": need}, caps["prep"], "weights"))
    torch_matmul = [True]
    deferred: list[Job] = []

    def fwd(name: str) -> list[Job]:
        """Parity on both sides, then each side's encode in a fresh worker (its own peak memory)."""
        b, length = sizes["encode"][name]
        out = []
        if parity:
            p = f"parity_{name}"
            out += [Job(f"{name}_fwd", "jax", "fwd", "ours", f"{name} parity", {"model": name, "parts": ["parity"]},
                        caps[p], f"{b}x{length}"),
                    Job(f"{name}_fwd", "torch", "fwd", "ref", f"{name} parity",
                        {"model": name, "parts": ["parity"], "matmul": torch_matmul[0]}, caps[p], f"{b}x{length}")]
            torch_matmul[0] = False
        e = f"encode_{name}"
        out += [Job(f"{name}_fwd", "jax", "fwd", "ours", f"{name} encode {b}x{length}",
                    {"model": name, "parts": ["encode"]}, caps[e], f"{b}x{length}"),
                Job(f"{name}_fwd", "torch", "fwd", "ref", f"{name} encode {b}x{length}, sdpa",
                    {"model": name, "parts": ["encode"], "attn": "sdpa", "matmul": torch_matmul[0]}, caps[e],
                    f"{b}x{length}")]
        torch_matmul[0] = False
        return out

    def step(section: str, side: str, b: int, length: int, warmup: int, iters: int, **kw) -> Job:
        ids = f"step_xxl_{b}x{length}"
        if side == "ours":
            what = f"remat={kw['remat']}" + (f", GradCache micro-batch {kw['microbatch']}" if kw.get("microbatch") else "")
            what += ", cached layer inputs" if kw.get("cache_layer_inputs") else ""
        else:
            what = kw["attn"] + (" + gradient checkpointing" if kw.get("checkpointing") else "")
        config = f"xxl LoRA step {b}x{length}, {what}"
        job = {"section": section, "model": "xxl", "ids": ids, "warmup": warmup, "iters": iters,
               "config": config, **kw}
        return Job(section, "jax" if side == "ours" else "torch", "step", side, config, job, caps["step"],
                   f"{b} triplets")

    for section in sections:
        if section == "xxl_fwd":
            jobs += fwd("xxl")
        elif section == "base_fwd":
            jobs += fwd("base")
        elif section == "xxl_step":
            args = (st["triplets"], st["length"], st["warmup"], st["iters"])
            jobs += [step(section, "ours", *args, remat=best_remat),
                     step(section, "ref", *args, checkpointing=False, attn="sdpa"),
                     step(section, "ref", *args, checkpointing=True, attn="sdpa"),
                     step(section, "ours", *args, remat="full")]
            # eager attention is not the reference's default: measured last, as the budget allows
            deferred += [step(section, "ref", *args, checkpointing=False, attn="eager"),
                         step(section, "ref", *args, checkpointing=True, attn="eager")]
        elif section in ("gradcache", "gradcache_plain"):
            j = step(section, "ours", gc["triplets"], gc["length"], gc["warmup"], gc["iters"],
                     remat=gradcache_remat, microbatch=gc["microbatch"], cache_layer_inputs=section == "gradcache")
            j.cap_s, j.min_s = caps["gradcache"], sizes["min_s"]["gradcache"]
            jobs.append(j)
        elif section == "step128":
            jobs.append(step(section, "ours", gc["microbatch"], gc["length"], st["warmup"], st["iters"],
                             remat=gradcache_remat))
        elif section == "e2e":
            e = sizes["e2e"]
            jobs.append(Job("e2e", "jax", "e2e", "ours", f"base SentenceEncoder.encode, Tatoeba, batch {e['batch_size']}",
                            {"model": "base", **e, "config": f"base SentenceEncoder.encode, Tatoeba, batch "
                                                             f"{e['batch_size']}, max_length {e['max_length']}"},
                            caps["e2e"], f"batch {e['batch_size']}"))
    jobs += deferred
    for j in jobs:
        if j.section != "gradcache" and j.section != "gradcache_plain":
            key = {"prep": "prep", "step": "step", "e2e": "e2e"}.get(j.task)
            if key is None:  # fwd
                key = ("parity_" if j.job["parts"] == ["parity"] else "encode_") + j.job["model"]
            j.min_s = sizes["min_s"][key]
    return jobs


def step_id_shapes(jobs: list[Job]) -> set[tuple[int, int]]:
    out = set()
    for j in jobs:
        if j.task == "step":
            b, length = j.job["ids"].split("_")[-1].split("x")
            out.add((int(b), int(length)))
    return out


def write_ids(path: pathlib.Path, spec: dict, sizes: dict, jobs: list[Job], seed: int) -> None:
    """Pre-tokenised ids shared by both sides (random pieces, EOS, padding)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    p = sizes["parity"]
    for name in spec["models"]:
        vocab = model_vocab(spec, name)
        arrays[f"parity_sent_{name}"] = common.random_ids(rng, p["sentences"], p["length"], vocab)
        for c, v in common.triplets(rng, p["triplets"], p["length"], vocab).items():
            arrays[f"parity_{name}_{c}"] = v
        b, length = sizes["encode"][name]
        arrays[f"encode_{name}"] = common.random_ids(rng, b, length, vocab)
    vocab = model_vocab(spec, "xxl")
    for b, length in sorted(step_id_shapes(jobs)):
        for c, v in common.triplets(rng, b, length, vocab).items():
            arrays[f"step_xxl_{b}x{length}_{c}"] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


# ---------------------------------------------------------------------- running
class Runner:
    """Runs jobs one subprocess at a time under the budget; records failures as rows."""

    def __init__(self, args, spec: dict, out: pathlib.Path, work: pathlib.Path, deadline: float):
        self.args, self.spec, self.out, self.work, self.deadline = args, spec, out, work, deadline
        self.rows_path = out / "gpu_bench.jsonl"
        self.rows = common.RowWriter(self.rows_path, {"suite": spec["suite"]})
        self.env = worker_env(args.quick)
        self.torch_ok = torch_available()
        self.count = 0
        self.proc: Optional[subprocess.Popen] = None
        self.stopped: Optional[str] = None
        self.earlier = earlier_rows(pathlib.Path(args.resume), spec["suite"]) if args.resume else {}
        self.finished = finished_jobs(self.earlier)
        self.resumed: set[str] = set()

    def stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT (e.g. an outer `timeout`): kill the running worker, skip the rest,
        still write the table. Workers run in their own sessions, so they would outlive us."""
        self.stopped = signal.Signals(signum).name
        if self.proc is not None:
            _kill_group(self.proc)

    def run(self, job: Job) -> None:
        row = dict(section=job.section, side=job.side, config=job.config, framework=job.worker,
                   model=job.job.get("model"), job=job.id)
        done = self.finished.get(job.id)
        if done and job.task != "prep":
            for r in done:
                self.rows.write(**{**r, "resumed": True})
            self.resumed.add(job.id)
            return
        if self.stopped:
            self.rows.write(**row, status=f"skipped: interrupted ({self.stopped})")
            return
        if job.worker == "torch" and not self.torch_ok:
            self.rows.write(**row, status=f"skipped: torch/transformers/peft not importable in {sys.executable} "
                                          f"(reference rows need them)")
            return
        remaining = self.deadline - time.time()
        if remaining < job.min_s:
            self.rows.write(**row, status=f"skipped: budget ({remaining:.0f} s left of --budget {self.args.budget:.0f})")
            return
        timeout = min(job.cap_s, remaining)
        self.count += 1
        log_path = self.work / "logs" / f"{self.count:02d}-{job.section}-{job.side}-{job.task}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        worker = HERE / ("_bench_jax.py" if job.worker == "jax" else "_bench_torch.py")
        cmd = [sys.executable, str(worker), job.task, "--spec", str(self.work / "spec.json"),
               "--job", json.dumps(job.job), "--rows", str(self.rows_path)]
        before = len(common.read_rows(self.rows_path))
        common.log(f"start {job.section}/{job.side}/{job.task} ({job.config}), cap {timeout:.0f} s")
        t0 = time.time()
        with open(log_path, "w", encoding="utf-8") as lf:
            proc = self.proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=self.env,
                                                cwd=str(REPO), start_new_session=True)
            try:
                rc: Any = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                rc = "timeout"
            finally:
                self.proc = None
        wall = time.time() - t0
        text = log_path.read_text(encoding="utf-8", errors="replace")
        with open(self.out / "workers.log", "a", encoding="utf-8") as f:
            f.write(f"\n===== {log_path.name} ({wall:.1f} s, rc={rc}) =====\n{text[-20000:]}")
        new = len(common.read_rows(self.rows_path)) - before
        common.log(f"end {job.section}/{job.side}/{job.task}: rc={rc}, {wall:.1f} s, {new} rows")
        if rc == 0 and new:
            return
        tail = text[-1500:]
        if self.stopped:
            status = f"interrupted ({self.stopped}) after {wall:.0f} s"
        elif rc == "timeout":
            status = f"timeout after {timeout:.0f} s (job cap {job.cap_s:.0f} s; raise it with --cap)"
        elif common.is_oom(text):
            status = f"OOM at {job.oom_label}"
        else:
            status = f"crashed (rc={rc})" if rc != 0 else "error: the worker wrote no row"
        self.rows.write(**row, status=status, wall_s=wall, error=tail)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and anything it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def earlier_rows(path: pathlib.Path, suite: str) -> dict[str, list[dict]]:
    """Rows of earlier runs (the work folder's history, or a carried gpu_bench.jsonl), by
    job id, latest run of each job only; parity rows (no job) under "parity/<model>"."""
    latest: dict[str, list[dict]] = {}
    for r in common.read_rows(path):
        if r.get("suite") != suite:
            continue
        key = r.get("job") or (f"parity/{r.get('model')}" if r.get("section") == "parity" else None)
        if key is None:
            continue
        run = r.get("run", 0)  # a gpu_bench.jsonl from $OUT is one run
        rows = latest.setdefault(key, [])
        if rows and rows[0].get("run", 0) != run:
            rows.clear()
        rows.append(r)
    return {k: [{f: v for f, v in r.items() if f not in ("run", "time", "resumed")} for r in rows]
            for k, rows in latest.items()}


def finished_jobs(earlier: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The earlier jobs that finished (every row ok, or an OOM, which is a result too):
    --resume copies their rows instead of rerunning them."""
    def final(status: str) -> bool:
        return status == "ok" or status.startswith("OOM at")

    return {k: rows for k, rows in earlier.items()
            if not k.startswith("parity/") and rows and all(final(str(r.get("status"))) for r in rows)}


def worker_env(quick: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax_cc"))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    # XLA's warnings (e.g. a fallback from the cuDNN attention, rematerialisation) stay in
    # workers.log: TF_CPP_MIN_LOG_LEVEL is left as the caller set it.
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if quick:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def resolve_data_dir(arg: Optional[str]) -> Optional[pathlib.Path]:
    """Where Tatoeba is: --data-dir, $MST5_DATA_DIR, ../shared/data, or .cache/bench_data
    (the copy a device call carries, since ../shared does not travel to the GPU machine)."""
    candidates = [arg, os.environ.get("MST5_DATA_DIR"), REPO.parent / "shared" / "data", REPO / ".cache" / "bench_data"]
    for c in candidates:
        if c and (pathlib.Path(c) / "tatoeba").is_dir():
            return pathlib.Path(c).resolve()
    return None


# ---------------------------------------------------------------------- parity
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def parity_rows(rows: common.RowWriter, parity_dir: pathlib.Path, name: str, sizes: dict,
                earlier: Optional[list[dict]] = None) -> None:
    """Compares the two sides' arrays; writes the embedding and gradient parity rows.

    Without the arrays (a resumed run on a fresh machine) the earlier run's parity rows
    are copied, when there are any."""
    ours, ref = parity_dir / f"{name}-ours.npz", parity_dir / f"{name}-ref.npz"
    p = sizes["parity"]
    configs = (f"{name} embeddings, {p['sentences']} sentences x {p['length']}",
               f"{name} step-1 LoRA gradients (B non-zero), {p['triplets']} triplets x {p['length']}")
    if not (ours.is_file() and ref.is_file()) and earlier:
        for r in earlier:
            rows.write(**{**r, "resumed": True})
        return
    if not (ours.is_file() and ref.is_file()):
        missing = ", ".join(str(f.name) for f in (ours, ref) if not f.is_file())
        for c in configs:
            rows.write(section="parity", side="-", model=name, config=c, status=f"skipped: no arrays ({missing})")
        return
    a, b = np.load(ours), np.load(ref)
    per_row = [cosine(x, y) for x, y in zip(a["embeddings"], b["embeddings"])]
    emb_min = min(per_row)
    rows.write(section="parity", side="-", model=name, config=configs[0],
               status="pass" if emb_min >= EMBEDDING_COSINE else "FAIL", value=emb_min, unit="min cosine",
               threshold=EMBEDDING_COSINE, mean_cosine=float(np.mean(per_row)),
               rel_err=float(np.linalg.norm(a["embeddings"] - b["embeddings"]) / np.linalg.norm(b["embeddings"])))
    keys = sorted(k for k in a.files if k.endswith(("lora_A", "lora_B")))
    if keys != sorted(k for k in b.files if k.endswith(("lora_A", "lora_B"))):
        rows.write(section="parity", side="-", model=name, config=configs[1],
                   status=f"FAIL: gradient names differ: ours {keys}, ref {sorted(b.files)}")
        return
    shapes_ok = all(a[k].shape == b[k].shape for k in keys)
    if not shapes_ok:
        rows.write(section="parity", side="-", model=name, config=configs[1],
                   status="FAIL: gradient shapes differ: " + ", ".join(f"{k} {a[k].shape} vs {b[k].shape}" for k in keys))
        return
    total = cosine(np.concatenate([a[k].ravel() for k in keys]), np.concatenate([b[k].ravel() for k in keys]))
    per_tensor = {k: cosine(a[k], b[k]) for k in keys}
    per_layer_min = min(cosine(a[k][i], b[k][i]) for k in keys for i in range(a[k].shape[0]))
    rows.write(section="parity", side="-", model=name, config=configs[1],
               status="pass" if total >= GRADIENT_COSINE else "FAIL", value=total, unit="cosine",
               threshold=GRADIENT_COSINE, per_tensor_cosine=per_tensor, min_layer_cosine=per_layer_min,
               nonzero=bool(all(np.any(a[k] != 0) for k in keys)),
               loss_ours=float(a["loss"]), loss_ref=float(b["loss"]))


# ---------------------------------------------------------------------- summary
def add_flops(rows: list[dict], spec: dict) -> float | None:
    """Adds model_flops, tflops and mfu to timing rows; returns the peak used (TFLOP/s)."""
    peaks = [r["value"] for r in rows if r.get("section") == "matmul" and r.get("status") == "ok"]
    peak = max(peaks) if peaks else None
    from mst5_jax.core.config import EncoderConfig
    from mst5_jax.training.flops import model_flops_per_triplet

    for r in rows:
        if r.get("status") != "ok" or r.get("kind") not in ("encode", "train") or r.get("section") == "e2e":
            continue
        m = spec["models"][r["model"]]
        cfg = EncoderConfig.preset(m["preset"]) if "preset" in m else EncoderConfig(**m["fields"])
        lora_params = cfg.num_layers * len(common.LORA_TARGETS) * common.LORA_RANK * (cfg.d_model + cfg.inner_dim)
        if r["kind"] == "train":
            flops = model_flops_per_triplet(cfg, r["length"], lora_params, False, texts=3) * r["batch"]
        else:  # forward only: half of a LoRA-free step's count
            flops = model_flops_per_triplet(cfg, r["length"], 0, False, texts=r["batch"]) / 2
        r["model_flops"] = flops
        r["tflops"] = flops / r["time_s"] / 1e12
        if peak:
            r["mfu"] = r["tflops"] / peak
            if r.get("matmul_flops"):  # ours: what the program executes, recompute included
                r["hfu"] = r["matmul_flops"] / r["time_s"] / 1e12 / peak
    return peak


def ratios(rows: list[dict]) -> dict:
    """The ratios docs/BENCHMARKS.md's targets are stated in (ours / reference), where both sides ran."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("value")]
    pick = lambda **kw: [r for r in ok if all(r.get(k) == v for k, v in kw.items())]  # noqa: E731
    out: dict[str, Any] = {}
    for name in ("xxl", "base"):
        o, f = pick(section="encode", side="ours", model=name), pick(section="encode", side="ref", model=name)
        if o and f:
            out[f"encode_{name}"] = o[0]["value"] / f[0]["value"]
    ours, ref = pick(section="xxl_step", side="ours"), pick(section="xxl_step", side="ref")
    if ours and ref:
        best_o, best_r = max(ours, key=lambda r: r["value"]), max(ref, key=lambda r: r["value"])
        out["step_best"] = {"ratio": best_o["value"] / best_r["value"], "ours": best_o["config"], "ref": best_r["config"]}
        ckpt = sorted((r for r in ref if r.get("remat") == "checkpointing" and r.get("peak_gib")),
                      key=lambda r: -r["value"])
        if ckpt:
            limit = ckpt[0]["peak_gib"]
            within = [r for r in ours if r.get("peak_gib") is not None and r["peak_gib"] <= limit]
            out["step_at_ref_ckpt_memory"] = (
                {"ratio": max(r["value"] for r in within) / ckpt[0]["value"], "memory_limit_gib": limit}
                if within else {"ratio": None, "memory_limit_gib": limit,
                                "note": "no configuration of ours fits under the reference's checkpointing peak"})
    base = pick(section="step128", side="ours")
    for section, key in (("gradcache", "gradcache_vs_step128"), ("gradcache_plain", "gradcache_plain_vs_step128")):
        gc = pick(section=section, side="ours")
        if gc and base:
            out[key] = gc[0]["value"] / base[0]["value"]
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 1 or x == 0:
            return f"{x:.{digits}f}"
        return f"{x:.3g}"
    return str(x)


def _mfu_text(mfu: Optional[float]) -> str:
    if mfu is None:
        return ""
    if mfu > 1.0:  # a tiny or CPU peak measurement: not a utilisation
        return f"n/a ({100 * mfu:.0f}% > 100%: peak under-measured)"
    return f"{100 * mfu:.1f}%"


def peak_advice(peak: Optional[float], quick: bool) -> list[str]:
    """The measured peak and the gin line to paste into a hardware gin file (gin/runs/*.gin)."""
    if not peak:
        return []
    if quick:
        return [f"Measured bf16 matmul peak {peak:.2f} TFLOP/s (quick mode: tiny CPU matmul, not a hardware peak; "
                "do not paste it into a gin file)."]
    return [f"Measured bf16 matmul peak {peak:.1f} TFLOP/s per device. For MFU in training logs, paste into the "
            f"hardware gin file (e.g. gin/runs/xxl_lora.gin): `TrainConfig.peak_tflops = {peak:.1f}`"]


def markdown(rows: list[dict], peak: Optional[float], rat: dict, header: list[str], quick: bool = False) -> str:
    lines = header + ["", "| section | side | config | status | result | ms/iter | peak GiB | TFLOP/s | MFU | "
                          "compile/first s | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("section") == "parity-arrays" and r.get("status") == "ok":
            continue
        value = r.get("value")
        if r.get("section") == "parity" and value is not None:
            result = f"{r.get('unit')} {value:.5f} (>= {r.get('threshold')})"
        elif value is not None and r.get("unit"):
            result = f"{_fmt(value)} {r['unit']}"
        else:
            result = ""
        ms = r.get("time_s")
        notes = r.get("notes") or ""
        if r.get("resumed"):
            notes = "from an earlier run (--resume)" + ("; " + notes if notes else "")
        if r.get("xla_step_gib") is not None:
            notes = (notes + "; " if notes else "") + f"XLA step memory {_fmt(r['xla_step_gib'], 2)} GiB"
        if r.get("hfu") is not None:
            notes = (notes + "; " if notes else "") + (f"executes {r['matmul_flops'] / r['model_flops']:.3f}x model "
                                                       f"FLOPs, HFU {100 * r['hfu']:.1f}%")
        if r.get("error") and not r.get("status", "").startswith("ok"):
            notes = (notes + "; " if notes else "") + r["error"].strip().splitlines()[-1][:160]
        status = str(r.get("status", "")).replace("|", "/")
        lines.append("| " + " | ".join([
            str(r.get("section", "")), str(r.get("side", "")), str(r.get("config", "")), status, result,
            _fmt(None if ms is None or r.get("section") in ("weights",) else ms * 1000, 1),
            _fmt(r.get("peak_gib"), 2), _fmt(r.get("tflops"), 1),
            _mfu_text(r.get("mfu")),
            _fmt(r.get("compile_s", r.get("first_call_s")), 1), notes.replace("|", "/")]) + " |")
    if rat:
        label = ("Ratios (quick mode: tiny models on a CPU, NOT meaningful, they only show the rows ran): "
                 if quick else "Ratios (ours / reference, where both ran): ")
        lines += ["", label + "; ".join(f"{k}: {_ratio_text(v)}" for k, v in rat.items())]
    if peak:
        lines.append(f"MFU divides by the larger measured bf16 matmul peak, {peak:.1f} TFLOP/s"
                     + (" (quick mode: MFU is not meaningful)." if quick else "."))
        lines += peak_advice(peak, quick)
    return "\n".join(lines) + "\n"


def _ratio_text(v: Any) -> str:
    if isinstance(v, dict):
        r = v.get("ratio")
        extra = f" at <= {v['memory_limit_gib']:.1f} GiB" if "memory_limit_gib" in v else ""
        return ("n/a" if r is None else f"{r:.2f}x") + extra
    return f"{v:.2f}x"


# ---------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See docs/BENCHMARKS.md for the table layout and the commands.")
    ap.add_argument("--suite", default="core", choices=["core"], help="the row set (extended: a later issue)")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny sizes: checks every row end to end")
    ap.add_argument("--out", default=None, help="result folder (default $OUT, else out/gpu_bench)")
    ap.add_argument("--work", default=None, help="weights, ids and logs (default .cache/gpu_bench[_quick])")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (the order given is kept)")
    ap.add_argument("--budget", type=float, default=None, help="wall-time budget in s (core 300, quick 240)")
    ap.add_argument("--best-remat", default="dots", choices=["none", "full", "dots", "residual"],
                    help="the remat policy of our 'best' step row")
    ap.add_argument("--gradcache-remat", default="full", choices=["none", "full", "dots", "residual"])
    ap.add_argument("--data-dir", default=None, help="root holding tatoeba/ (default: see resolve_data_dir)")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="ROWS",
                    help="copy the rows of jobs that finished ok in an earlier run instead of rerunning them: "
                         "from the --work folder's history (a second call on the warm machine), or from ROWS, "
                         "an earlier gpu_bench.jsonl (carried to a fresh machine)")
    ap.add_argument("--core", action="store_true",
                    help="the one-device-call set: xxl_step, xxl_fwd and base_fwd without parity, budget 480 s")
    ap.add_argument("--cap", action="append", default=[], metavar="KEY=S",
                    help="per-job-size time cap in s; KEY one of prep, parity_xxl, parity_base, encode_xxl, "
                         "encode_base, step, gradcache, e2e (repeatable)")
    ap.add_argument("--min-s", action="append", default=[], metavar="KEY=S",
                    help="least budget (s) left to start a job of that size (same keys as --cap; repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-cpu", action="store_true", help="run the core sizes without a GPU (very slow)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    sizes = suite_sizes(args.quick)
    for flag, table in (("--cap", sizes["caps"]), ("--min-s", sizes["min_s"])):
        for item in getattr(args, flag[2:].replace("-", "_")):
            key, _, val = item.partition("=")
            if key not in table or not val:
                raise SystemExit(f"{flag} {item!r}: expected KEY=SECONDS with KEY one of {', '.join(table)}")
            table[key] = float(val)
    if args.core:
        if args.sections == ",".join(SECTIONS):
            args.sections = "xxl_step,xxl_fwd,base_fwd"
        if args.budget is None:
            # quick: the CPU twin of the device call, within 150 s on two busy cores
            args.budget = 130.0 if args.quick else 480.0
    args.budget = args.budget or sizes["budget"]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {','.join(SECTIONS)}")
    if not args.quick and not args.allow_cpu and shutil.which("nvidia-smi") is None:
        raise SystemExit("the core suite needs the GPU machine (no nvidia-smi here); use --quick on a CPU")
    out = pathlib.Path(args.out or os.environ.get("OUT") or REPO / "out" / "gpu_bench").resolve()
    work = pathlib.Path(args.work or REPO / ".cache" / ("gpu_bench_quick" if args.quick else "gpu_bench")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # this run's files only
        (out / name).unlink(missing_ok=True)
    if args.resume == "":
        args.resume = str(work / HISTORY)
    if args.resume is None:
        shutil.rmtree(work / "parity", ignore_errors=True)
    shutil.rmtree(work / "logs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    suite = ("quick" if args.quick else args.suite) + ("-core" if args.core else "")
    spec = {"suite": suite, "quick": args.quick, "seed": args.seed, "work": str(work),
            "models": sizes["models"], "matmul": sizes["matmul"], "encode": sizes["encode"],
            "weights_dir": {m: str(work / "weights" / m) for m in sizes["models"]},
            "ids": str(work / "ids.npz"), "parity_dir": str(work / "parity")}
    jobs = plan_jobs(sizes, sections, args.best_remat, args.gradcache_remat, parity=not args.core)
    data_dir = resolve_data_dir(args.data_dir)
    for j in jobs:
        if j.task == "e2e":
            j.job["data_dir"] = str(data_dir) if data_dir else None
    write_ids(pathlib.Path(spec["ids"]), spec, sizes, jobs, args.seed)
    (work / "spec.json").write_text(json.dumps(spec, indent=2))

    runner = Runner(args, spec, out, work, deadline=t_start + args.budget)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    common.log(f"gpu_bench {suite}: {len(jobs)} jobs, budget {args.budget:.0f} s, out {out}, work {work}")
    if not runner.torch_ok:
        common.log("torch/transformers/peft are not importable here: the reference rows are skipped")
    for i, job in enumerate(jobs):
        if job.task == "e2e" and data_dir is None:
            runner.rows.write(section="e2e", side="ours", config=job.config, framework="jax",
                              status="skipped: no Tatoeba data (looked in --data-dir, $MST5_DATA_DIR, ../shared/data, "
                                     ".cache/bench_data; ../shared does not travel to the GPU machine: copy "
                                     "tatoeba/ into .cache/bench_data and carry it, see benchmarks/run_on_gpu.sh)")
            continue
        runner.run(job)
        if job.worker == "torch" and job.task == "fwd" and job.job.get("parts") == ["parity"]:
            model = job.job["model"]
            both_resumed = all(j.id in runner.resumed for j in jobs
                               if j.task == "fwd" and j.job["model"] == model and j.job.get("parts") == ["parity"])
            parity_rows(runner.rows, work / "parity", model, sizes,
                        runner.earlier.get(f"parity/{model}") if both_resumed else None)

    rows = common.read_rows(runner.rows_path)
    with open(work / HISTORY, "a", encoding="utf-8") as f:
        for r in rows:
            if not r.get("resumed"):
                f.write(json.dumps({**r, "run": t_start}, default=str) + "\n")
    peak = add_flops(rows, spec)
    rat = ratios(rows)
    devices = sorted({r["device"] for r in rows if r.get("device")})
    versions: dict = {}
    for r in rows:
        versions.update(r.get("versions") or {})
    wall = time.time() - t_start
    header = [f"# gpu_bench {suite}: {time.strftime('%Y-%m-%d %H:%M')}",
              "", f"- command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
              f"- device(s): {', '.join(devices) or 'none reported'}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}",
              f"- wall time: {wall:.0f} s (budget {args.budget:.0f} s)"]
    if not runner.torch_ok:
        header.append(f"- reference rows skipped: torch/transformers/peft are not importable in {sys.executable}")
    if args.quick:
        header.append("- quick mode: tiny models on a CPU; the ratios and MFU below are NOT meaningful")
    table = markdown(rows, peak, rat, header, quick=args.quick)
    (out / "gpu_bench.md").write_text(table, encoding="utf-8")
    (out / "gpu_bench_summary.json").write_text(json.dumps(
        {"suite": suite, "wall_s": wall, "budget_s": args.budget, "peak_tflops": peak, "ratios": rat,
         "ratios_meaningful": not args.quick,
         "devices": devices, "versions": versions, "rows": rows}, indent=2, default=str), encoding="utf-8")
    print(table)
    bad = [r for r in rows if r.get("section") == "parity" and str(r.get("status", "")).startswith("FAIL")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
