"""The compiled blending loop is Megatron's greedy rule exactly: equal to a plain Python loop on random
weights (ties included), to megatron-core's own helper under its time convention, and to the fallback."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest

from mtnlg.data import blend
from mtnlg.data.blend import blending_indices, load_helper, megatron_core_helpers, python_blend


def reference(weights: list[float], size: int, served_first: bool = True) -> np.ndarray:
    """The rule as written: the dataset with the largest deficit w_d * n - served_d, ties to the lower index."""
    served, out = [0] * len(weights), []
    for i in range(size):
        n = i + 1 if served_first else max(i, 1)
        deficits = [w * n - s for w, s in zip(weights, served, strict=True)]
        best = deficits.index(max(deficits))
        out.append(best)
        served[best] += 1
    return np.array(out)


WEIGHTS = [
    [0.5, 0.5], [0.25, 0.25, 0.5], [0.1] * 10, [1 / 3] * 3, [0.2, 0.2, 0.2, 0.2, 0.2],  # exact and float ties
    *[list(np.random.default_rng(s).dirichlet(np.ones(k))) for s, k in ((0, 2), (1, 3), (2, 10), (3, 17))],
    [1e-4, 0.9999],
]


@pytest.mark.parametrize("served_first", [True, False])
def test_compiled_loop_equals_the_reference_loop(served_first: bool) -> None:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: schedules come from the Python loop (tested below)")
    assert load_helper() is not None
    for weights in WEIGHTS:
        d, local = blending_indices(weights, 3000, served_first)
        assert np.array_equal(d, reference(weights, 3000, served_first)), weights
        for k in range(len(weights)):  # each dataset's samples in order, without gaps
            assert np.array_equal(local[d == k], np.arange((d == k).sum()))


def test_compiled_loop_equals_megatron_core_helper() -> None:
    helpers = megatron_core_helpers()
    if helpers is None:
        pytest.skip("megatron-core's compiled helpers are not installed")
    for weights in WEIGHTS:
        w = np.asarray(weights, dtype=np.float64)
        d, s = np.empty(50_000, np.int16), np.empty(50_000, np.int64)
        helpers.build_blending_indices(d, s, w, len(w), d.size, False)
        ours, local = blending_indices(weights, d.size, served_first=False)
        assert np.array_equal(ours, d) and np.array_equal(local, s), weights


def test_without_a_compiler_the_python_loop_gives_the_same_schedule(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(blend, "_library", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="in Python"):
        d, local = blending_indices(WEIGHTS[7], 2000)
    assert blend._library is None
    expected_d, expected_local = python_blend(WEIGHTS[7], 2000)
    assert np.array_equal(d, reference(WEIGHTS[7], 2000)) and np.array_equal(local, expected_local)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the helper is tried once per process, not per call
        blending_indices(WEIGHTS[0], 10)


def test_helper_is_built_into_the_cache_once(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(blend, "_library", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert load_helper() is not None
    (built,) = (tmp_path / "mtnlg").glob("blend-*.so")
    monkeypatch.setattr(blend, "_library", False)
    monkeypatch.setattr(blend, "_compile", lambda target: pytest.fail("compiled again"))
    assert load_helper() is not None and list((tmp_path / "mtnlg").iterdir()) == [built]
