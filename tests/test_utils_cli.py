"""mst5_jax.utils.cli: user errors become short messages; outputs are never destroyed."""
import logging
import os
import re
import subprocess
import sys

import pytest

from mst5_jax.utils import cli


def test_user_error_is_one_line_and_exit_2(capsys):
    def body():
        raise cli.UserError("--model /x: config.json is missing; pass the run folder")

    assert cli.run(body, "prog") == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "prog: error: --model /x: config.json is missing; pass the run folder\n"


def test_missing_file_names_the_file(capsys, tmp_path):
    missing = tmp_path / "nope.txt"

    def body():
        open(missing)

    assert cli.run(body, "prog") == cli.EXIT_USER_ERROR
    assert str(missing) in capsys.readouterr().err


def test_debug_reraises_and_bugs_are_not_hidden():
    with pytest.raises(cli.UserError):
        cli.run(lambda: (_ for _ in ()).throw(cli.UserError("x")), "prog", debug=True)
    with pytest.raises(ZeroDivisionError):  # an internal bug keeps its traceback
        cli.run(lambda: 1 / 0, "prog")


def test_check_output_refuses_inputs_and_existing_files(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    with pytest.raises(cli.UserError, match="is also an input"):
        cli.check_output(src, [src], overwrite=True)
    with pytest.raises(cli.UserError, match="is also an input"):
        cli.check_output(tmp_path / "." / "in.txt", [src], overwrite=True)
    out = tmp_path / "out.npy"
    assert cli.check_output(out, [src]) == out
    out.write_bytes(b"old")
    with pytest.raises(cli.UserError, match="--overwrite"):
        cli.check_output(out, [src])
    assert cli.check_output(out, [src], overwrite=True) == out
    assert out.read_bytes() == b"old"  # checking never touches the file
    with pytest.raises(cli.UserError, match="does not exist"):
        cli.check_output(tmp_path / "no_dir" / "x.npy")


def test_help_shows_defaults_and_example():
    p = cli.parser("python -m mst5_jax.x", "Does x.\n\nMore text.", example="python -m mst5_jax.x --n 3")
    p.add_argument("--n", type=int, default=3, help="how many")
    text = p.format_help()
    assert "(default: 3)" in text and "example:" in text and "--debug" in text


def test_setup_logging_quiets_third_parties():
    cli.setup_logging(verbose=False)
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.WARNING
    cli.setup_logging(verbose=True)
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.INFO


def test_setup_logging_hides_backend_probing_and_formats_warnings():
    # a subprocess: pytest records warnings itself, which would bypass logging.captureWarnings
    script = """
import logging, sys, warnings
from mst5_jax.utils import cli
cli.setup_logging(verbose="-v" in sys.argv)
logging.getLogger("jax._src.xla_bridge").warning("A Google TPU may be present on this machine, but ...")
warnings.warn_explicit("TPU_LIBRARY_PATH is set to a non-existent path", UserWarning, "cloud_tpu_init.py", 1,
                       module="jax._src.cloud_tpu_init")
warnings.warn("a project warning", UserWarning)
"""
    env = dict(os.environ, PYTHONPATH=str(cli.pathlib.Path(__file__).resolve().parents[1]))
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stderr
    assert "TPU" not in quiet, quiet
    # other warnings are logged in the one format: "<time> WARNING py.warnings: ..."
    assert re.search(r"^\S+ \S+ WARNING py.warnings: .*a project warning", quiet, re.MULTILINE), quiet
    verbose = subprocess.run([sys.executable, "-c", script, "-v"], capture_output=True, text=True, env=env).stderr
    assert "A Google TPU may be present" in verbose and "TPU_LIBRARY_PATH" in verbose, verbose
