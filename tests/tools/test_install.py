"""Installation: the CPU build of torch where there is no GPU, the documented path installs every
extra the README uses, and a missing optional package is named with the way to install it."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from mtnlg.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("install_torch", ROOT / "tools" / "install_torch.py")
install_torch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_torch)


def _makefile_var(name: str) -> str:
    return re.search(rf"^{name} :?\??= *(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M).group(1)


def test_no_gpu_tries_the_cpu_index_first_then_the_default():
    default = [sys.executable, "-m", "pip", "install", "-q", "torch==2.13.0"]
    cpu = [*default, "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert install_torch.pip_commands("2.13.0", gpu=False, cpu_index_reachable=True) == [cpu, default]
    assert install_torch.pip_commands("2.13.0", gpu=False, cpu_index_reachable=False) == [default]
    assert install_torch.pip_commands("2.13.0", gpu=True, cpu_index_reachable=True) == [default]


def test_a_failed_cpu_index_install_falls_back_and_says_so(capsys):
    tried: list[list[str]] = []
    commands = install_torch.pip_commands("2.13.0", gpu=False, cpu_index_reachable=True)
    assert install_torch.install(commands, lambda c: tried.append(c) or (1 if "--index-url" in c else 0)) == 0
    assert tried == commands and "trying the default index" in capsys.readouterr().err
    assert install_torch.install(commands, lambda c: 3) == 3  # nothing worked: pip's status


def test_an_unreachable_url_is_reported_not_raised():
    assert install_torch.reachable("http://127.0.0.1:9/", timeout=2) is False


def test_the_documented_install_installs_every_extra_and_the_pinned_torch():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Installation\n", 1)[1].split("\n## ", 1)[0]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = set(pyproject["optional-dependencies"])
    assert set(re.search(r'pip install -e "\.\[([a-z,]+)\]"', section).group(1).split(",")) == extras
    assert set(_makefile_var("EXTRAS").split(",")) == extras
    torch_version = _makefile_var("TORCH_VERSION")
    assert f"python tools/install_torch.py {torch_version}" in section
    from packaging.specifiers import SpecifierSet

    (torch_spec,) = [d for d in pyproject["dependencies"] if d.startswith("torch")]
    assert torch_version in SpecifierSet(torch_spec.removeprefix("torch"))


def test_training_without_matplotlib_says_why_there_is_no_plot(train_data_flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it fails
    args = ["train", *train_data_flags, "--out", str(tmp_path / "run"), "--no-progress", "--model.seq_len=16",
            "--model.n_layers=1", "--model.hidden=32", "--model.n_heads=2", "--train.micro_batch_size=2",
            "--train.global_batch_size=2", "--train.steps=1", "--train.eval_interval=0", "--train.peak_flops=1e12",
            "--train.device=cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no loss.png: this needs the optional package 'matplotlib'" in out and "pip install -e '.[demo]'" in out
    assert not (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "log.jsonl").is_file()


def test_serve_without_fastapi_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "mtnlg.serve.app", raising=False)
    assert main(["serve", "--checkpoint", "no-such-checkpoint"]) == 2
    assert "optional package 'fastapi', which is not installed: pip install -e '.[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("module, expected", [("yaml.constructor", "pip install pyyaml"), ("numpy", None),
                                              ("lm_eval.api", "pip install -e '.[eval]'")])
def test_missing_package_messages(module, expected):
    from mtnlg.util.extras import missing_package_message

    message = missing_package_message(module)
    assert message is None if expected is None else expected in message
