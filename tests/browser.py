"""Headless Chromium for the web page tests, driven through Selenium and Debian's chromium-driver.

Nothing is downloaded: the browser and its driver come from the system (``apt-get install chromium
chromium-driver``, done by ``.ci/run``); without them the tests skip and say why.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from tests.waiting import wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
)


def start_chromium(profile: pathlib.Path):
    """A Selenium driver for headless Chromium with a fresh profile in ``profile``; skips when unavailable."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.options import Options  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if not binary or not driver:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    # NOTE: keeps Selenium Manager from looking for (and downloading) a browser or driver of its own.
    os.environ["SE_OFFLINE"] = "true"
    opts = Options()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=str(profile.parent / "chromedriver.log"))
    return webdriver.Chrome(options=opts, service=service)


def screenshot(driver, name: str, tmp_dir: pathlib.Path) -> pathlib.Path:
    """Save a PNG under the test's tmp dir (a test artifact), and in docs/screenshots/ when CHATLOOP_SCREENSHOTS is set."""
    path = tmp_dir / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("CHATLOOP_SCREENSHOTS"):
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, docs / f"{name}.png")
    return path


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.1):
    """``tests.waiting.wait_until`` with this module's argument order (the deadline only bounds a hang)."""
    return wait_until(predicate, timeout=timeout, interval=interval, what=what)
