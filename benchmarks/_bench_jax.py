"""The JAX side of `gpu_bench.py`: one task per process (see `_bench_common` for the protocol).

    python benchmarks/_bench_jax.py prep  --spec S --job J --rows R   # bf16 matmul peak, shared weights
    python benchmarks/_bench_jax.py fwd   ...                          # parity arrays, encode timing
    python benchmarks/_bench_jax.py step  ...                          # LoRA train step (GradCache too)
    python benchmarks/_bench_jax.py e2e   ...                          # SentenceEncoder.encode on Tatoeba

Everything runs through the project's own code: `load_hf_weights` + `load_peft_adapter`
read the shared safetensors, `loss_and_grads` / `make_train_step` are the training step
(`init_train_state`: fp32 LoRA factors, bf16 frozen base, AdamW, state donated), and
`SentenceEncoder.encode` is the public encoder.

Imports `mst5_jax`: installed, or `PYTHONPATH=.` from the repository root (what
`gpu_bench.py` sets for its workers; the GPU machine has no pip install).
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np

import _bench_common as common  # noqa: E402
from _bench_common import GIB, log  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mst5_jax.formats import huggingface, peft
from mst5_jax.formats.safetensors import write_safetensors
from mst5_jax.training import flops
from mst5_jax.core import lora
from mst5_jax.core import partitioning
from mst5_jax.training import train_step  # noqa: E402
from mst5_jax.core.config import EncoderConfig  # noqa: E402
from mst5_jax.core.model import abstract_model, path_str  # noqa: E402

WEIGHTS_FORMAT = 1  # bump when the layout of the shared weights folder changes


# ---------------------------------------------------------------------- helpers
def encoder_config(spec: dict, name: str, **overrides) -> EncoderConfig:
    """The bf16 (compute and storage) config of model `name` ("xxl" or "base") of the spec."""
    m = spec["models"][name]
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", dropout_rate=0.0, **overrides)
    if "preset" in m:
        return EncoderConfig.preset(m["preset"], **kw)
    return EncoderConfig(**m["fields"], name=name, **kw)


def device_info() -> dict:
    d = jax.devices()[0]
    return {"device": f"{d.platform}:{getattr(d, 'device_kind', '?')}", "framework": "jax",
            "versions": {"jax": jax.__version__, "flax": _version("flax"), "optax": _version("optax")}}


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "?"


def peak_gib() -> float | None:
    """Peak device memory of this process so far (allocator), GiB; None where unknown (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GIB


def init_stats(cfg: EncoderConfig, name: str) -> tuple[float, float]:
    """(mean, std) of HF's T5 initialisation for parameter `name` (norm scales jittered).

    Norm scales are 1 + 0.1 N(0, 1) rather than HF's exact 1, so a norm bug cannot hide
    in the parity rows.
    """
    if name.endswith("norm/scale"):
        return 1.0, 0.1
    if name.endswith("token_embedder/embedding"):
        return 0.0, 1.0
    if name.endswith("relpos_bias/embedding"):
        return 0.0, cfg.d_model**-0.5
    stds = {"attention/q": (cfg.d_model * cfg.d_kv) ** -0.5, "attention/k": cfg.d_model**-0.5,
            "attention/v": cfg.d_model**-0.5, "attention/o": cfg.inner_dim**-0.5,
            "mlp/wi": cfg.d_model**-0.5, "mlp/wi_0": cfg.d_model**-0.5, "mlp/wi_1": cfg.d_model**-0.5,
            "mlp/wo": cfg.d_ff**-0.5}
    for key, std in stds.items():
        if name.endswith(key + "/kernel"):
            return 0.0, std
    raise KeyError(f"no initialisation rule for parameter {name}")


_CHUNK = 1 << 26  # elements generated at once: bounds the fp32 temporaries to 256 MiB


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape: tuple, dtype: str, mean, std):
    """mean + std * N(0, 1) in `dtype`, generated in slices along the leading axis so the
    fp32 temporaries stay small (peak memory of the timing rows is then the weights)."""
    chunks = 1
    n = math.prod(shape)
    if n > _CHUNK and shape:
        chunks = next((c for c in range(1, shape[0] + 1) if shape[0] % c == 0 and n // c <= _CHUNK), shape[0])
    piece = (shape[0] // chunks,) + tuple(shape[1:]) if shape else shape

    def one(k):
        return (mean + std * jax.random.normal(k, piece, jnp.float32)).astype(dtype)

    if chunks == 1:
        return one(key)
    return jax.lax.map(one, jax.random.split(key, chunks)).reshape(shape)


def random_model(cfg: EncoderConfig, seed: int):
    """A `SentenceModel` whose weights are drawn on the device, leaf by leaf (HF init scales).

    Used by the timing rows, whose speed does not depend on the values; the parity rows
    read the shared safetensors instead.
    """
    graphdef, state = nnx.split(abstract_model(cfg))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        name = path_str(path)
        mean, std = init_stats(cfg, name)
        shape, dtype = tuple(var.get_value().shape), str(var.get_value().dtype)
        var.set_value(_normal(jax.random.fold_in(key, i), shape, dtype, mean, std))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------- prep
def task_prep(spec: dict, job: dict, rows: common.RowWriter) -> None:
    if job.get("matmul"):
        common.guarded(rows, f"{spec['matmul']['n']}^3", lambda: matmul_row(spec, rows),
                       section="matmul", side="ours", config=f"bf16 matmul {spec['matmul']['n']}^3")
    for name in job.get("models", []):
        cfg = encoder_config(spec, name)
        out = pathlib.Path(spec["weights_dir"][name])
        common.guarded(rows, name, lambda: write_weights(cfg, out, spec["seed"], rows, name),
                       section="weights", side="-", model=name, config=f"{name} bf16 safetensors")


def matmul_row(spec: dict, rows: common.RowWriter) -> None:
    n, iters = spec["matmul"]["n"], spec["matmul"]["iters"]
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    f(a, b).block_until_ready()
    sec, reps = common.timed_loop(lambda: f(a, b), lambda o: o.block_until_ready(), iters, repeats=3)
    rows.write(section="matmul", side="ours", config=f"bf16 matmul {n}^3", status="ok",
               value=2 * n**3 / sec / 1e12, unit="TFLOP/s", time_s=sec, repeats_s=reps)


def _fingerprint(cfg: EncoderConfig, seed: int) -> dict:
    return {"format": WEIGHTS_FORMAT, "seed": seed, "config": cfg.to_hf_dict(),
            "lora": [common.LORA_RANK, common.LORA_ALPHA, list(common.LORA_TARGETS), common.LORA_B_STD]}


def write_weights(cfg: EncoderConfig, out: pathlib.Path, seed: int, rows: common.RowWriter, name: str) -> None:
    """Writes the shared weights once: `config.json` + `model.safetensors` (bf16, HF names
    and layout) and `adapter/` (a peft LoRA adapter, q and v, r=8, B non-zero, fp32).

    Both sides load these files, so parity compares identical weights. A folder whose
    DONE marker matches this config and seed is reused (a rerun on a warm machine).
    """
    marker = out / "DONE"
    want = _fingerprint(cfg, seed)
    if marker.is_file() and json.loads(marker.read_text()) == want:
        rows.write(section="weights", side="-", model=name, config=f"{name} bf16 safetensors", status="ok",
                   value=None, notes=f"reused {out}")
        return
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    (out / "adapter").mkdir(parents=True)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))}
    key = jax.random.key(seed)
    tensors = []
    for i, (pname, entries) in enumerate(huggingface.hf_names(cfg).items()):
        shape = tuple(flat[pname].get_value().shape)
        stacked = len(entries) > 1 or pname.startswith("encoder/layers/")
        per = shape[1:] if stacked else shape
        mean, std = init_stats(cfg, pname)
        for j, (tname, transpose) in enumerate(entries):
            hf_shape = per[::-1] if transpose else per  # torch Linear weights are [out, in]
            t = _normal(jax.random.fold_in(jax.random.fold_in(key, i), j), hf_shape, "bfloat16", mean, std)
            tensors.append((tname, np.asarray(jax.device_get(t))))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_safetensors(out / huggingface.SAFETENSORS, iter(tensors), metadata={"format": "pt"})
    nbytes = sum(t.nbytes for _, t in tensors)
    del tensors
    write_adapter(cfg, out / "adapter", seed)
    marker.write_text(json.dumps(want))
    rows.write(section="weights", side="-", model=name, config=f"{name} bf16 safetensors", status="ok",
               value=nbytes / GIB, unit="GiB", time_s=time.perf_counter() - t0, notes=str(out))


