"""The run report opens in a real browser: headless Chromium (Debian's `chromium`, driven by Selenium
through Debian's `chromedriver`, nothing downloaded) over the report of a real run on the local server.

Every thumbnail decodes, the page logs no console error, and it reads at 1280 px and at a phone's
390 px without horizontal scrolling. A screenshot at each width is kept in `.work/artifacts/`.
`make test` installs the browser (`make browser`); without it these tests fail, they never skip.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider.samples import make_product_photo
from support import REPO_ROOT
from support.runs import pipeline_config, run_pipeline
from support.servers import start_api_server

ARTIFACTS = REPO_ROOT / ".work" / "artifacts"
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
# An id no layout can wrap at a space: the page must break it rather than grow wider than a phone.
LONG_ID = "sku-" + "x" * 90


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of a run of five product photos and one missing file, with masks."""
    root = tmp_path_factory.mktemp("browser-report")
    photos = root / "photos"
    photos.mkdir()
    paths = []
    for seed in range(5):
        path = photos / f"product-{seed}.jpg"
        Image.fromarray(make_product_photo(seed, 320, 240).rgb).save(path, quality=90)
        paths.append(str(path))
    paths.append(str(photos / "missing.jpg"))
    ids = [LONG_ID, *(f"sku-{index}" for index in range(1, len(paths)))]
    manifest = root / "products.parquet"
    pq.write_table(pa.table({"sku": ids, "image_url": paths}), manifest)
    with start_api_server(root) as server:
        config = pipeline_config(
            root, str(manifest), id_column="sku", binary_mask=True, max_failed_fraction=0.5
        )
        summary = run_pipeline(server, config)
    assert summary.report_html_uri is not None
    return Path(summary.report_html_uri)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver: run `make browser` "
            "(apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # No sandbox: tests may run as root (in CI containers); the page is our own file.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser: Any, page: Path, width: int, height: int) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    browser.get(page.as_uri())  # returns once the page has loaded, images included


def test_every_thumbnail_of_the_report_loads(browser: Any, report_page: Path) -> None:
    _open(browser, report_page, *WIDTHS["desktop"])

    sizes = browser.execute_script(
        "return [...document.images].map(image => [image.alt, image.complete, image.naturalWidth])"
    )

    assert len(sizes) == 6 * 3  # original, cutout and mask of every row
    assert [alt for alt, complete, width in sizes if not (complete and width > 0)] == []


def test_the_report_logs_no_console_error(browser: Any, report_page: Path) -> None:
    browser.get_log("browser")  # drop what earlier pages logged
    _open(browser, report_page, *WIDTHS["desktop"])

    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    assert errors == []


@pytest.mark.parametrize("device", sorted(WIDTHS))
def test_the_report_reads_without_horizontal_scrolling(browser: Any, report_page: Path, device: str) -> None:
    width, height = WIDTHS[device]
    _open(browser, report_page, width, height)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"report-{device}-{width}px.png"))

    layout = browser.execute_script(
        """
        const captions = [...document.querySelectorAll('figcaption')];
        return {
            page: document.documentElement.scrollWidth,
            viewport: window.innerWidth,
            widest: Math.max(...[...document.body.querySelectorAll('*')].map(
                element => element.getBoundingClientRect().right)),
            thumbnail: Math.min(...[...document.images].map(image => image.getBoundingClientRect().width)),
            caption_px: Math.min(...captions.map(c => parseFloat(getComputedStyle(c).fontSize))),
            columns: getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length,
        };
        """
    )

    assert layout["viewport"] == width
    assert layout["page"] <= width
    assert layout["widest"] <= width
    assert layout["thumbnail"] >= 90  # a product is still recognisable
    assert layout["caption_px"] >= 12
    assert layout["columns"] == (1 if device == "phone" else 2)
