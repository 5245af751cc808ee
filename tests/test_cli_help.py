"""Every CLI's --help: every flag with a description and its default, and an example."""
import importlib

import pytest

CLIS = {"train": "parser", "evaluate": "build_parser", "encode": "build_parser", "mine": "build_parser",
        "convert": "build_parser", "serve": "build_parser", "study": "build_parser"}


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_lists_every_flag_with_default_and_example(name):
    parser = getattr(importlib.import_module(f"mst5_jax.{name}"), CLIS[name])()
    text = parser.format_help()
    assert "example:" in text and f"python -m mst5_jax.{name}" in text.split("example:")[1]
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings}: no help text (so --help shows no default)"
        assert action.option_strings[0] in text
    assert text.count("(default:") >= len(parser._actions) - 1  # argparse adds one per flag with help
    assert "--debug" in text and "--verbose" in text


def test_train_help_names_gin_flags_and_macros():
    from mst5_jax import train

    text = train.parser().format_help()
    assert "--gin_file" in text and "--gin.MACRO=VALUE" in text
    for macro in ("MODEL_DIR", "TRAIN_STEPS", "BATCH_SIZE", "CHECKPOINT_EVERY", "LOG_EVERY"):
        assert macro in text


def test_train_gin_file_space_and_equals_forms():
    from mst5_jax import train

    bindings, rest = train.split_gin_bindings(["--gin_file", "a.gin", "--gin_file=b.gin", "--gin.SEED=1", "--dry_run"])
    args = train.parser().parse_args(rest)
    assert args.gin_file == ["a.gin", "b.gin"] and bindings == ["SEED=1"] and args.dry_run
