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
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = find_browser()
    if found is None:
        raise RuntimeError(
            "no Chromium and chromedriver; install them: apt-get install -y chromium chromium-driver"
        )
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = tempfile.mkdtemp(prefix="lsd-edge-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
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
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


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


if __name__ == "__main__":
    url, image, question, out = sys.argv[1:5]
    print(ask_in_browser(url, Path(image), question, Path(out), backend=(sys.argv[5:] or [None])[0]))
