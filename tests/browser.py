"""Headless Chromium for the page tests (``emorl serve``'s page, ``emorl judge``'s page): the system browser driven
by selenium, and the skip that names the install command where it is missing (``.ci/run`` installs it)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                   reason="no headless browser: install chromium and chromium-driver "
                                          "(apt-get install chromium chromium-driver) to run the page test")


def chrome() -> Any:
    """A headless Chrome driver at 1280x900 (callers quit it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which(BROWSER)
    # --allow-file-access-from-files: without it, Chromium 156 on a loaded machine sometimes shows a reloaded
    # file:// page an empty localStorage and the next reload the saved one (9 of 25 reload pairs under two busy
    # loops on 2 cores, 0 of 25 with the flag); the offline judge page's reload test needs one storage per file.
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
             "--allow-file-access-from-files")
    for a in flags:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    return driver
