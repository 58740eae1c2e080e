"""The web demo (`inference.app`) driven in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, which `make test` installs where it can) against the page served on localhost
with the tiny models: upload a photo, type, click, and the generated image appears."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

gradio = pytest.importorskip("gradio", reason="the web demo's extra (gradio) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not os.path.exists(CHROMEDRIVER) or not (shutil.which("chromium") or shutil.which("chromium-browser")):
    pytest.skip(
        "Chromium and ChromeDriver are not installed (Debian: apt-get install chromium chromium-driver; "
        "`make browser` does it)",
        allow_module_level=True,
    )

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# no first-run, sync, update or background calls: the test machine has no network
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_sd_path, tiny_encoders_path, tiny_clipseg_path):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from inference.app import DemoApp
    from inference.pipeline import ElitePipeline

    elite = ElitePipeline.from_pretrained(
        str(tiny_sd_path), encoders=str(tiny_encoders_path), device="cpu", dtype="float32", safety_checker=False
    )
    page = DemoApp(elite, str(tiny_clipseg_path), max_steps=2).build()
    port = _free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _type(browser, elem_id: str, text: str) -> None:
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def _wait(browser, condition, seconds: float = 180, what: str = ""):
    try:
        return WebDriverWait(browser, seconds, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException as err:
        browser.save_screenshot("/tmp/app_test_failure.png")
        raise AssertionError(
            f"timed out waiting for {what}; page text: {browser.find_element(By.TAG_NAME, 'body').text[:800]}"
        ) from err


def test_upload_type_click_and_the_image_appears(served, browser, data_dir):
    browser.get(served)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), 60, "the page")
    upload = browser.find_element(By.CSS_SELECTOR, "#photo input[type=file]")
    upload.send_keys(str(data_dir / "concepts" / "dreambooth" / "dog" / "00.jpg"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#photo canvas"), 60, "the photo in the editor")
    time.sleep(1.0)  # the editor hands the upload to the server
    _type(browser, "prompt", "a photo of S* in the snow")
    _type(browser, "mask_word", "dog")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    images = _wait(
        browser,
        lambda d: [
            i
            for i in d.find_elements(By.CSS_SELECTOR, "#gallery img")
            if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
        ],
        what="the generated image",
    )
    assert browser.execute_script("return arguments[0].naturalWidth", images[0]) >= 16
    status = _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value"),
        60,
        "the settings line",
    )
    assert "automatic mask for 'dog'" in status and "lambda 0.6" in status and "2 steps" in status
    assert browser.find_elements(By.CSS_SELECTOR, "#masks img")  # the mask that was used is shown


def test_a_missing_photo_is_said_on_the_page(served, browser):
    browser.get(served)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"), 60, "the page")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(
        browser,
        lambda d: "upload a photo of your object first" in d.find_element(By.TAG_NAME, "body").text,
        60,
        "the error message",
    )
