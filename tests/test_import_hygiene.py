"""PUBLIC_API §1: the core imports with tensorflow, seqio, gin, clu and torch all unavailable."""
import os
import subprocess
import sys
import textwrap

CORE_MODULES = [
    "mst5_jax", "mst5_jax.core.config", "mst5_jax.core.model", "mst5_jax.core.lora", "mst5_jax.core.losses",
    "mst5_jax.core.partitioning", "mst5_jax.training.train_step", "mst5_jax.inference.encoder", "mst5_jax.formats.huggingface",
    "mst5_jax.formats.safetensors", "mst5_jax.formats.peft",
    "mst5_jax.formats.run_dir", "mst5_jax.formats.tokenizer", "mst5_jax.evals", "tasks.pipeline",
]
BLOCKED = ["tensorflow", "seqio", "gin", "clu", "torch", "tensorflow_datasets", "tensorflow_text"]


def test_core_imports_without_tf_seqio_gin_clu_torch():
    code = textwrap.dedent(f"""
        import sys, importlib
        for name in {BLOCKED!r}:
            sys.modules[name] = None          # any import of these now raises ImportError
        for mod in {CORE_MODULES!r}:
            importlib.import_module(mod)
        from mst5_jax import SentenceEncoder
        import runpy
        leaked = sorted(m for m in {BLOCKED!r} if sys.modules.get(m) is not None)
        assert not leaked, leaked
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_gpu_bench_imports_without_tf_seqio_gin():
    code = textwrap.dedent(f"""
        import sys, runpy
        for name in ["tensorflow", "seqio", "gin", "clu", "tensorflow_datasets"]:
            sys.modules[name] = None
        sys.argv = ["gpu_bench.py", "--help"]
        sys.path.insert(0, "benchmarks")  # what `python benchmarks/gpu_bench.py` does for a script
        try:
            runpy.run_path("benchmarks/gpu_bench.py", run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]


def test_core_lora_imports_no_file_format():
    """LoRA maths stays in the core: importing it loads no `mst5_jax.formats` module."""
    code = textwrap.dedent("""
        import sys
        import mst5_jax.core.lora
        leaked = sorted(m for m in sys.modules if m.startswith(("mst5_jax.formats", "mst5_jax.training",
                                                                 "mst5_jax.inference")))
        assert not leaked, leaked
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
