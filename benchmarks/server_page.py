"""Screenshot of the operator page serving a real bundle (headless Chromium, as the browser test).

Usage: python -m benchmarks.server_page --bundle bundles/hazelnut --image photo.jpg \
           --out /tmp/server_page_lite_hazelnut.png
Needs Debian's chromium + chromium-driver and selenium (the dev extra), like
tests/test_server_browser.py; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-extensions", "--window-size=1280,1100")
WAIT_S = 120


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--image", required=True, type=Path, nargs="+", help="images to inspect (the last is shown)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import os

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions
    from o2n_edge.runtime.results_log import ResultsLog
    from o2n_edge.runtime.server import create_app

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise SystemExit("needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"
    pipe = OrtPipeline(args.bundle, SessionOptions(intra_op_threads=args.threads))
    tmp = Path(tempfile.mkdtemp())
    log = ResultsLog(tmp / "page.db")
    app = create_app(pipe, log)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for a in CHROME_ARGS:
        options.add_argument(a)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, WAIT_S)
        for i, image in enumerate(args.image):
            driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
            wait.until(lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == n)
        wait.until(lambda d: d.find_element(By.ID, "decision").text in ("NORMAL", "ANOMALOUS"))
        time.sleep(1.0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        shown = driver.find_element(By.ID, "normal-fig").is_displayed()
        print(f"{args.out}: decision {driver.find_element(By.ID, 'decision').text}, "
              f"normal version shown: {shown}, branches {list(pipe.params.branches)}")
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
        log.close()


if __name__ == "__main__":
    main()
