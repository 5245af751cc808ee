"""The reference side of `gpu_bench.py`: HF transformers `MT5EncoderModel` + peft LoRA, in torch.

    python benchmarks/_bench_torch.py fwd  --spec S --job J --rows R   # matmul peak, parity arrays, encode
    python benchmarks/_bench_torch.py step ...                          # LoRA step, eager, +- checkpointing

This is the PyTorch original as a user would run it: `from_pretrained` on the shared
safetensors in bf16 (every weight bf16: transformers keeps `wo` in fp32 only for fp16),
peft LoRA r=8 on q and v (alpha 16, dropout 0, adapters in fp32 as peft makes them),
masked mean pooling in fp32, the contrastive loss written out below, `torch.optim.AdamW`.
It imports nothing from mst5_jax. The attention implementation is the job's `attn`
("sdpa", transformers' default, or "eager"); every row records the one the loaded model
reports (`attn_implementation`).
"""
from __future__ import annotations

import math
import pathlib
import re
import sys
import time

import numpy as np

import _bench_common as common  # noqa: E402
from _bench_common import GIB, log  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

# base_model.model.encoder.block.{i}.layer.0.SelfAttention.{q|v}.lora_{A|B}.default.weight
LORA_NAME = re.compile(r"encoder\.block\.(?P<layer>\d+)\.layer\.0\.SelfAttention\.(?P<module>\w+)\."
                       r"(?P<factor>lora_[AB])\.")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_info() -> dict:
    name = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"
    return {"device": f"{DEV.type}:{name}", "framework": "torch",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if DEV.type == "cuda" else None


def reset_peak() -> None:
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def load_model(wdir: pathlib.Path, adapter: str, checkpointing: bool = False, attn: str = "sdpa"):
    """MT5EncoderModel in bf16 from the shared folder; adapter "file" (the shared peft
    adapter, trainable) or "fresh" (a new peft LoRA: A kaiming-uniform, B zero);
    `attn` is transformers' attn_implementation ("sdpa" or "eager")."""
    kw = dict(dtype=torch.bfloat16, output_loading_info=True, attn_implementation=attn)
    if DEV.type == "cuda":
        kw["device_map"] = "cuda"
    model, info = transformers.MT5EncoderModel.from_pretrained(str(wdir), **kw)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{wdir}: from_pretrained did not load every weight: {bad}")
    model.to(DEV)
    dtypes = {str(p.dtype) for p in model.parameters()}
    if dtypes != {"torch.bfloat16"}:
        raise RuntimeError(f"{wdir}: expected every base weight in bf16, got {dtypes}")
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"asked for attn_implementation={attn!r}, got {model.config._attn_implementation!r}")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter == "file":
        return peft.PeftModel.from_pretrained(model, str(wdir / "adapter"), is_trainable=True)
    cfg = peft.LoraConfig(r=common.LORA_RANK, lora_alpha=common.LORA_ALPHA, target_modules=list(common.LORA_TARGETS),
                          lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def embed(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the last hidden state, in fp32: [B, L] -> [B, d_model]."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def contrastive_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the diagonal of [cos(a, p) | cos(a, n)] / 0.05, the N x 2N matrix."""
    a, p, n = (F.normalize(x, dim=-1) for x in (a, p, n))
    logits = torch.cat([a @ p.T, a @ n.T], dim=1) / common.TEMPERATURE
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def as_tensors(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(ids.astype(np.int64), device=DEV)
    return x, (x != 0).long()


def triplet_ids(ids, key: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The three columns stacked [3B, L] (anchors, positives, negatives) for one encoder call."""
    cols = [ids[f"{key}_{c}"] for c in ("anchor", "positive", "negative")]
    x, m = as_tensors(np.concatenate(cols, 0))
    return x, m, cols[0].shape[0]


# ---------------------------------------------------------------------- fwd
def task_fwd(spec: dict, job: dict, rows: common.RowWriter) -> None:
    if job.get("matmul"):
        common.guarded(rows, f"{spec['matmul']['n']}^3", lambda: matmul_row(spec, rows),
                       section="matmul", side="ref", config=f"bf16 matmul {spec['matmul']['n']}^3")
    name = job["model"]
    wdir = pathlib.Path(spec["weights_dir"][name])
    ids = np.load(spec["ids"])
    t0 = time.perf_counter()
    attn = job.get("attn", "sdpa")
    model = load_model(wdir, adapter="file", attn=attn)
    rows.common["attn_implementation"] = attn
    load_s = time.perf_counter() - t0
    log(f"loaded {name} in {load_s:.1f} s")

    def parity() -> dict:
        model.eval()
        x, m = as_tensors(ids[f"parity_sent_{name}"])
        with torch.no_grad():
            emb = embed(model, x, m).cpu().numpy()
        model.train()  # dropout is 0: train mode changes nothing but is what a step runs in
        x, m, b = triplet_ids(ids, f"parity_{name}")
        e = embed(model, x, m)
        loss = contrastive_loss(e[:b], e[b:2 * b], e[2 * b:])
        loss.backward()
        arrays = {"embeddings": emb.astype(np.float32), "loss": np.float32(loss.item())}
        grads: dict[str, list] = {}
        for pname, p in model.named_parameters():
            if "lora_" not in pname:
                continue
            match = LORA_NAME.search(pname)
            if match is None:
                raise RuntimeError(f"unexpected LoRA parameter name {pname}")
            grads.setdefault(f"{match['module']}.{match['factor']}", []).append(
                (int(match["layer"]), p.grad.float().cpu().numpy()))
        for k, v in grads.items():
            arrays[k] = np.stack([g for _, g in sorted(v, key=lambda t: t[0])])
        model.zero_grad(set_to_none=True)
        return arrays

    def encode(enc: np.ndarray) -> tuple:
        base = model.merge_and_unload().eval()  # inference folds the adapter in
        x, m = as_tensors(enc)
        reset_peak()
        with torch.inference_mode():
            t0 = time.perf_counter()
            embed(base, x, m)
            sync()
            first_s = time.perf_counter() - t0
            for _ in range(spec["encode"]["warmup"]):
                embed(base, x, m)
            sync()
            sec, reps = common.timed_loop(lambda: embed(base, x, m), lambda o: sync(), spec["encode"]["iters"],
                                          spec["encode"]["repeats"])
        return sec, reps, first_s, peak_gib()

    common.fwd_task(spec, name, "ref", ids, rows, load_s, parity, encode, tuple(job.get("parts", ("parity", "encode"))))


def matmul_row(spec: dict, rows: common.RowWriter) -> None:
    n, iters = spec["matmul"]["n"], spec["matmul"]["iters"]
    g = torch.Generator(device=DEV).manual_seed(1)
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16, generator=g)
    for _ in range(2):
        a @ b
    sync()
    sec, reps = common.timed_loop(lambda: a @ b, lambda o: sync(), iters, repeats=3)
    rows.write(section="matmul", side="ref", config=f"bf16 matmul {n}^3", status="ok",
               value=2 * n**3 / sec / 1e12, unit="TFLOP/s", time_s=sec, repeats_s=reps)
    del a, b
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- step
def task_step(spec: dict, job: dict, rows: common.RowWriter) -> None:
    name, ckpt, attn = job["model"], bool(job.get("checkpointing")), job.get("attn", "sdpa")
    ids = np.load(spec["ids"])
    b, length = ids[f"{job['ids']}_anchor"].shape
    row = dict(section=job["section"], side="ref", model=name, config=job["config"], kind="train",
               batch=b, length=length, remat="checkpointing" if ckpt else "none", attn_implementation=attn)

    def run():
        t0 = time.perf_counter()
        model = load_model(pathlib.Path(spec["weights_dir"][name]), adapter="fresh", checkpointing=ckpt, attn=attn)
        model.train()
        init_s = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=common.LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        x, m, nb = triplet_ids(ids, job["ids"])

        def one():
            opt.zero_grad(set_to_none=True)
            e = embed(model, x, m)
            loss = contrastive_loss(e[:nb], e[nb:2 * nb], e[2 * nb:])
            loss.backward()
            opt.step()
            return loss

        reset_peak()
        t0 = time.perf_counter()
        one()
        sync()
        first_s = time.perf_counter() - t0
        for _ in range(job["warmup"] - 1):
            one()
        sync()
        t0 = time.perf_counter()
        for _ in range(job["iters"]):  # no host sync inside the loop
            loss = one()
        sync()
        sec = (time.perf_counter() - t0) / job["iters"]
        loss = float(loss.item())
        rows.write(**row, status="ok" if math.isfinite(loss) else "error: non-finite loss",
                   value=b / sec, unit="triplets/s", time_s=sec, compile_s=first_s, first_step_s=first_s,
                   init_s=init_s, peak_gib=peak_gib(), loss=loss,
                   trainable_params=sum(p.numel() for p in params))

    common.guarded(rows, f"{b} triplets", run, **row)


TASKS = {"fwd": task_fwd, "step": task_step}


def run(task: str, spec: dict, job: dict, rows: common.RowWriter) -> None:
    """The worker protocol's one entry (see `_bench_common`)."""
    TASKS[task](spec, job, rows)


def setup(spec: dict) -> None:
    torch.manual_seed(0)
    if spec.get("quick"):
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


if __name__ == "__main__":
    sys.exit(common.worker_main(__doc__, TASKS, device_info, setup))
