"""The gin plumbing of training: where gin files are, what gin can bind, and parsing.

Every gin registration of the project is here (`register_gin`): `TrainConfig`,
`OptimizerConfig`, `LossConfig`, `MeshConfig`, `LoRAConfig`, `EncoderConfig` and
`tasks.configure`. The core modules never import gin, which is an extra (`[gin]`).

Gin files are looked up by bare name anywhere under the repository's `gin/` tree (shipped
as `mst5_jax.gin_configs`); `include` lines resolve against that root. Every run config
defines the macros MODEL_DIR, TRAIN_STEPS, SCHEDULE_STEPS, BATCH_SIZE,
MIXTURE_OR_TASK_NAME, MAX_LENGTH, DATA_DIR, SEED, LOG_EVERY and CHECKPOINT_EVERY
(gin/runs/_common.gin). A macro that nothing reads is refused, whether a gin file defines
it or a `--gin.MACRO=VALUE` flag does: it is almost always a misspelling.

`EncoderConfig` bindings (`EncoderConfig.remat = 'full'`) are the model's overrides:
`parse_gin` merges them under `TrainConfig.model_overrides` (which wins on a clash).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
import re
from types import ModuleType
from typing import Optional, Sequence

from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.lora import LoRAConfig
from mst5_jax.core.losses import LossConfig
from mst5_jax.core.partitioning import MeshConfig
from mst5_jax.training.optimizer import OptimizerConfig
from mst5_jax.training.run_config import TrainConfig
from mst5_jax.utils.paths import REPO_ROOT

_MACRO_DEF = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s*=", re.MULTILINE)
_MACRO_REF = re.compile(r"%([A-Za-z_][\w.]*)")
_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def gin_or_none() -> Optional[ModuleType]:
    """The gin-config module, or None when it is not installed.

    Running from the source tree puts the repository root on sys.path, and its `gin/`
    folder (configs, no `__init__.py`) then imports as an empty namespace package named
    `gin` where gin-config is absent (the GPU image); this tells the two apart.
    """
    try:
        import gin
    except ImportError:
        return None
    return gin if hasattr(gin, "external_configurable") else None


def _gin() -> ModuleType:
    gin = gin_or_none()
    if gin is None:
        raise ImportError("gin-config is not installed: pip install -e '.[gin]' (gin files configure training)")
    return gin


def register_gin() -> None:
    """Registers every configurable gin files may bind (idempotent)."""
    gin = _gin()
    if getattr(register_gin, "_done", False):
        return
    for cls in (TrainConfig, OptimizerConfig, LossConfig, MeshConfig, EncoderConfig):
        gin.external_configurable(cls, module="mst5_jax")
    gin.external_configurable(LoRAConfig, module="mst5_jax.core.lora")
    from tasks import settings  # tasks' registry imports seqio lazily; settings is light

    gin.external_configurable(settings.configure, name="configure", module="tasks")
    register_gin._done = True


def configure_tasks() -> None:
    """Applies the parsed `tasks.configure.*` bindings (e.g. train_source='xnli_mt')."""
    _gin().get_configurable("tasks.configure")()


# ---------------------------------------------------------------------- gin file lookup
def gin_root() -> pathlib.Path:
    """The `gin/` tree: the repository's, or the installed `mst5_jax.gin_configs` package."""
    repo = REPO_ROOT / "gin"
    if repo.is_dir():
        return repo
    return pathlib.Path(str(importlib.resources.files("mst5_jax.gin_configs")))


def find_gin_file(name: str, root: Optional[pathlib.Path] = None) -> pathlib.Path:
    """A path as given, or a bare name found anywhere under `gin/` (exactly once)."""
    p = pathlib.Path(name)
    if p.is_file():
        return p
    root = root or gin_root()
    if (root / name).is_file():
        return root / name
    matches = sorted(root.rglob(p.name))
    if not matches:
        runs = ", ".join(sorted(f.name for f in (root / "runs").glob("*.gin") if not f.name.startswith("_")))
        raise FileNotFoundError(f"gin file {name!r}: not a path, and not found under {root}; "
                                f"the run files are {runs} (misspelt?)")
    if len(matches) > 1:
        raise ValueError(f"gin file {name!r} is ambiguous under {root}: " + ", ".join(map(str, matches)))
    return matches[0]


def common_macros() -> list[str]:
    """The macros every run config defines, in gin/runs/_common.gin's order."""
    return _MACRO_DEF.findall((gin_root() / "runs" / "_common.gin").read_text(encoding="utf-8"))


def _with_includes(files: Sequence[pathlib.Path], root: pathlib.Path) -> list[pathlib.Path]:
    """`files` and everything they include, depth first, each once."""
    seen: list[pathlib.Path] = []

    def visit(path: pathlib.Path) -> None:
        if path in seen:
            return
        seen.append(path)
        for inc in _INCLUDE.findall(path.read_text(encoding="utf-8")):
            target = root / inc if (root / inc).is_file() else path.parent / inc
            if target.is_file():  # gin itself reports a missing include, with its search path
                visit(target.resolve())

    for f in files:
        visit(f.resolve())
    return seen


