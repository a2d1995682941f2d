"""Screenshot of the playground with generated text (docs/playground.png, shown in docs/generation.md).

    python tools/playground_screenshot.py --checkpoint demo_out/run --out docs/playground.png

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
    args = p.parse_args()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(args.checkpoint), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1150,760", "--hide-scrollbars"):
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}: {driver.find_element(By.ID, 'status').text}")
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
