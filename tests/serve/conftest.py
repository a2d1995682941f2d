"""The server every test module of this folder talks to: a tiny random model behind the real app,
served by uvicorn on 127.0.0.1 for the module. A module changes what it needs by overriding
``engine_tokenizer`` (chat markers) or ``app_options`` (batching window, body limit)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine
from tests.harness.serving import AUTH, KEY, running, tiny_engine

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def engine_tokenizer(small_tokenizer: Tokenizer) -> Tokenizer:
    return small_tokenizer


@pytest.fixture(scope="module")
def app_options() -> dict[str, Any]:
    """Further ``create_app`` arguments of this module's server."""
    return {}


@pytest.fixture(scope="module")
def engine(engine_tokenizer: Tokenizer) -> Engine:
    return tiny_engine(engine_tokenizer)


@pytest.fixture(scope="module")
def app(engine: Engine, app_options: dict[str, Any]) -> Any:
    from mtnlg.serve.app import create_app  # FastAPI is the serve extra's: imported once the test runs

    return create_app(engine, api_key=KEY, model_name="tiny", **app_options)


@pytest.fixture(scope="module")
def url(app: Any) -> Iterator[str]:
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[Any]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        yield c
