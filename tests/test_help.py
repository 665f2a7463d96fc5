"""Every command's --help: exit 0, a description for every flag; train's lists every TrainArgs
field with its description, the launcher flags and --dry-run, under the name `omnitune train`."""
from __future__ import annotations

import argparse

import pytest

from omnitune.cli.main import COMMANDS, main
from omnitune.config.train import IGNORED_FLAGS, NOT_YET, TrainArgs


def _actions(parser: argparse.ArgumentParser):
    """(parser, action) of the parser and of its subcommands' parsers, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser, action


@pytest.fixture
def help_parsers(monkeypatch):
    """Records every parser whose help is formatted."""
    seen = []
    original = argparse.ArgumentParser.format_help

    def record(self):
        seen.append(self)
        return original(self)
    monkeypatch.setattr(argparse.ArgumentParser, "format_help", record)
    return seen


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_of_every_command_has_help(command, help_parsers, capsys):
    try:
        rc = COMMANDS[command](["--help"])
    except SystemExit as e:   # argparse's own -h
        rc = e.code
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert help_parsers, f"omnitune {command} --help formatted no argparse help"
    assert out.startswith(f"usage: omnitune {command}"), out[:200]
    for parser in help_parsers:
        for p, action in _actions(parser):
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help
            assert text and text != argparse.SUPPRESS and text.strip(), (p.prog, action.option_strings or action.dest)


def test_subcommands_of_data_have_help(help_parsers, capsys):
    for tool in ("llava-to-mllm", "rlhfv-to-dpo", "inspect"):
        with pytest.raises(SystemExit) as e:
            main(["data", tool, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: omnitune data {tool}")


def test_train_help_lists_every_flag_with_its_description(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert out.startswith("usage: omnitune train ")
    for name, field in TrainArgs.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert field.description, name
        assert flag in out, flag
        assert " ".join(field.description.split()) in out, name
    for flag in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--dry-run",
                 *("--" + f for f in IGNORED_FLAGS), *("--" + f for f in NOT_YET)):
        assert flag in out, flag
    for group in ("parallel:", "batch:", "schedule/optimizer:", "checkpoint:", "logging:", "data:", "LoRA",
                  "DPO", "launcher", "ignored Megatron flags"):
        assert group in out, group
    assert "--lr X peak learning rate (AdamW) [default: 1e-05]" in out


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert main([]) == 2


def _mm_convert_commands():
    import inspect

    from omnitune.convert import converters

    for cls in converters():
        subs = [n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")]
        yield from ([[cls.__name__, sub] for sub in subs] if subs else [[cls.__name__]])


@pytest.mark.parametrize("command", list(_mm_convert_commands()), ids=" ".join)
def test_every_mm_convert_flag_has_a_description(command, help_parsers, capsys):
    """mm-convert's flags come from each subcommand's config fields (jsonargparse)."""
    from omnitune.cli.mm_convert import main as mm_convert

    with pytest.raises(SystemExit) as e:
        mm_convert([*command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: mm-convert")
    parser = help_parsers[-1]
    flags = 0
    for p, action in _actions(parser):
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flags += 1
        assert (action.help or "").strip() and action.help != argparse.SUPPRESS, action.option_strings
    assert flags >= 3


def test_reference_doc_is_up_to_date_and_describes_every_key():
    """docs/reference.md is generated from the models; every key and flag has its meaning."""
    from omnitune.config.reference import DOC, render

    text = render()
    assert DOC.read_text(encoding="utf-8") == text, "run: python -m omnitune.config.reference"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    assert [r for r in rows if r.endswith("|  |")] == []   # the meaning column
    for needle in ("`dataset_param.basic_parameters.template`", "`loss_cfg.loss_type`", "`--micro-batch-size`",
                   "`text_decoder`", "latest_checkpointed_iteration.txt", "per_token_loss"):
        assert needle in text
