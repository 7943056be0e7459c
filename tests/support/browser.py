"""Headless Chromium from the system's packages, driven by Selenium (the page's tests, screenshots).

Nothing is downloaded: the browser and driver are Debian's `chromium` and
`chromium-driver` (`apt-get install chromium chromium-driver`), and Selenium
Manager is kept offline.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
INSTALL_HINT = "install them with: apt-get install -y chromium chromium-driver (Debian/Ubuntu)"


def find_chromium() -> tuple[str, str]:
    """(browser, driver) paths, or RuntimeError saying what to install."""
    browser = os.environ.get("EDGE_CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = os.environ.get("EDGE_CHROMEDRIVER") or next((p for p in map(shutil.which, DRIVERS) if p), None)
    if not browser or not driver:
        missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
        raise RuntimeError(f"{' and '.join(missing)} not found on PATH; {INSTALL_HINT}")
    return browser, driver


def headless_chromium(width: int = 1280, height: int = 900) -> Any:
    """A Selenium WebDriver on the system Chromium; quit() it when done."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def ask_on_page(driver: Any, question: str, *, image: str | os.PathLike | None = None, mode: str = "ask",
                max_tokens: int = 24, temperature: float = 0.0, timeout_s: float = 120) -> None:
    """Fill the page's composer (image, mode, max tokens, temperature, question) and press Ask."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    if image is not None:
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, timeout_s).until(lambda d: d.find_element(By.ID, "attachment").is_displayed())
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    temp = driver.find_element(By.ID, "temperature")
    temp.clear()
    temp.send_keys(str(temperature))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "ask").click()
