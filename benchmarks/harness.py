"""What the studies in benchmarks/ share: where results go, the machine stamp, writing JSON +
markdown, the load-test client driver, and headless-Chromium screenshots.

The stamp and the atomic writers are the ones `o2n-edge bench` uses (re-exported from
:mod:`o2n_edge.bench`), so every result file, product or study, carries the same context.

Screenshots use the same browser setup as the operator-page test (tests/test_server_browser.py):
the browser and its driver come from one apt source, nothing is downloaded (``SE_OFFLINE``), and
a missing piece is a clear error naming the install command.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from o2n_edge.bench.env import load_average, machine_stamp, percentiles, set_threads
from o2n_edge.bench.latency_report import stamp_lines, write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(out: Path, name: str, doc: dict[str, Any], markdown: str) -> dict[str, str]:
    """``out/<name>.json`` and ``out/<name>.md``, both atomic; returns the paths."""
    return {"json": str(write_json(out / f"{name}.json", doc)), "md": str(write_text(out / f"{name}.md", markdown))}


def run_clients(
    work: Callable[[int, int], Any], clients: int, per_client: int, time_limit_s: float
) -> tuple[list[float], list[tuple[int, Any]], float]:
    """``clients`` threads each calling ``work(client, request)`` up to ``per_client`` times.

    Shared by the load benchmarks (serve, Triton) so both drive their servers the same way: a
    client stops early once ``time_limit_s`` has passed, so a slow path cannot stall the run.
    Returns each request's latency (ms), ``(request index, what work returned)`` and the wall s.
    """
    lat: list[float] = []
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit_s

    def client(cid: int) -> None:
        for i in range(per_client):
            if time.perf_counter() > deadline:
                return
            request = cid * per_client + i
            t0 = time.perf_counter()
            out = work(cid, request)
            dt = (time.perf_counter() - t0) * 1000.0
            with lock:
                lat.append(dt)
                results.append((request, out))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    return lat, results, time.perf_counter() - t0


CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CHROME_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--hide-scrollbars",
)
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install 'o2n-edge[dev]'"
WIDTH = 1280
# Tallest screenshot taken: a long per-image table would otherwise make a 20,000-px PNG.
MAX_HEIGHT = 7000
PAGE_TIMEOUT_S = 60


class BrowserUnavailable(RuntimeError):
    """Chromium, chromedriver or selenium is missing (or the browser would not start)."""


def open_browser(width: int = WIDTH, height: int = 1000):
    """A headless Chromium driven by Selenium; the caller quits it."""
    try:
        from selenium import webdriver
    except ImportError as exc:
        raise BrowserUnavailable(f"selenium is not installed: {INSTALL_HINT}") from exc
    chromium = next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        raise BrowserUnavailable(f"chromium/chromedriver not installed: {INSTALL_HINT}")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (*CHROME_ARGS, f"--window-size={width},{height}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except Exception as exc:
        raise BrowserUnavailable(f"cannot start headless chromium ({type(exc).__name__}: {exc})") from exc
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    return driver


def images_loaded(driver) -> tuple[int, int]:
    """(images on the page, images that decoded): a broken data URI shows up as a difference."""
    return tuple(driver.execute_script(
        "const im = Array.from(document.images);"
        "return [im.length, im.filter(i => i.complete && i.naturalWidth > 0).length];"
    ))


def screenshot_page(html: Path, png: Path, width: int = WIDTH, max_height: int = MAX_HEIGHT) -> dict:
    """Open ``html`` from disk, resize the window to the page's height (capped) and save a PNG."""
    driver = open_browser(width)
    try:
        driver.get(Path(html).resolve().as_uri())
        n_images, n_loaded = images_loaded(driver)
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(width, min(max(height, 600), max_height))
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp = png.with_name(png.name + ".tmp.png")
        if not driver.save_screenshot(str(tmp)):
            raise BrowserUnavailable(f"chromium could not save a screenshot of {html}")
        os.replace(tmp, png)
    finally:
        driver.quit()
    return {"images": n_images, "images_loaded": n_loaded, "page_height": height}


__all__ = ["RESULTS", "BrowserUnavailable", "load_average", "machine_stamp", "percentiles", "run_clients",
           "screenshot_page", "set_threads", "stamp_lines", "write_json", "write_result", "write_text"]
