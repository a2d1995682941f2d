"""The blending schedule: which dataset serves each blended sample, by Megatron's greedy rule, compiled.

Sample ``i`` goes to the dataset furthest behind its share, the largest ``w_d * (i + 1) - served_d``
(ties to the lower index): every prefix then stays within about one sample of the exact proportions
(under one for two or three datasets). The rule is sequential (each choice depends on all earlier
ones) and no closed form or vectorised equivalent reproduces it: the sorted due-time schedule this
replaces differed from it after a few samples (and strayed 1.84 samples from the proportions against
its 1.02 for ten datasets), and a fixed-point iteration over windows needs as many passes as the
window is long. So the loop runs as ~25 lines of C, compiled with the system's C compiler on first use
into the user cache (``$XDG_CACHE_HOME/mtnlg``, atomically, keyed by the source's hash) and called
through ``ctypes``: ~0.1 us per sample for ten datasets, like megatron-core's own helper (a
pybind11 extension this would otherwise need at run time). Without a compiler the same loop runs in
Python (~3 us per sample, with a warning). ``served_first=False`` counts the deficit before the
sample is served, ``w_d * max(i, 1) - served_d``: megatron-core's ``build_blending_indices`` exactly
(a test compares them).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

C_SOURCE = r"""
#include <stdint.h>
/* w[k] weights; out: chosen[size] dataset, local[size] its sample; served[k] zeroed by the caller.
   Deficits in double exactly as Python computes them (no contraction: -ffp-contract=off). */
void greedy_blend(const double *w, int32_t k, int64_t size, int32_t served_first,
                  int16_t *chosen, int64_t *local, int64_t *served) {
    int64_t count[k];  /* a local copy: the stores to chosen/local cannot alias it */
    for (int32_t d = 0; d < k; ++d) count[d] = served[d];
    for (int64_t i = 0; i < size; ++i) {
        double n = served_first ? (double)(i + 1) : (double)(i > 1 ? i : 1);
        int32_t best = 0;
        double deficit = w[0] * n - (double)count[0];
        for (int32_t d = 1; d < k; ++d) {
            double e = w[d] * n - (double)count[d];
            if (e > deficit) { deficit = e; best = d; }
        }
        chosen[i] = (int16_t)best;
        local[i] = count[best]++;
    }
    for (int32_t d = 0; d < k; ++d) served[d] = count[d];
}
"""
CFLAGS = ["-O2", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off"]

_library: ctypes.CDLL | None | bool = False  # False: not tried yet; None: no compiler here


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtnlg"


def _compile(target: Path) -> None:
    """Build the helper into ``target`` atomically (concurrent ranks each build and rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "blend.c", Path(tmp) / target.name
        src.write_text(C_SOURCE)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, *CFLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
        os.replace(out, target)


def load_helper() -> ctypes.CDLL | None:
    """The compiled loop (built on first use), or None where no C compiler works."""
    global _library
    if _library is not False:
        return _library  # type: ignore[return-value]
    key = hashlib.sha256((C_SOURCE + " ".join(CFLAGS) + os.uname().machine).encode()).hexdigest()[:16]
    target = _cache_root() / f"blend-{key}.so"
    try:
        if not target.is_file():
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"no compiled blending helper ({exc}); building the schedule in Python (~3 us per sample)",
                      stacklevel=3)
        _library = None
        return None
    ptr = np.ctypeslib.ndpointer
    lib.greedy_blend.argtypes = [ptr(np.float64, flags="C"), ctypes.c_int32, ctypes.c_int64, ctypes.c_int32,
                                 ptr(np.int16, flags="C"), ptr(np.int64, flags="C"), ptr(np.int64, flags="C")]
    lib.greedy_blend.restype = None
    _library = lib
    return lib


def python_blend(w: Sequence[float], size: int, served_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The same loop in Python: the fallback, and the reference the compiled loop is tested against."""
    served = [0] * len(w)
    chosen, local = np.empty(size, dtype=np.int16), np.empty(size, dtype=np.int64)
    for i in range(size):
        n = i + 1 if served_first else max(i, 1)
        best, deficit = 0, w[0] * n - served[0]
        for d in range(1, len(w)):
            if w[d] * n - served[d] > deficit:
                best, deficit = d, w[d] * n - served[d]
        chosen[i], local[i] = best, served[best]
        served[best] += 1
    return chosen, local


def megatron_core_helpers():  # noqa: ANN201
    """megatron-core's compiled ``helpers_cpp`` (the peer this is tested and measured against) loaded
    alone, not all of ``megatron.core`` (a minute's import under load), or None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("megatron.core") if importlib.util.find_spec("megatron") else None
    found = [p for d in (spec.submodule_search_locations or [] if spec else []) for p in
             (Path(d) / "datasets").glob("helpers_cpp*.so")]
    if not found:
        return None
    module_spec = importlib.util.spec_from_file_location("helpers_cpp", found[0])
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def blending_indices(weights: Sequence[float], size: int, served_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, sample index within that dataset) for ``size`` blended samples."""
    w = np.ascontiguousarray([float(x) for x in weights], dtype=np.float64)
    if len(w) > np.iinfo(np.int16).max:
        raise ValueError(f"{len(w)} datasets: a blend holds at most {np.iinfo(np.int16).max}")
    lib = load_helper()
    if lib is None:
        return python_blend([float(x) for x in w], size, served_first)
    chosen, local = np.empty(size, dtype=np.int16), np.empty(size, dtype=np.int64)
    lib.greedy_blend(w, len(w), size, int(served_first), chosen, local, np.zeros(len(w), dtype=np.int64))
    return chosen, local
