"""Full-page screenshots of local HTML files in Debian's headless Chromium (Selenium + chromedriver).

The same browser setup as the operator-page test (tests/test_server_browser.py): the browser and
its driver come from one apt source, nothing is downloaded (``SE_OFFLINE``), and a missing piece is
a clear error naming the install command.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
