"""The playground page at / in a real headless browser: Debian's chromium and chromedriver, driven
through selenium (nothing is downloaded: both come from the system's packages)."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator

import pytest
import torch

from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from tests.harness.serving import KEY, with_chat_markers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="the playground's browser test needs chromium and chromedriver on PATH "
           "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPT = "The quick"


@pytest.fixture(scope="module")
def engine_tokenizer(small_tokenizer) -> Tokenizer:
    return with_chat_markers(small_tokenizer)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _fill(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _open(browser, url: str, max_tokens: int) -> None:
    """Load the page, give it the API key, and set greedy decoding."""
    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")  # the page keeps the key for the browser tab's session
    browser.refresh()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 20).until(lambda _: "needs an API key" in status.text)  # the page is public, the API not
    _fill(browser, "api-key", KEY)
    browser.find_element(By.ID, "max-tokens").click()  # leaving the key field sends its change event
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "model").text == "model: tiny")
    for element_id, value in (("max-tokens", str(max_tokens)), ("temperature", "0"), ("top-p", "1")):
        _fill(browser, element_id, value)


def _done(browser) -> str:
    WebDriverWait(browser, 60).until(lambda b: "tokens in" in b.find_element(By.ID, "status").text)
    return browser.find_element(By.ID, "status").text


def test_completion_streams_into_the_page(browser, url: str, engine: Engine) -> None:
    expected = engine.generate([PROMPT], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert len(expected.tokens) >= 4  # enough tokens to see some arrive before the others
    _open(browser, url, max_tokens=10)
    _fill(browser, "prompt", PROMPT)
    slow = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.15))  # each token takes >= 0.15 s
    partial = []
    try:
        browser.find_element(By.ID, "generate").click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text, running_now = browser.execute_script(
                "const g = document.querySelector('#output .generated');"
                "return [g ? g.textContent : '', !document.getElementById('stop').disabled];")
            if not running_now and "tokens in" in browser.find_element(By.ID, "status").text:
                break
            if running_now and text:
                partial.append(text)
            time.sleep(0.03)
        status = _done(browser)
    finally:
        slow.remove()
    shown = browser.find_element(By.CSS_SELECTOR, "#output .generated").get_attribute("textContent")
    assert shown == expected.text
    assert browser.find_element(By.ID, "output").get_attribute("textContent") == PROMPT + expected.text
    assert any(len(p) < len(expected.text) for p in partial), "text appeared only once complete: not streamed"
    assert status.startswith(f"{len(expected.tokens)} tokens in")


def test_chat_mode_keeps_the_conversation(browser, url: str, engine: Engine) -> None:
    _open(browser, url, max_tokens=6)
    browser.find_element(By.ID, "mode-chat").click()
    _fill(browser, "system", "Be brief.")
    template = ChatTemplate()
    messages = [{"role": "system", "content": "Be brief."}]
    for turn, question in enumerate(("Pack my box", "The quick"), start=1):
        _fill(browser, "prompt", question)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b, n=turn: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n)
        _done(browser)
        messages.append({"role": "user", "content": question})
        params = SamplingParams(max_new_tokens=6, temperature=0, stop=[template.end])
        prompt = engine.encode(template.render(messages), specials=template.markers)
        expected = engine.generate([prompt], params)[0].text
        answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
        assert answers[-1].get_attribute("textContent") == expected  # the second answer saw the first exchange
        messages.append({"role": "assistant", "content": expected})
    users = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user .content")]
    assert users == ["Pack my box", "The quick"]


def _visible(text: str) -> str:
    """A token as the page's grid shows it (spaces, newlines and tabs made visible)."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")


def test_tokens_coloured_by_probability_and_the_inspector_grid(browser, url: str, engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=5)
    expected = engine.generate([PROMPT], params)[0]
    _open(browser, url, max_tokens=6)
    _fill(browser, "prompt", PROMPT)
    browser.find_element(By.ID, "generate").click()
    _done(browser)
    spans = browser.find_elements(By.CSS_SELECTOR, "#output .generated .tok")
    assert "".join(s.get_attribute("textContent") for s in spans) == expected.text
    first = float(spans[0].get_attribute("data-p"))
    assert abs(first - math.exp(expected.logprobs[0])) < 1e-3
    ActionChains(browser).move_to_element(spans[0]).perform()
    tip = browser.find_element(By.ID, "tip")
    WebDriverWait(browser, 10).until(lambda _: tip.is_displayed())
    best = max(expected.top_logprobs[0], key=expected.top_logprobs[0].get)
    assert _visible(engine.tokenizer.token_str(best)) in tip.text and "%" in tip.text

    _fill(browser, "attn-layer", "1")
    browser.find_element(By.ID, "inspect").click()
    WebDriverWait(browser, 30).until(lambda b: "inspected" in b.find_element(By.ID, "status").text)
    ids = engine.encode(PROMPT)
    with torch.no_grad():
        greedy = engine.model(torch.tensor([ids]))[0, :, : engine.vocab_size].argmax(-1).tolist()
    rows = browser.find_elements(By.CSS_SELECTOR, "#lens tr")
    assert [r.get_attribute("data-layer") for r in rows[1:]] == ["1", "0"]  # the output layer on top
    cells = [c.get_attribute("textContent") for c in rows[1].find_elements(By.TAG_NAME, "td")]
    assert cells == [_visible(engine.tokenizer.token_str(t)) for t in greedy]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heads canvas")) == 4  # the tiny model's heads