def write_adapter(cfg: EncoderConfig, out: pathlib.Path, seed: int) -> None:
    """A peft adapter folder: A [r, in] ~ U(+-1/sqrt(in)) (peft's init), B [out, r] ~ N(0, 0.01^2)."""
    rng = np.random.default_rng(seed + 1)
    r, tensors = common.LORA_RANK, []
    bound = 1.0 / math.sqrt(cfg.d_model)
    for i in range(cfg.num_layers):
        for t in common.LORA_TARGETS:
            name = f"{peft.PEFT_PREFIX}encoder.block.{i}.layer.0.SelfAttention.{t}"
            tensors.append((f"{name}.lora_A.weight", rng.uniform(-bound, bound, (r, cfg.d_model)).astype(np.float32)))
            tensors.append((f"{name}.lora_B.weight",
                            rng.normal(0.0, common.LORA_B_STD, (cfg.inner_dim, r)).astype(np.float32)))
    write_safetensors(out / peft.ADAPTER_SAFETENSORS, iter(tensors), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": False,
              "r": r, "lora_alpha": common.LORA_ALPHA, "lora_dropout": 0.0, "target_modules": list(common.LORA_TARGETS),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    (out / peft.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------- fwd: parity + encode
def task_fwd(spec: dict, job: dict, rows: common.RowWriter) -> None:
    name = job["model"]
    cfg = encoder_config(spec, name)
    wdir = pathlib.Path(spec["weights_dir"][name])
    ids = np.load(spec["ids"])
    t0 = time.perf_counter()
    model = huggingface.load_hf_weights(wdir, cfg)
    peft.load_peft_adapter(model, wdir / "adapter")
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - t0
    log(f"loaded {name} in {load_s:.1f} s")

    def parity() -> dict:
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
        sent = ids[f"parity_sent_{name}"]
        emb = np.asarray(fwd(state, sent, (sent != 0).astype(np.int32)), np.float32)
        g_def, params, frozen = lora.split_trainable(model, "lora")
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        batch = {c: jnp.asarray(ids[f"parity_{name}_{c}"]) for c in ("anchor", "positive", "negative")}
        keys = train_step.dropout_keys(jax.random.key(0), jnp.zeros((), jnp.int32), 1)
        loss_cfg = train_step.LossConfig(temperature=common.TEMPERATURE)
        loss, _, grads = jax.jit(lambda p, f, b: train_step.loss_and_grads(g_def, p, f, b, keys, loss_cfg))(
            params, frozen, batch)
        arrays = {"embeddings": emb, "loss": np.float32(loss)}
        for path, var in nnx.to_flat_state(grads):
            module, factor = path_str(path).split("/")[-2:]  # encoder/layers/attention/q/lora_a
            g = np.asarray(var.get_value(), np.float32)  # [L, in, r] or [L, r, out]
            arrays[f"{module}.lora_{'A' if factor == 'lora_a' else 'B'}"] = np.transpose(g, (0, 2, 1))
        return arrays

    def encode(enc: np.ndarray) -> tuple:
        lora.merge(model)  # inference folds the adapter in, as the reference's merge_and_unload does
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
        x, m = jax.device_put(enc), jax.device_put((enc != 0).astype(np.int32))
        t0 = time.perf_counter()
        fwd(state, x, m).block_until_ready()
        first_s = time.perf_counter() - t0
        for _ in range(spec["encode"]["warmup"]):
            fwd(state, x, m).block_until_ready()
        sec, reps = common.timed_loop(lambda: fwd(state, x, m), lambda o: o.block_until_ready(),
                                      spec["encode"]["iters"], spec["encode"]["repeats"])
        return sec, reps, first_s, peak_gib()

    common.fwd_task(spec, name, "ours", ids, rows, load_s, parity, encode, tuple(job.get("parts", ("parity", "encode"))))


# ---------------------------------------------------------------------- step
def task_step(spec: dict, job: dict, rows: common.RowWriter) -> None:
    name, remat, micro = job["model"], job["remat"], job.get("microbatch")
    cached = bool(job.get("cache_layer_inputs"))
    ids = np.load(spec["ids"])
    batch_np = {c: ids[f"{job['ids']}_{c}"] for c in ("anchor", "positive", "negative")}
    b, length = batch_np["anchor"].shape
    row = dict(section=job["section"], side="ours", model=name, config=job["config"], kind="train",
               batch=b, length=length, remat=remat, microbatch=micro, cache_layer_inputs=cached)

    def run():
        cfg = encoder_config(spec, name, remat=remat)
        t0 = time.perf_counter()
        model = random_model(cfg, spec["seed"])
        lora.apply_lora(model, lora.LoRAConfig(rank=common.LORA_RANK, alpha=common.LORA_ALPHA,
                                               targets=common.LORA_TARGETS), 0)
        mesh = partitioning.make_mesh(partitioning.MeshConfig(), jax.devices()[:1])
        rules = partitioning.logical_axis_rules("single")
        optimizer = optax_adamw()
        base_ptr = _first_kernel_pointer(model)
        graphdef, state, frozen, shardings = train_step.init_train_state(
            model, optimizer, mesh, rules, mode="lora", frozen_dtype="bfloat16")
        frozen_copied = base_ptr is not None and base_ptr != _first_kernel_pointer_state(frozen)
        del model
        init_s = time.perf_counter() - t0
        step = train_step.make_train_step(graphdef, optimizer, train_step.LossConfig(temperature=common.TEMPERATURE),
                                          mesh, shardings, microbatch_size=micro, cache_layer_inputs=cached)
        bsh = partitioning.batch_sharding(mesh, 1)
        batch = {c: jax.device_put(v, bsh) for c, v in batch_np.items()}
        t0 = time.perf_counter()
        traced = step.trace(state, frozen, batch)
        # Matmul FLOPs the program really runs (remat recompute and GradCache passes included).
        executed = flops.matmul_flops(traced.jaxpr.jaxpr)
        compiled = traced.lower().compile()
        compile_s = time.perf_counter() - t0
        xla_gib = _xla_step_gib(compiled)
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        first_s = time.perf_counter() - t0
        for _ in range(job["warmup"] - 1):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(job["iters"]):  # no host sync inside the loop
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        sec = (time.perf_counter() - t0) / job["iters"]
        loss = float(metrics["loss"])
        rows.write(**row, status="ok" if math.isfinite(loss) else "error: non-finite loss",
                   value=b / sec, unit="triplets/s", time_s=sec, compile_s=compile_s, first_step_s=first_s,
                   init_s=init_s, peak_gib=peak_gib(), xla_step_gib=xla_gib, loss=loss, matmul_flops=executed,
                   notes=("frozen weights were copied by init_train_state" if frozen_copied else None))

    common.guarded(rows, f"{b} triplets" + (f" (micro-batch {micro})" if micro else ""), run, **row)


def optax_adamw():
    import optax

    return optax.adamw(common.LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def _first_kernel_pointer(model) -> int | None:
    try:
        return model.encoder.layers.attention.k.kernel[...].unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 (a diagnostic only)
        return None


def _first_kernel_pointer_state(frozen) -> int | None:
    try:
        for path, var in nnx.to_flat_state(frozen):
            if path_str(path) == "encoder/layers/attention/k/kernel":
                return var.get_value().unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001
        return None
    return None


def _xla_step_gib(compiled) -> float | None:
    """XLA's own account of the step's memory: arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return total / GIB
    except Exception:  # noqa: BLE001 (not every backend reports it)
        return None


# ---------------------------------------------------------------------- e2e
def task_e2e(spec: dict, job: dict, rows: common.RowWriter) -> None:
    from mst5_jax.inference.encoder import SentenceEncoder
    from mst5_jax.formats.tokenizer import Tokenizer
    from mst5_jax.formats.vocab import train_sentencepiece
    from mst5_jax.utils.files import distinct_texts

    name = job["model"]
    row = dict(section="e2e", side="ours", model=name, config=job["config"], kind="encode")
    tatoeba = pathlib.Path(job["data_dir"]) / "tatoeba"
    files = []
    for lang in job["langs"]:
        files += [tatoeba / f"tatoeba.{lang}-eng.{lang}", tatoeba / f"tatoeba.{lang}-eng.eng"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        rows.write(**row, status=f"skipped: Tatoeba files missing ({missing[0]} ...)")
        return
    sentences = []
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        sentences += [s for s in lines[: job["per_file"]] if s.strip()]

    def run():
        spm = pathlib.Path(spec["work"]) / "e2e_vocab" / f"spiece-{job['vocab_size']}-{'-'.join(job['langs'])}.model"
        if not spm.is_file():
            spm.parent.mkdir(parents=True, exist_ok=True)
            train_sentencepiece(distinct_texts(files), spm, vocab_size=job["vocab_size"])
        cfg = encoder_config(spec, name)
        model = huggingface.load_hf_weights(spec["weights_dir"][name], cfg)
        enc = SentenceEncoder(model, Tokenizer.from_pretrained(spm))
        kw = dict(batch_size=job["batch_size"], max_length=job["max_length"])
        t0 = time.perf_counter()
        first = enc.encode(sentences, **kw)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        emb = enc.encode(sentences, **kw)
        sec = time.perf_counter() - t0
        tokens = sum(len(t) for t in enc.tokenize(sentences, job["max_length"]))
        ok = emb.shape == (len(sentences), cfg.d_model) and bool(np.all(np.isfinite(emb)))
        rows.write(**row, status="ok" if ok else f"error: bad embeddings {emb.shape}", batch=job["batch_size"],
                   length=job["max_length"], value=len(sentences) / sec, unit="sentences/s", time_s=sec,
                   first_call_s=first_s, sentences=len(sentences), tokens=tokens, tokens_per_s=tokens / sec,
                   compiled_shapes=len(enc.compiled_shapes), peak_gib=peak_gib(),
                   notes=f"Tatoeba {len(job['langs'])} langs + eng, tokenisation included; "
                         f"SentencePiece {job['vocab_size']} pieces trained on that text (no mT5 vocab offline); "
                         f"same input twice, first call compiles ({first.shape[0]} rows)")

    common.guarded(rows, f"batch {job['batch_size']}", run, **row)


TASKS = {"prep": task_prep, "fwd": task_fwd, "step": task_step, "e2e": task_e2e}


def run(task: str, spec: dict, job: dict, rows: common.RowWriter) -> None:
    """The worker protocol's one entry (see `_bench_common`)."""
    TASKS[task](spec, job, rows)


if __name__ == "__main__":
    sys.exit(common.worker_main(__doc__, TASKS, device_info))
