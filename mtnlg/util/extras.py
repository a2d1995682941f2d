"""What is installed: mtnlg's version line, and what to install when an optional part is missing.

The core (training, generation, conversion) needs only the base dependencies; the HTTP server,
the loss plot, curation (datatrove), YAML configs, TensorBoard and lm-evaluation-harness need
packages that the extras of pyproject.toml install. A command that reaches one of them without it
says which package and how to get it.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

VERSION = "0.1.0"  # pyproject.toml's version

# The optional package a command may import -> the extra of pyproject.toml that installs it.
OPTIONAL_PACKAGES: dict[str, str | None] = {
    "fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "prometheus_client": "serve", "matplotlib": "demo",
    "transformers": "dev", "yaml": None, "tensorboard": None, "lm_eval": "eval",
    "datatrove": "curate", "py3langid": "curate", "orjson": "curate", "ray": None,
    "torchao": None,
}
PIP_NAMES = {"yaml": "pyyaml"}


def missing_package_message(module: str | None) -> str | None:
    """How to install the optional package of ``module`` (None when it is not an optional one)."""
    top = (module or "").split(".")[0]
    if top not in OPTIONAL_PACKAGES:
        return None
    pip_name, extra = PIP_NAMES.get(top, top), OPTIONAL_PACKAGES[top]
    how = f"pip install -e '.[{extra}]' (or pip install {pip_name})" if extra else f"pip install {pip_name}"
    return f"this needs the optional package {pip_name!r}, which is not installed: {how}"


def version_string() -> str:
    """mtnlg's version with torch's (read from its metadata: importing torch takes seconds) and Python's."""
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"mtnlg {VERSION} (torch {torch_version}, Python {sys.version.split()[0]})"
