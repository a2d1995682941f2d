"""The embedded default corpus: English prose that every Python installation already carries.

Nothing is downloaded. The documents come from the running interpreter's standard library:

* ``pydoc_data.topics``: the language reference topics that ``help()`` shows (one document each);
* the docstrings of every standard-library source module (module, classes, functions, methods),
  read with ``ast`` so no module is imported or executed (importing ``antigravity`` opens a browser);
* the docstrings of the compiled modules (``builtins``, ``math``, ``itertools``, ...), which have no source;
* the prose text files shipped beside the sources (``LICENSE.txt``, IDLE's notes, ``email/architecture.rst``).

All of it is Python documentation, copyright the Python Software Foundation, under the PSF License
Agreement (the ``LICENSE.txt`` document of the corpus). The output is deterministic: the same
interpreter version writes the same bytes on every run, because every listing is sorted.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import sys
import sysconfig
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mtnlg.util.fs import atomic_file

# Parts of the standard library that are tests, test data or third-party packages, not documentation.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".rst"}
_NOT_PROSE = ("Grammar",)  # lib2to3's grammar files are .txt but not prose
_FOLDER_SUFFIXES = {".txt", ".md"}


@dataclass
class CorpusStats:
    """What :func:`build_corpus` wrote."""

    path: str
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    seconds: float = 0.0
    sources: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items()))
        lines = [
            f"wrote {self.path}: {self.documents:,} documents, {self.characters:,} characters "
            f"({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s [{parts}]"
        ]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _stdlib_files(root: Path, suffixes: set[str]) -> list[Path]:
    """Sorted files under ``root`` with these suffixes, outside test and third-party folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_PARTS]
        found += [Path(dirpath, f) for f in filenames if Path(f).suffix in suffixes]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})"


def _docstrings(tree: ast.Module, module: str) -> Iterator[str]:
    """Module, class and function docstrings in source order, each under a pydoc-like heading."""
    doc = ast.get_docstring(tree)
    if doc:
        yield f"Module {module}\n\n{doc}"

    def walk(body: list[ast.stmt], prefix: str) -> Iterator[str]:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    head = f"class {name}" if isinstance(node, ast.ClassDef) else name + _signature(node)
                    yield f"{head}\n\n{doc}"
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, name)

    yield from walk(tree.body, module)


def source_module_documents(root: Path, modules: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """(source, text) per standard-library source module that has docstrings."""
    wanted = tuple(modules) if modules is not None else None
    for path in _stdlib_files(root, {".py"}):
        name = _module_name(path.relative_to(root))
        if wanted is not None and not any(name == m or name.startswith(m + ".") for m in wanted):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # e.g. deliberately broken sources; not documentation
        parts = list(_docstrings(tree, name))
        if parts:
            yield f"module:{name}", "\n\n".join(parts) + "\n"


def compiled_module_documents(modules: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """(source, text) for modules with no Python source: their documentation lives in C."""
    root = stdlib_dir()
    names = set(sys.builtin_module_names)
    # The base installation's extension folder (a virtual environment has none of its own).
    for dynload in (root / "lib-dynload", Path(sys.base_prefix) / "DLLs"):
        if dynload.is_dir():
            names |= {p.name.split(".")[0] for p in dynload.iterdir() if p.suffix in (".so", ".pyd")}
    # Private modules are implementation details, except _io (the classes behind io); xx* are examples;
    # readline writes terminal escapes on import.
    names = {n for n in names if (not n.startswith("_") or n == "_io") and not n.startswith("xx")} - {"readline"}
    if modules is not None:
        names &= set(modules)
    for name in sorted(names):
        if (root / f"{name}.py").exists() or (root / name).is_dir():
            continue  # its source module is covered by source_module_documents
        try:
            with warnings.catch_warnings():  # deprecated modules (PEP 594) warn on import
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except ImportError:
            continue
        parts = [f"Module {name}\n\n{inspect.cleandoc(mod.__doc__)}"] if mod.__doc__ else []
        for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
            obj = getattr(mod, attr)
            doc = obj.__doc__ if (inspect.isbuiltin(obj) or inspect.isclass(obj)) else None
            if doc and getattr(obj, "__module__", name) in (name, "builtins"):
                parts.append(f"{name}.{attr}\n\n{inspect.cleandoc(doc)}")
        if parts:
            yield f"module:{name}", "\n\n".join(parts) + "\n"


def embedded_documents(modules: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """Every (source, text) document of the embedded corpus; ``modules`` restricts it (for tests)."""
    from pydoc_data.topics import topics

    modules = list(modules) if modules is not None else None
    if modules is None:
        for key in sorted(topics):
            yield f"topic:{key}", topics[key].strip() + "\n"
    root = stdlib_dir()
    yield from source_module_documents(root, modules)
    yield from compiled_module_documents(modules)
    if modules is None:
        for path in _stdlib_files(root, _TEXT_SUFFIXES):
            if not any(s in path.name for s in _NOT_PROSE):
                yield f"file:{path.relative_to(root).as_posix()}", path.read_text(encoding="utf-8")


def folder_documents(directory: str | Path, skipped: list[str]) -> Iterator[tuple[str, str]]:
    """One document per ``.txt``/``.md`` file under ``directory``, in sorted path order.

    Files that are not UTF-8 or hold only whitespace are listed in ``skipped`` instead.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {directory}")
    for path in sorted(directory.rglob("*"), key=lambda p: p.relative_to(directory).as_posix()):
        if not path.is_file() or path.suffix.lower() not in _FOLDER_SUFFIXES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            skipped.append(f"{path}: not UTF-8 (invalid byte at offset {exc.start})")
            continue
        if not text.strip():
            skipped.append(f"{path}: empty")
            continue
        yield f"file:{path.relative_to(directory).as_posix()}", text


def build_corpus(
    out_path: str | Path, from_dir: str | Path | None = None, modules: Iterable[str] | None = None
) -> CorpusStats:
    """Write the corpus as JSONL (``{"text": ..., "source": ...}`` per line), atomically.

    ``from_dir`` builds from a folder of ``.txt``/``.md`` files instead of the embedded documentation;
    ``modules`` keeps only those standard-library modules (and their submodules).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats(path=str(out_path))
    start = time.perf_counter()
    docs = folder_documents(from_dir, stats.skipped) if from_dir is not None else embedded_documents(modules)
    with atomic_file(out_path) as f:
        for source, text in docs:
            line = json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
            f.write(line)
            stats.documents += 1
            stats.characters += len(text)
            stats.bytes += len(line.encode("utf-8"))
            stats.sources[source.split(":")[0]] += 1
    stats.seconds = time.perf_counter() - start
    return stats
