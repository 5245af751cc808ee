"""mst5_jax.utils.files: the one line reader and the one atomic writer."""
import hashlib

import pytest

from mst5_jax.utils import files


def test_read_lines_keeps_text_and_drops_only_bom_and_endings(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeff a \r\nb\u2028c\r\n\ufeffd\n\nlast".encode("utf-8"))
    assert files.read_lines(p) == [" a ", "b\u2028c", "\ufeffd", "", "last"]


def test_atomic_write_replaces_only_on_success(tmp_path):
    p = tmp_path / "out.json"
    files.write_json_atomic(p, {"a": 1})
    assert p.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError):
        with files.atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("crash while writing")
    assert p.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]  # no temporary left behind
    with files.atomic_write(p, "wb") as f:
        f.write(b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "big.bin"
    data = bytes(range(256)) * 40000  # 10.2 MB: several 4 MiB chunks
    p.write_bytes(data)
    assert files.sha256_file(p) == hashlib.sha256(data).hexdigest()
