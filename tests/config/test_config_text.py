"""Discoverable configuration: `mtnlg config show`, the reference in docs/configuration.md, --help, list syntaxes,
--version."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from mtnlg.cli import main
from mtnlg.config import Config, ConfigError, build_config
from mtnlg.config.text import (
    REFERENCE_END,
    REFERENCE_START,
    reference_in,
    reference_markdown,
    to_toml,
    update_reference,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["--train.rampup_batch_size=[4, 4, 8]", "--data.data_path=0.3,a,0.7,b", "--train.lr=3e-4",
             "--data.tokenizer=tok \"quoted\"", "--train.peak_flops=1e12", "--model.dropout=0.1"]


def test_config_show_prints_toml_that_config_reads_back(tmp_path, capsys):
    assert main(["config", "show", "--preset", "tiny", *OVERRIDES]) == 0
    text = capsys.readouterr().out
    (tmp_path / "shown.toml").write_text(text, encoding="utf-8")
    assert build_config(file=tmp_path / "shown.toml") == build_config("tiny", overrides=OVERRIDES)


def test_config_show_puts_each_fields_help_above_it():
    lines = to_toml(Config()).splitlines()
    table = tomllib.loads("\n".join(lines))
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f.name in table[section.name]
            header = lines.index(f"[{section.name}]")
            index = next(i for i in range(header, len(lines)) if lines[i].startswith(f"{f.name} = "))
            assert lines[index - 1] == f"# {f.metadata['help']}", f.name


@pytest.mark.parametrize("text", ["4,4,8", "[4,4,8]", "[4, 4, 8]", "4 4 8"])
def test_both_list_syntaxes(text):
    assert build_config(overrides=[f"--train.rampup_batch_size={text}"]).train.rampup_batch_size == [4, 4, 8]


@pytest.mark.parametrize("text, expected", [("['a', 'b c']", ["a", "b c"]), ("[x, y]", ["x", "y"]),
                                            ("0.5,x,0.5,y", ["0.5", "x", "0.5", "y"])])
def test_string_lists(text, expected):
    assert build_config(overrides=[f"--data.data_path={text}"]).data.data_path == expected


def test_an_unreadable_list_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"train.rampup_batch_size: cannot read '\[4,4,8' as a list: write 4,4,8"):
        build_config(overrides=["--train.rampup_batch_size=[4,4,8"])


def test_train_help_lists_the_fields_and_points_to_config_show(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "mtnlg config show" in text and "4,4,8 or [4,4,8]" in text
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f.name in text


def test_version_matches_pyproject(capsys):
    from mtnlg import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert __version__ == project["version"]
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"mtnlg {__version__} (torch ")


def test_docs_configuration_reference_matches_the_dataclasses():
    """Regenerate with: python -m mtnlg config reference --update docs/configuration.md"""
    assert reference_in(ROOT / "docs" / "configuration.md") == reference_markdown()


def test_reference_lists_every_field_with_its_default_and_help():
    text = reference_markdown()
    for section in dataclasses.fields(Config):
        assert f"### `[{section.name}]`" in text
    assert "| `lr` | `0.0006` | Peak learning rate. |" in text
    assert "| `rampup_batch_size` | `[]` |" in text and '| `activation` | `"gelu_tanh"` |' in text


def test_config_reference_update_rewrites_only_between_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{REFERENCE_START}\nstale table\n{REFERENCE_END}\noutro\n", encoding="utf-8")
    assert main(["config", "reference", "--update", str(readme)]) == 0
    assert "updated" in capsys.readouterr().out
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"intro\n{REFERENCE_START}\n") and text.endswith(f"{REFERENCE_END}\noutro\n")
    assert reference_in(readme) == reference_markdown() and not update_reference(readme)
    readme.write_text("no markers\n", encoding="utf-8")
    assert main(["config", "reference", "--update", str(readme)]) == 2
    assert "no '<!-- config-reference:start" in capsys.readouterr().err
