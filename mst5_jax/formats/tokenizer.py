"""Text to token ids, as PUBLIC_API §2 defines them (TensorFlow-free, no seqio).

Two backends, chosen by what the tokenizer directory holds:

* ``tokenizer.json`` present: the `tokenizers` library, set up so the ids equal
  ``transformers.AutoTokenizer.from_pretrained(dir)`` (transformers 5.x). For a directory
  that transformers resolves to ``T5Tokenizer`` (``tokenizer_class`` T5Tokenizer[Fast] in
  ``tokenizer_config.json`` or ``config.json``, or ``model_type`` t5/mt5 in ``config.json``),
  transformers 5 does not run the file's pipeline as saved: it keeps the vocabulary, the
  precompiled SentencePiece charsmap and the added tokens, and rebuilds the rest
  (``Precompiled`` normaliser only, ``WhitespaceSplit`` + ``Metaspace`` pre-tokeniser,
  ``$A </s>`` template). We rebuild the same way. The hub's google/mt5-* ``tokenizer.json``
  (older layout, with a ``Replace(" {2,}")`` normaliser) gives different ids for trailing
  spaces if run as saved, so this matters. Any other class runs the file as saved.
* only ``spiece.model`` (or a ``.model`` path, or a ``gs://`` URL): `sentencepiece` plus EOS
  (id 1), as seqio and the original mT5 training do.

Every sequence ends with EOS. With ``max_length`` set, longer input keeps its first
``max_length - 1`` pieces and then EOS (HF's ``truncation=True`` behaviour, and seqio's
``append_eos_after_trim``); `Tokenizer.encode_batch_counted` also returns how many
sequences were cut, so callers can warn. A `Tokenizer` is safe to share between threads: it
keeps no per-call state, and the one stateful backend call (the `tokenizers` truncation
setting) runs under a lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
from typing import Optional, Sequence

import numpy as np

from mst5_jax.utils import fs, paths, safety

log = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1

_TOKENIZER_JSON = "tokenizer.json"
_SPIECE = "spiece.model"
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Class names transformers 5 maps to its T5Tokenizer (which rebuilds the pipeline).
_T5_CLASSES = {"T5Tokenizer"}
_T5_MODEL_TYPES = {"t5", "mt5"}


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _transformers_class(directory: pathlib.Path) -> Optional[str]:
    """The tokenizer class `AutoTokenizer` picks for `directory` (name without ``Fast``)."""
    cls = _read_json(directory / "tokenizer_config.json").get("tokenizer_class")
    config = _read_json(directory / "config.json")
    cls = cls or config.get("tokenizer_class")
    if cls:
        return cls.removesuffix("Fast")
    if config.get("model_type") in _T5_MODEL_TYPES:
        return "T5Tokenizer"
    return None


class Tokenizer:
    """A SentencePiece/HF tokenizer giving mT5 token ids (EOS 1 appended, pad 0).

    Build it with `Tokenizer.from_pretrained(path)`; see the module docstring for the
    backends and the exact id guarantees.
    """

    def __init__(self, *, hf_tokenizer=None, sp_model_proto: Optional[bytes] = None,
                 files: Optional[dict[str, pathlib.Path]] = None, source: str = ""):
        if (hf_tokenizer is None) == (sp_model_proto is None):
            raise ValueError("Tokenizer needs exactly one of hf_tokenizer or sp_model_proto")
        self._hf = hf_tokenizer
        self._sp = None
        self._sp_proto = sp_model_proto
        if sp_model_proto is not None:
            import sentencepiece as spm  # noqa: PLC0415
            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(sp_model_proto)
        self._files = dict(files or {})
        self.source = source
        # `enable_truncation` mutates the shared Rust tokenizer: one caller at a time.
        self._hf_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a tokenizer from a directory, a ``.model`` file, a ``gs://`` URL or a hub id.

        Args:
          path: an HF-format directory (``tokenizer.json`` and/or ``spiece.model``), a
            SentencePiece ``.model`` file, a ``gs://...`` URL of either (read through
            `mst5_jax.utils.fs`; a directory is staged locally), or a Hugging Face hub id
            (downloaded with huggingface_hub when the network exists, then loaded like a
            directory).
        """
        s = os.fspath(path)
        if fs.is_remote(s):
            remote = fs.as_path(s)
            if remote.is_dir():
                return cls._from_directory(fs.stage(s, paths.CACHE_DIR / "gcs"))
            if not remote.is_file():
                raise FileNotFoundError(f"No tokenizer at {s!r}: no such gs:// object or directory")
            return cls(sp_model_proto=remote.read_bytes(), source=s)
        if "://" in s and not s.startswith("file://"):
            raise ValueError(f"{s}: unsupported URL scheme (expected a local path or gs://)")
        p = pathlib.Path(s.removeprefix("file://"))
        if p.is_dir():
            return cls._from_directory(p)
        if p.is_file():
            if p.name == _TOKENIZER_JSON:
                return cls._from_directory(p.parent)
            return cls(sp_model_proto=p.read_bytes(), files={_SPIECE: p}, source=str(p))
        if _looks_like_hub_id(s):
            return cls._from_directory(_download_from_hub(s))
        raise FileNotFoundError(
            f"No tokenizer at {s!r}: expected a directory with {_TOKENIZER_JSON} or {_SPIECE}, "
            "a SentencePiece .model file, a gs:// URL or a Hugging Face hub id.")

    @classmethod
    def _from_directory(cls, d: pathlib.Path) -> "Tokenizer":
        for name in (_TOKENIZER_JSON, _SPIECE, *_SIDE_FILES):
            if (d / name).is_file():
                safety.resolve_inside(d / name, d)
        files = {name: d / name for name in (_TOKENIZER_JSON, _SPIECE, *_SIDE_FILES) if (d / name).is_file()}
        if _TOKENIZER_JSON in files:
            return cls(hf_tokenizer=_load_tokenizer_json(d), files=files, source=str(d))
        if _SPIECE in files:
            return cls(sp_model_proto=files[_SPIECE].read_bytes(), files=files, source=str(d))
        raise FileNotFoundError(f"{d}: no {_TOKENIZER_JSON} or {_SPIECE} in this directory")

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """``"tokenizers"`` (tokenizer.json) or ``"sentencepiece"`` (spiece.model + EOS)."""
        return "tokenizers" if self._hf is not None else "sentencepiece"

    def fingerprint(self) -> str:
        """sha256 (hex) of what decides the ids: tokenizer.json's bytes, or the SentencePiece
        model's. Equal for the same vocabulary wherever its files lie (a run records it)."""
        if self._hf is not None and _TOKENIZER_JSON in self._files:
            return hashlib.sha256(self._files[_TOKENIZER_JSON].read_bytes()).hexdigest()
        if self._sp_proto is not None:
            return hashlib.sha256(self._sp_proto).hexdigest()
        return hashlib.sha256(self._hf.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    # ------------------------------------------------------------------ encoding
    def encode_batch(self, texts: Sequence[str], max_length: Optional[int] = None) -> list[list[int]]:
        """Token ids of each text, EOS appended (see `encode_batch_counted`)."""
        return self.encode_batch_counted(texts, max_length)[0]

    def encode_batch_counted(self, texts: Sequence[str],
                             max_length: Optional[int] = None) -> tuple[list[list[int]], int]:
        """Token ids of each text, EOS appended, and the number of texts truncated.

        Args:
          texts: strings, used exactly as given.
          max_length: tokens per text including EOS, or None for no limit.
        Returns:
          (ids, num_truncated): one list of ints per text, each ending with EOS (1), at most
          `max_length` long; and how many texts were longer than `max_length`.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not a single string")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        texts = list(texts)
        if not texts:
            return [], 0
        if self._hf is not None:
            # The tokenizers library's own truncation is what HF `truncation=True` runs: it
            # keeps room for the post-processor's special tokens (EOS).
            with self._hf_lock:
                if max_length is None:
                    self._hf.no_truncation()
                else:
                    self._hf.enable_truncation(max_length=max_length)
                try:
                    encs = self._hf.encode_batch(texts, add_special_tokens=True)
                finally:
                    self._hf.no_truncation()
            return [e.ids for e in encs], sum(bool(e.overflowing) for e in encs)
        out = [list(p) + [EOS_ID] for p in self._sp.encode(texts)]
        cut = [ids if max_length is None or len(ids) <= max_length else ids[: max_length - 1] + [EOS_ID]
               for ids in out]
        return cut, sum(len(a) != len(b) for a, b in zip(out, cut))

    def pad(self, ids: Sequence[Sequence[int]], length: int) -> np.ndarray:
        """Right-pads with `pad_id` to int32 [B, length]; a longer row is an error."""
        arr = np.full((len(ids), length), PAD_ID, dtype=np.int32)
        for i, row in enumerate(ids):
            if len(row) > length:
                raise ValueError(f"row {i} has {len(row)} tokens, more than length={length}")
            arr[i, : len(row)] = row
        return arr

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with pad and EOS dropped (for logs and debugging)."""
        ids = [int(i) for i in ids if i not in (PAD_ID, EOS_ID)]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``spiece.model`` and/or ``tokenizer.json`` (plus ``tokenizer_config.json``)."""
        if fs.is_remote(directory):
            with tempfile.TemporaryDirectory(prefix="mst5-tokenizer-") as tmp:
                self.save(tmp)
                fs.upload_dir(tmp, directory)
            return
        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, src in self._files.items():
            dst = out / name
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
        if self._sp_proto is not None and _SPIECE not in self._files:
            (out / _SPIECE).write_bytes(self._sp_proto)

    def __repr__(self) -> str:
        return f"Tokenizer(backend={self.backend}, vocab_size={self.vocab_size}, source={self.source!r})"


def _load_tokenizer_json(d: pathlib.Path):
    """A `tokenizers.Tokenizer` that gives the ids `AutoTokenizer.from_pretrained(d)` gives."""
    import tokenizers  # noqa: PLC0415
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors  # noqa: PLC0415
    from tokenizers.models import Unigram  # noqa: PLC0415

    path = d / _TOKENIZER_JSON
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust error does not name the file
        raise ValueError(f"{path}: cannot be read by the tokenizers library ({e})") from e
    if _transformers_class(d) not in _T5_CLASSES:
        return tok
    data = _read_json(path)
    model = data.get("model", {})
    if model.get("type") != "Unigram":
        raise ValueError(f"{path}: T5 tokenizer expected a Unigram model, found {model.get('type')!r}")
    rebuilt = tokenizers.Tokenizer(Unigram([tuple(v) for v in model["vocab"]], unk_id=2, byte_fallback=False))
    charsmap = _precompiled_charsmap(data.get("normalizer"))
    if charsmap is not None:
        import base64  # noqa: PLC0415
        rebuilt.normalizer = normalizers.Precompiled(base64.b64decode(charsmap))
    rebuilt.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    rebuilt.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    rebuilt.add_special_tokens([
        AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                   rstrip=t.get("rstrip", False), normalized=t.get("normalized", False), special=True)
        for t in data.get("added_tokens", []) if t.get("special", False)])
    rebuilt.add_tokens([
        AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                   rstrip=t.get("rstrip", False), normalized=t.get("normalized", True), special=False)
        for t in data.get("added_tokens", []) if not t.get("special", False)])
    eos = rebuilt.token_to_id("</s>")
    if eos is None:
        raise ValueError(f"{path}: T5 tokenizer has no '</s>' token")
    rebuilt.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos)])
    return rebuilt


def _precompiled_charsmap(normalizer: Optional[dict]) -> Optional[str]:
    if not normalizer:
        return None
    items = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    for n in items:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return n["precompiled_charsmap"]
    return None


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> pathlib.Path:
    """Local snapshot of the tokenizer files of a hub repo (offline: the HF cache only)."""
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"{repo_id!r} looks like a hub id but huggingface_hub is not installed") from e
    try:
        local = snapshot_download(repo_id, allow_patterns=[_TOKENIZER_JSON, _SPIECE, *_SIDE_FILES, "config.json"])
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')!r}): {e}") from e
    return pathlib.Path(local)
