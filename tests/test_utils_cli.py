"""mst5_jax.utils.cli: user errors become short messages; outputs are never destroyed."""
import logging

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
