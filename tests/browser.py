"""Drive the demo page in headless Chromium from the OS packages (Debian: chromium, chromium-driver).

Used by the browser test, and to redo the README's screenshot against a running `lsd-edge demo`:

    python -m tests.browser http://127.0.0.1:7860 runs/data/shapes/images/eval_002003.png \
        "what color is the shape in the bottom left ?" docs/demo.png "ONNX int8"

Chromium itself, and the in-browser student page (`lsd-edge demo --web`), are driven by
`lsd_edge.verify.browser`, which `lsd-edge verify` runs too; its names are re-exported here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lsd_edge.verify.browser import (  # noqa: F401  (the browser tests import them from here)
    WebAnswer,
    ask_web_page,
    chromium,
    console_log,
    find_browser,
    open_web_page,
    text_of,
)


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
            lambda d: _ended(
                text_of(d, "#agreement"), text_of(d, "#teacher-stats"), text_of(d, "#student-stats")
            )
        )
        answers = PageAnswers(
            teacher=_value(driver, "#teacher-answer"),
            student=_value(driver, "#student-answer"),
            agreement=text_of(driver, "#agreement"),
            teacher_figures=text_of(driver, "#teacher-stats"),
            student_figures=text_of(driver, "#student-stats"),
        )
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(int(height) + 40, 4000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return answers


def _ended(agreement: str, *figures: str) -> bool:
    """Both answers have ended: the agreement line says so, or a column shows an error."""
    return "answers agree" in agreement or "answers differ" in agreement or any("error" in f for f in figures)


def _value(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"{css} textarea, {css} input")
    return (found[0].get_attribute("value") or "").strip() if found else ""


if __name__ == "__main__":
    url, image, question, out = sys.argv[1:5]
    print(ask_in_browser(url, Path(image), question, Path(out), backend=(sys.argv[5:] or [None])[0]))
