"""The in-browser student page (`lsd-edge demo --web`: transformers.js on onnxruntime-web's WASM)
driven in headless Chromium from the OS packages (Debian: chromium, chromium-driver) through Selenium.

The browser test (tests/demo/test_web_page.py, through tests/browser.py) and `lsd-edge verify` both
ask the page through `open_web_page` and `ask_web_page`. Nothing is downloaded: Selenium is given the
driver's path, so Selenium Manager never runs, and the browser resolves no host name but the loopback
address. Selenium is a dev dependency, imported when a page is driven.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lsd_edge.data.questions import EvalItem
from lsd_edge.demo.web_page import WebDemoError, find_assets, make_server, web_settings
from lsd_edge.errors import RuntimeModelError
from lsd_edge.verify.plan import FileSide

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # Any host name but the loopback address fails to resolve: the page may fetch nothing from outside.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def find_browser() -> tuple[str, str] | None:
    """(browser, driver) paths when both are installed, else None."""
    browser = next((p for p in BROWSERS if Path(p).is_file()), None) or shutil.which("chromium")
    driver = next((p for p in DRIVERS if Path(p).is_file()), None) or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text.strip() if found else ""


@dataclass
class WebAnswer:
    """One answer computed in the page (`lsd-edge demo --web`) and the figures it showed."""

    text: str
    figures: str
    state: str  # done or error
    ttft_ms: float | None
    total_ms: float | None
    tokens: int | None
    tokens_per_s: float | None


@contextmanager
def chromium(width: int = 1200):
    """A headless Chromium driven by Selenium (with its console log kept), closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if found is None:
        raise RuntimeModelError(
            "no Chromium and chromedriver; install them: apt-get install -y chromium chromium-driver"
        )
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.mkdtemp(prefix="lsd-edge-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_log(driver) -> str:
    """The page's console messages so far, one a line (for a failure's message)."""
    try:
        return "\n".join(e.get("message", "") for e in driver.get_log("browser"))
    except Exception:  # a driver without logs
        return ""


def open_web_page(driver, url: str, timeout_s: float = 120) -> str:
    """Load the page and wait until its model is ready; returns the model line it shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout_s).until(lambda d: state_of(d, "status") in ("ready", "error"))
    if state_of(driver, "status") == "error":
        raise RuntimeModelError(
            f"the page did not load the model: {text_of(driver, '#status')}\n{console_log(driver)}"
        )
    return text_of(driver, "#model")


def ask_web_page(
    driver,
    image: Path,
    question: str,
    max_new_tokens: int = 24,
    ignore_eos: bool = False,
    timeout_s: float = 120,
) -> WebAnswer:
    """On an open page (`open_web_page`): choose `image`, type `question`, click ask, and wait for the
    answer to end."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answered = int(driver.find_element(By.ID, "answer").get_attribute("data-answered") or 0)
    driver.find_element(By.ID, "image-file").send_keys(str(Path(image).resolve()))
    for field, value in (("question", question), ("max-new-tokens", str(max_new_tokens))):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    box = driver.find_element(By.ID, "ignore-eos")
    if box.is_selected() != ignore_eos:
        box.click()
    WebDriverWait(driver, timeout_s).until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    driver.find_element(By.ID, "ask").click()
    WebDriverWait(driver, timeout_s).until(
        lambda d: int(d.find_element(By.ID, "answer").get_attribute("data-answered") or 0) > answered
    )
    stats = driver.find_element(By.ID, "stats")

    def number(name: str) -> float | None:
        value = stats.get_attribute(f"data-{name}")
        return float(value) if value else None

    tokens = number("tokens")
    return WebAnswer(
        text=(driver.find_element(By.ID, "answer").text or "").strip(),
        figures=stats.text.strip(),
        state=state_of(driver, "answer"),
        ttft_ms=number("ttft-ms"),
        total_ms=number("total-ms"),
        tokens=None if tokens is None else int(tokens),
        tokens_per_s=number("tokens-per-s"),
    )


def state_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return (found[0].get_attribute("data-state") or "") if found else ""


def browser_missing() -> str | None:
    """Why the page cannot be driven here (no Chromium, no Selenium, no transformers.js assets), or None."""
    if find_browser() is None:
        return "no chromium + chromedriver (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium does not import (pip install -e '.[dev]')"
    try:
        find_assets()
    except WebDemoError as e:
        return str(e)
    return None


class BrowserSide(FileSide):
    """One variant of an export answered in the page, in headless Chromium (the page takes an image
    file and a question)."""

    def answers(
        self, items: list[EvalItem], max_new_tokens: int, *, batch_size=None, progress=None
    ) -> list[str]:
        from selenium.common.exceptions import WebDriverException

        server = make_server(web_settings(self.folder, self.variant), port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with chromium() as driver:
                open_web_page(driver, server.url)
                return self._ask(driver, items, max_new_tokens, progress)
        except WebDriverException as e:  # the browser died or a wait ran out
            reason = (e.msg or type(e).__name__).strip().splitlines()[0][:200]
            raise RuntimeModelError(
                f"{self.folder}: the page in Chromium failed on {self.variant}: {reason}"
            ) from None
        finally:
            server.shutdown()
            server.server_close()

    def _ask(self, driver, items: list[EvalItem], max_new_tokens: int, progress) -> list[str]:
        out = []
        for it in items:
            q = self.questions[it.id]
            page = ask_web_page(driver, q.image, q.question, max_new_tokens)
            if page.state != "done":
                raise RuntimeModelError(f"{self.folder}: the page failed on {self.variant}: {page.figures}")
            out.append(page.text)
            if progress is not None:
                progress(len(out), len(items))
        return out

    def first_logits(self, items: list[EvalItem]) -> None:
        return None  # the page shows text, not logits

    def close(self) -> None:
        pass
