"""Flags that stand for config fields take their help, default and type from the field, and
`--help` of the commands that take a config lists every --section.field with its help and default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mtnlg.cli import build_parser, main
from mtnlg.cli.args import field_flag, given_fields
from mtnlg.config import Config
from mtnlg.config.text import toml_value

FIELD_FLAGS = {  # command -> {flag: field}: the shorthands of config fields
    "train": {"--out": "train.out", "--tokenizer": "data.tokenizer", "--data-path": "data.data_path"},
    "finetune": {"--out": "train.out", "--tokenizer": "data.tokenizer", "--checkpoint": "finetune.checkpoint",
                 "--data": "finetune.data"},
    "generate": {f"--{n.replace('_', '-')}": f"generate.{n}" for n in
                 ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")}
                | {"--tp": "parallel.tp"},
    "chat": {f"--{n.replace('_', '-')}": f"generate.{n}" for n in
             ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")},
    "preprocess": {"--tokenizer": "data.tokenizer"},
    "evaluate": {"--split": "data.split"},
}


def _words(text: str) -> str:
    return " ".join(text.split())


def _field(dotted: str) -> tuple[dataclasses.Field, object]:
    section, name = dotted.split(".")
    cfg = getattr(Config(), section)
    return next(f for f in dataclasses.fields(cfg) if f.name == name), getattr(cfg, name)


def _help(command: str, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: each entry on one line
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def _entries(help_text: str) -> dict[str, str]:
    """``{option: its whole entry, one line}`` of a --help (argparse puts a long option's help on the
    next lines)."""
    entries: dict[str, str] = {}
    option = None
    for line in help_text.splitlines():
        if line.startswith("  -") and not line.startswith("   "):
            option = line.split()[0].rstrip(",")
            entries[option] = _words(line)
        elif option is not None and line.startswith("      "):
            entries[option] += " " + _words(line)
        else:
            option = None
    return entries


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", list(FIELD_FLAGS))
def test_a_field_flag_shows_its_fields_help_and_default(command, monkeypatch, capsys):
    text = _words(_help(command, monkeypatch, capsys))
    for flag, dotted in FIELD_FLAGS[command].items():
        field, default = _field(dotted)
        assert _words(field.metadata["help"]) in text, flag
        assert f"--{dotted}" in text, flag
        if command != "preprocess":  # its --tokenizer is required: no default to show
            assert f"default {toml_value(default)})" in text or f"else {toml_value(default)})" in text, flag


@pytest.mark.parametrize("command", list(FIELD_FLAGS))
def test_the_field_flags_are_registered_under_their_fields(command):
    p = _subparser(command)
    registered = p.get_default("_field_flags")
    flags = {a.option_strings[0]: registered.get(a.dest) for a in p._actions if a.option_strings}
    assert {f: flags[f] for f in FIELD_FLAGS[command]} == FIELD_FLAGS[command]


@pytest.mark.parametrize("command", ["train", "finetune", "config", "info", "plan"])
def test_help_lists_every_config_field_with_its_help_and_default(command, monkeypatch, capsys):
    text = _help(command, monkeypatch, capsys)
    lines = _entries(text)
    for section in dataclasses.fields(Config):
        assert f"\n[{section.name}] settings (--{section.name}.FIELD=VALUE):\n" in text
        values = getattr(Config(), section.name)
        for f in dataclasses.fields(values):
            line = lines[f"--{section.name}.{f.name}"]
            assert _words(f.metadata["help"]) in line
            assert line.endswith(f"(default {toml_value(getattr(values, f.name))})")


def test_the_listed_fields_are_not_parsed_by_argparse():
    """The overrides stay with parse_overrides: argparse leaves them (and their typos) over."""
    args, rest = build_parser().parse_known_args(["train", "--model.hidden", "64", "--model.hid=5", "--out", "r"])
    assert rest == ["--model.hidden", "64", "--model.hid=5"] and args.out == "r"


def test_given_fields_are_those_given():
    args, _ = build_parser().parse_known_args(["generate", "--checkpoint", "c", "--temperature", "0", "--seed", "3"])
    assert given_fields(args) == {"generate.temperature": 0.0, "generate.seed": 3, "parallel.tp": 1}
    assert given_fields(args, "generate") == {"temperature": 0.0, "seed": 3}
    args, _ = build_parser().parse_known_args(["train", "--data-path", "0.3", "a", "0.7", "b"])
    assert given_fields(args) == {"data.data_path": ["0.3", "a", "0.7", "b"]}


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--checkpoint", "c", "--top-p", "0"], "argument --top-p: generate.top_p must be a number in (0, 1]"),
    (["generate", "--checkpoint", "c", "--seed", "x"], "argument --seed: generate.seed: expected int, got 'x'"),
    (["generate", "--checkpoint", "c", "--temperature", "inf"], "argument --temperature: generate.temperature must"),
    (["generate", "--checkpoint", "c", "--tp", "0"], "argument --tp: 0 is not in [1, inf]"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag_and_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and message in err[-1] and err[-1].startswith("mtnlg generate: error: ")


def test_field_flag_refuses_an_unknown_field():
    with pytest.raises(ValueError, match=r"unknown field of \[train\] 'outt' \(did you mean 'out'\?\)"):
        field_flag(argparse.ArgumentParser(), "train.outt", "--out")


def test_a_required_field_flag_shows_no_default(monkeypatch, capsys):
    text = _words(_help("preprocess", monkeypatch, capsys))
    assert "used to build the data. (--data.tokenizer)" in text
