"""The operator page in a real headless Chromium (Debian's, driven by Selenium + chromedriver).

Why Selenium + Debian's chromium-driver: the browser and its driver come from one apt source
at matching versions, and nothing is downloaded at test time (Playwright would want its own
browser build). Skips with the install commands when either piece is missing.

Needs: ``apt-get install -y chromium chromium-driver`` and ``pip install selenium``.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeInspector, ServerThread
from PIL import Image

from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.server import create_app

TOKEN = "browser-test-token"
WAIT_S = 30
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,1200",
)
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"

webdriver = pytest.importorskip("selenium.webdriver", reason=f"selenium missing: {INSTALL_HINT}")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch):
    chromium = _find(CHROMIUM_CANDIDATES)
    driver_path = _find(("chromedriver",))
    if chromium is None or driver_path is None:
        pytest.skip(f"chromium/chromedriver not installed: {INSTALL_HINT}")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=driver_path)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as exc:  # noqa: BLE001 - e.g. a driver/browser version mismatch
        pytest.skip(f"cannot start headless chromium ({type(exc).__name__}: {exc})")
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _image_file(tmp_path: Path, value: int) -> Path:
    """A textured image so the three views differ visibly in the screenshot."""
    yy, xx = np.mgrid[0:96, 0:96]
    arr = np.stack([(xx * 2) % 256, (yy * 2) % 256, np.full_like(xx, value)], axis=-1)
    arr = ((arr.astype(np.int32) + value) // 2).astype(np.uint8)
    path = tmp_path / f"part_{value}.png"
    Image.fromarray(arr).save(path)
    return path


def test_operator_page_end_to_end(browser, tmp_path: Path) -> None:
    inspector = FakeInspector()
    log = ResultsLog(tmp_path / "browser.db")
    app = create_app(inspector, log, token=TOKEN)
    image_path = _image_file(tmp_path, 230)
    expected = inspector.expected_score(np.asarray(Image.open(image_path).convert("RGB")))
    wait = WebDriverWait(browser, WAIT_S)

    with ServerThread(app) as srv:
        browser.get(srv.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "bundle").text.startswith("bundle "))

        # without the token the results table cannot load: the page says so
        wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)

        token = browser.find_element(By.ID, "token")
        token.send_keys(TOKEN)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
        assert browser.execute_script(
            "return sessionStorage.getItem('o2n_edge_token')"
        ) == TOKEN

        browser.find_element(By.ID, "file").send_keys(str(image_path))
        wait.until(lambda d: d.find_element(By.ID, "decision").text in ("NORMAL", "ANOMALOUS"))
        decision = browser.find_element(By.ID, "decision")
        assert decision.text == ("ANOMALOUS" if expected > inspector.threshold else "NORMAL")
        assert decision.get_attribute("class") == decision.text.lower()
        colour = decision.value_of_css_property("background-color")
        assert colour in ("rgba(198, 40, 40, 1)", "rgb(198, 40, 40)"), colour  # red
        assert browser.find_element(By.ID, "score").text == f"{expected:.4f}"
        for img_id in ("query-img", "normal-img", "overlay-img"):
            img = browser.find_element(By.ID, img_id)
            wait.until(lambda d, el=img: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", el))
            assert browser.execute_script("return arguments[0].naturalWidth", img) == 64
            assert img.is_displayed()
        timings = browser.find_element(By.ID, "timings").text
        for stage in ("decode", "inspect", "encode", "log"):
            assert stage in timings

        sha = log.read()[-1]["image_sha256"]
        wait.until(lambda d: sha[:12] in d.find_element(By.ID, "results").text)
        first_row = browser.find_element(By.CSS_SELECTOR, "#results tbody tr")
        assert "ANOMALOUS" in first_row.text and f"{expected:.4f}" in first_row.text

        # a second, dark image: NORMAL in green, and the table grows newest-first
        browser.find_element(By.ID, "file").send_keys(str(_image_file(tmp_path, 10)))
        wait.until(lambda d: d.find_element(By.ID, "decision").text == "NORMAL")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 2)
        colour = browser.find_element(By.ID, "decision").value_of_css_property("background-color")
        assert colour in ("rgba(27, 138, 58, 1)", "rgb(27, 138, 58)"), colour  # green
        assert "NORMAL" in browser.find_element(By.CSS_SELECTOR, "#results tbody tr").text

        # a broken file: the server's error text is shown, nothing is logged
        bad = tmp_path / "broken.png"
        bad.write_bytes(image_path.read_bytes()[:200])
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "400" in d.find_element(By.ID, "error").text)
        assert "truncated" in browser.find_element(By.ID, "error").text
        assert log.count() == 2

        # screenshot of the page with the anomalous result shown
        browser.find_element(By.ID, "file").send_keys(str(image_path))
        wait.until(lambda d: d.find_element(By.ID, "decision").text == "ANOMALOUS")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 3)
        screenshot = tmp_path / "server_page.png"  # the results' copy is written by benchmarks/server_page.py
        assert browser.save_screenshot(str(screenshot))
    shot = Image.open(io.BytesIO(screenshot.read_bytes()))
    assert shot.size[0] >= 800 and os.path.getsize(screenshot) > 10_000
    log.close()


def test_no_normal_version_figure_without_a_transform(browser, tmp_path: Path) -> None:
    """A bundle that does not run the transform (lite's default) shows no empty 'normal version'."""
    log = ResultsLog(tmp_path / "browser.db")
    wait = WebDriverWait(browser, WAIT_S)
    for with_normal in (False, True):
        app = create_app(FakeInspector(with_normal=with_normal), log)
        with ServerThread(app) as srv:
            browser.get(srv.url + "/")
            browser.find_element(By.ID, "file").send_keys(str(_image_file(tmp_path, 230)))
            wait.until(lambda d: d.find_element(By.ID, "decision").text in ("NORMAL", "ANOMALOUS"))
            assert browser.find_element(By.ID, "normal-fig").is_displayed() is with_normal
            assert browser.find_element(By.ID, "query-img").is_displayed()
            assert browser.find_element(By.ID, "overlay-img").is_displayed()
    log.close()


def test_operator_verdict_buttons(browser, tmp_path: Path) -> None:
    """Inspect, click "defect": the page shows the stored verdict and the log holds it."""
    from o2n_edge.runtime.image_store import ImageStore

    log = ResultsLog(tmp_path / "browser.db")
    store = ImageStore(tmp_path / "kept", min_free_fraction=0, min_free_bytes=0)
    app = create_app(FakeInspector(), log, token=TOKEN, store=store)
    wait = WebDriverWait(browser, WAIT_S)
    with ServerThread(app) as srv:
        browser.get(srv.url + "/")
        token = browser.find_element(By.ID, "token")
        token.send_keys(TOKEN)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
        browser.find_element(By.ID, "file").send_keys(str(_image_file(tmp_path, 230)))
        wait.until(lambda d: d.find_element(By.ID, "decision").text == "ANOMALOUS")
        assert browser.find_element(By.ID, "fb-good").text == "good part"
        browser.find_element(By.ID, "fb-defect").click()
        wait.until(lambda d: "verdict: defect" in d.find_element(By.ID, "verdict-status").text)
        assert not browser.find_element(By.ID, "fb-good").is_enabled()  # one verdict per part
        row = log.read()[-1]
        (stored,) = log.feedback_rows()
        assert stored["request_id"] == row["request_id"] and stored["label"] == "defect"
        assert stored["image_sha256"] == row["image_sha256"] and stored["score"] == row["score"]

        # a part whose kept image is gone: the page shows the server's refusal
        browser.find_element(By.ID, "file").send_keys(str(_image_file(tmp_path, 10)))
        wait.until(lambda d: d.find_element(By.ID, "decision").text == "NORMAL")
        wait.until(lambda d: d.find_element(By.ID, "fb-good").is_enabled())
        for kept in (tmp_path / "kept").glob(log.read()[-1]["image_sha256"] + ".*"):
            kept.unlink()
        browser.find_element(By.ID, "fb-good").click()
        wait.until(lambda d: "410" in d.find_element(By.ID, "verdict-status").text)
        assert "no longer kept" in browser.find_element(By.ID, "verdict-status").text
        assert len(log.feedback_rows()) == 1
    log.close()
