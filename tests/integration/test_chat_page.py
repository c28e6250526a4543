"""The chat page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by selenium loads ``/``, sends messages, sees the answer stream in, stops a long answer, and
logs no console errors. Skips where the browser or its driver is not installed (.ci/run installs
them with apt)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from leantune.inference import load_for_inference  # noqa: E402
from leantune.serve.app import create_app  # noqa: E402
from leantune.serve.engine import Engine  # noqa: E402
from tests.serve_common import running_server, tiny_model_dir  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver); "
    f"found chromium={CHROMIUM}, chromedriver={DRIVER}",
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    loaded = load_for_inference(tiny_model_dir(tmp_path_factory.mktemp("page")), device=torch.device("cpu"))
    return Engine(loaded.model, loaded.tokenizer, "tiny-page", info={"step": 5})


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def greedy(driver) -> None:
    """Temperature 0: the random model's answers are fixed (no eos sampled early by chance)."""
    field = driver.find_element(By.ID, "temperature")
    field.clear()
    field.send_keys("0")


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_chat_page_streams_an_answer(engine, browser, tmp_path):
    with running_server(create_app(engine)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "tiny-page · step 5"))
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")
        greedy(browser)
        send(browser, "sort 8213")
        wait.until(
            lambda d: d.find_element(By.ID, "send").is_enabled() and d.find_elements(By.CSS_SELECTOR, ".meta")
        )
        answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert len(answers) == 1 and answers[0].text.strip(), "no streamed text in the assistant bubble"
        assert "error" not in answers[0].get_attribute("class")
        meta = browser.find_element(By.CSS_SELECTOR, ".meta").text
        assert "finish: length" in meta and "12 new tokens" in meta
        send(browser, "again")  # a second turn sends the whole conversation
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".meta")) == 2)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
        browser.save_screenshot(str(tmp_path / "chat.png"))
        assert severe(browser) == []


def test_stop_button_and_api_key(engine, browser, monkeypatch, tmp_path):
    shot_dir = tmp_path
    real_pick = engine._pick

    def slow_pick(*a):  # slow enough that the stop button comes before the answer's end
        time.sleep(0.02)
        return real_pick(*a)

    monkeypatch.setattr(engine, "_pick", slow_pick)
    with running_server(create_app(engine, api_key="pw")) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(EC.visibility_of_element_located((By.ID, "apikey")))  # asked for after a 401
        key = browser.find_element(By.ID, "apikey")
        key.send_keys("pw")
        browser.find_element(By.ID, "input").click()  # blur: the key field's change event
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "tiny-page"))
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("200")
        greedy(browser)
        send(browser, "tell me everything")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant").text.strip() not in ("", "…"))
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".meta"))
        assert "finish: stopped" in browser.find_element(By.CSS_SELECTOR, ".meta").text
        assert browser.find_element(By.ID, "send").is_enabled()
        # the server is free again at once: the stopped stream's generation was cancelled
        monkeypatch.setattr(engine, "_pick", real_pick)
        send(browser, "x" * 300)  # over the context of 256: the server's message shows in the bubble
        wait.until(
            lambda d: "error" in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("class")
        )
        assert "context" in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("20")
        send(browser, "short")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".meta")) == 2)
        browser.save_screenshot(str(shot_dir / "chat-stopped.png"))
        # the one expected error: the network log of the first, key-less request
        errors = severe(browser)
        # and the 400 of the over-long message
        assert all("401" in e["message"] or "400" in e["message"] for e in errors) and len(errors) <= 2, (
            errors
        )