def _check_macros_are_read(files: Sequence[pathlib.Path], bindings: Sequence[str], root: pathlib.Path) -> None:
    """Refuses a macro that a gin file or `--gin.` flag defines and nothing reads (`%NAME`)."""
    texts = {f: f.read_text(encoding="utf-8") for f in _with_includes(files, root)}
    refs = {r for t in [*texts.values(), *bindings] for r in _MACRO_REF.findall(re.sub(r"#.*", "", t))}
    for b in bindings:  # `--gin.BATCHSIZE=16` would define a new macro that nothing reads
        name = b.split("=", 1)[0].strip()
        if name.isidentifier() and name.isupper():
            if not any(name in _MACRO_DEF.findall(t) for t in texts.values()):
                raise ValueError(f"--gin.{b.strip()}: {name} is not a macro of "
                                 f"{', '.join(f.name for f in files)} (misspelt? macros are defined in the gin files)")
    for path, text in texts.items():
        for m in _MACRO_DEF.finditer(text):
            if m.group(1) not in refs:
                line = text.count("\n", 0, m.start()) + 1
                raise ValueError(f"{path}:{line}: macro {m.group(1)} is defined but no binding reads it "
                                 f"(misspelt? bind it, e.g. TrainConfig.field = %{m.group(1)}, or remove it)")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> TrainConfig:
    """Parses files (in order) then `MACRO=VALUE` / `Configurable.param=VALUE` bindings.

    Returns the bound `TrainConfig`, with `EncoderConfig` bindings folded into
    `model_overrides`. `tasks.configure` bindings are parsed, not applied: call
    `configure_tasks()` to apply them (they set process-wide task settings).
    """
    gin = _gin()
    register_gin()
    gin.clear_config()
    root = gin_root()
    gin.add_config_file_search_path(str(root))
    files = [find_gin_file(f, root).absolute() for f in gin_files]
    _check_macros_are_read(files, bindings, root)
    # gin tries an `include` path relative to the working directory before its search
    # paths, so a user folder named runs/ or models/ would shadow ours: parse from the root.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        gin.parse_config_files_and_bindings([str(f) for f in files], list(bindings), finalize_config=False)
    except SyntaxError as e:  # gin's "Unable to parse value.": usually an unquoted string
        raise ValueError(gin_syntax_message(e)) from None
    finally:
        os.chdir(cwd)
    cfg = gin.get_configurable(TrainConfig)()
    encoder = gin.get_bindings(EncoderConfig, resolve_references=True)
    cfg = dataclasses.replace(cfg, model_overrides={**encoder, **cfg.model_overrides})
    check_values(cfg)
    return cfg


def gin_syntax_message(e: SyntaxError) -> str:
    """Gin's parse error as one line: where, what, and the quoted form of an unquoted string.

    `--gin.MODEL_DIR=/tmp/x` -> `--gin.MODEL_DIR=/tmp/x: cannot parse /tmp/x as a gin value; strings
    are quoted: --gin.MODEL_DIR="'/tmp/x'"`. In a file, the message starts with `FILE:LINE:`.
    """
    text = (e.text or "").strip()
    name, _, value = (part.strip() for part in text.partition("="))
    default = _field_default(name)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        hint = "expected a number (unquoted), e.g. " + (f"{name} = {default!r}" if e.filename
                                                         else f"--gin.{name}={default!r}")
    elif value and value[0] not in "'\"[{(@%" and not re.fullmatch(r"[-+0-9.eE]+|True|False|None", value):
        hint = "strings are quoted: " + (f"{name} = '{value}'" if e.filename else f"--gin.{name}=\"'{value}'\"")
    else:
        hint = "expected a Python literal (a quoted string, a number, True/False/None, a list or dict), " \
               "a %MACRO or an @Configurable()"
    where = f"{e.filename}:{e.lineno}: {text}" if e.filename else f"--gin.{text}"
    return f"{where}: cannot parse {value or text!r} as a gin value; {hint}"


def _field_default(name: str):
    """The dataclass default that `MACRO` (TrainConfig.macro) or `Class.param` sets, or None."""
    cls_name, _, param = name.rpartition(".")
    classes = {c.__name__: c for c in (TrainConfig, OptimizerConfig, LossConfig, MeshConfig, EncoderConfig, LoRAConfig)}
    cls = classes.get(cls_name) if cls_name else TrainConfig
    field = {f.name: f for f in dataclasses.fields(cls)}.get(param if cls_name else name.lower()) if cls else None
    return None if field is None or field.default is dataclasses.MISSING else field.default


def check_values(cfg: TrainConfig) -> None:
    """Refuses values gin accepted but training cannot use, naming the macro: a step count, batch
    size, or interval that is not a positive integer, or a learning rate that is not a number.
    (Batch divisibility by the data axes and processes is checked where the mesh is built.)"""
    positive = {"BATCH_SIZE": cfg.batch_size, "TRAIN_STEPS": cfg.train_steps, "MAX_LENGTH": cfg.max_length,
                "LOG_EVERY": cfg.log_every, "CHECKPOINT_EVERY": cfg.checkpoint_every,
                "TrainConfig.keep_checkpoints": cfg.keep_checkpoints, "TrainConfig.eval_max_length": cfg.eval_max_length}
    if cfg.schedule_steps is not None:
        positive["SCHEDULE_STEPS"] = cfg.schedule_steps
    if cfg.eval_every is not None:
        positive["TrainConfig.eval_every"] = cfg.eval_every
    if cfg.microbatch_size is not None:
        positive["TrainConfig.microbatch_size"] = cfg.microbatch_size
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}: expected a positive integer (unquoted), e.g. --gin.{name}=8")
    lr = cfg.optimizer.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"OptimizerConfig.learning_rate={lr!r}: expected a positive number (unquoted), "
                         "e.g. --gin.OptimizerConfig.learning_rate=1e-3")


def config_str() -> str:
    """Every parsed binding, as gin text (what `operative_config.gin` records)."""
    return _gin().config_str()
