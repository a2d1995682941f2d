"""Screenshot of the playground with generated text (docs/playground.png, shown in docs/generation.md).

    python tools/playground_screenshot.py --checkpoint demo_out/run --out docs/playground.png
    python tools/playground_screenshot.py --checkpoint demo_out/run --inspector --out docs/inspector.png

With ``--inspector`` the tokens are coloured by probability, the alternatives of one are shown as
on hover, and the prompt is inspected (logit lens grid, one layer's attention heads): docs/serving.md.

Serves the checkpoint on a free local port, opens the page in headless chromium (Debian's
chromium and chromedriver, through selenium), completes a prompt and saves the window.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mtnlg.serve.app import create_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="docs/playground.png")
    p.add_argument("--prompt", default="Return a new list")
    p.add_argument("--max-tokens", default="48")
    p.add_argument("--seed", default="1")
    p.add_argument("--inspector", action="store_true", help="also inspect the prompt and hover a token")
    p.add_argument("--attention-layer", default="1", help="with --inspector: the layer whose heads are drawn")
    args = p.parse_args()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(args.checkpoint), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    size = "1150,1180" if args.inspector else "1150,760"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={size}", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        for element_id, value in (("max-tokens", args.max_tokens), ("seed", args.seed), ("prompt", args.prompt)):
            field = driver.find_element(By.ID, element_id)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 120).until(lambda d: "tokens in" in d.find_element(By.ID, "status").text)
        if args.inspector:
            _inspect(driver, args.attention_layer)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}: {driver.find_element(By.ID, 'status').text}")
    finally:
        driver.quit()
        server.should_exit = True


def _inspect(driver: webdriver.Chrome, layer: str) -> None:
    """Inspect the prompt, then hover the least likely generated token (its alternatives show)."""
    field = driver.find_element(By.ID, "attn-layer")
    field.clear()
    field.send_keys(layer)
    driver.find_element(By.ID, "inspect").click()
    WebDriverWait(driver, 120).until(lambda d: "inspected" in d.find_element(By.ID, "status").text)
    spans = driver.find_elements(By.CSS_SELECTOR, "#output .tok")
    least = min(spans[: len(spans) // 2 + 1], key=lambda s: float(s.get_attribute("data-p")))
    ActionChains(driver).move_to_element(least).perform()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "tip").is_displayed())


if __name__ == "__main__":
    main()
