"""Drive the demo page in headless Chromium from the OS packages (Debian: chromium, chromium-driver).

Used by the browser test, and to redo the README's screenshot against a running `lsd-edge demo`:

    python -m tests.browser http://127.0.0.1:7860 runs/data/shapes/images/eval_002003.png \
        "what color is the shape in the bottom left ?" docs/demo.png "ONNX int8"

Nothing is downloaded: Selenium is given the driver's path, so Selenium Manager never runs, and the
browser resolves no host name but the loopback address.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class PageAnswers:
    teacher: str
    student: str
    agreement: str
    teacher_figures: str
    student_figures: str


def ask_in_browser(
    url: str,
    image: Path,
    question: str,
    screenshot: Path,
    backend: str | None = None,
    timeout_s: float = 120,
    width: int = 1400,
) -> PageAnswers:
    """Open the page, upload `image`, ask `question` (after picking `backend`), wait for both answers
    to finish, save a full-page screenshot, and return what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(width) as driver:
        wait = WebDriverWait(driver, timeout_s)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(Path(image).resolve()))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        if backend is not None:
            label = driver.find_element(By.XPATH, f"//*[@id='backend']//label[normalize-space()='{backend}']")
            label.click()
        box = driver.find_element(By.CSS_SELECTOR, "#question textarea, #question input")
        box.clear()
        box.send_keys(question)
        driver.find_element(By.ID, "ask").click()
        # The agreement line appears only when both answers have ended (or one of them failed).
        wait.until(
            lambda d: _ended(_text(d, "#agreement"), _text(d, "#teacher-stats"), _text(d, "#student-stats"))
        )
        answers = PageAnswers(
            teacher=_value(driver, "#teacher-answer"),
            student=_value(driver, "#student-answer"),
            agreement=_text(driver, "#agreement"),
            teacher_figures=_text(driver, "#teacher-stats"),
            student_figures=_text(driver, "#student-stats"),
        )
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(int(height) + 40, 4000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return answers


def _ended(agreement: str, *figures: str) -> bool:
    """Both answers have ended: the agreement line says so, or a column shows an error."""
    return "answers agree" in agreement or "answers differ" in agreement or any("error" in f for f in figures)


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text.strip() if found else ""


def _value(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"{css} textarea, {css} input")
    return (found[0].get_attribute("value") or "").strip() if found else ""


# ------------------------------------------------------------------ the in-browser student page


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
        raise RuntimeError(
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
    WebDriverWait(driver, timeout_s).until(lambda d: _state(d, "status") in ("ready", "error"))
    if _state(driver, "status") == "error":
        raise RuntimeError(
            f"the page did not load the model: {_text(driver, '#status')}\n{console_log(driver)}"
        )
    return _text(driver, "#model")


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
        state=_state(driver, "answer"),
        ttft_ms=number("ttft-ms"),
        total_ms=number("total-ms"),
        tokens=None if tokens is None else int(tokens),
        tokens_per_s=number("tokens-per-s"),
    )


def _state(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return (found[0].get_attribute("data-state") or "") if found else ""


if __name__ == "__main__":
    url, image, question, out = sys.argv[1:5]
    print(ask_in_browser(url, Path(image), question, Path(out), backend=(sys.argv[5:] or [None])[0]))
