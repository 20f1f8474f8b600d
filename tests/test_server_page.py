"""The web page at `/` in real headless Chromium (Debian's `chromium` and `chromedriver`, driven by Selenium), over
the default model: a problem with 2 workers fills two columns while the run goes, then shows the answer; Stop
cancels the run and the server frees its KV blocks; a page of another origin cannot make the browser call it.

`make test` installs chromium; without it this test fails (it is never skipped) and says how to install it.
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
import torch
from serving import live_server

from hogwild.engine import Engine, EngineConfig

torch.set_num_threads(1)
CHROMIUM = "/usr/bin/chromium"


def chromedriver() -> str:
    path = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if not shutil.which(CHROMIUM) or not shutil.which(path):
        pytest.fail(
            "the page test needs Debian's chromium and chromium-driver: run `make test` (it installs them) or "
            "`apt-get install -y chromium chromium-driver`"
        )
    return path


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager would try to download one
    driver = webdriver.Chrome(service=Service(chromedriver()), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live():
    with live_server(Engine.load(EngineConfig(threads=1, kv_memory="1GiB"))) as server:
        yield server


def wait(condition, timeout: float = 90.0, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ask(browser, workers: int, budget: int, seed: int) -> None:
    from selenium.webdriver.common.by import By

    wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#layout option"), what="the page to load the model card")
    for field, value in (("workers", workers), ("budget", budget), ("temperature", 1), ("seed", seed)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "solve").click()


def columns(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".worker .text")]


def solve_through_api(live, problem: str, seed: int) -> dict:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": problem}],
        "workers": 2,
        "budget": 120,
        "temperature": 1,
        "seed": seed,
        "layout": "combined",
        "mode": "hogwild",
    }
    return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]


def test_two_workers_write_side_by_side_then_the_answer(browser, live):
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/")
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#layout option"), what="the page to load the model card")
    problem = browser.find_element(By.ID, "problem").get_attribute("value")

    # the first seed whose run moves a finished step into the shared history; a seeded run is the same through the
    # API and the page
    def complete(message: dict) -> bool:
        return bool(message["hogwild"]["history"])

    found = next(((seed, m) for seed in range(16) if complete(m := solve_through_api(live, problem, seed))), None)
    assert found, "no seed in 0..15 gave a run that finishes a step"
    seed, message = found
    ask(browser, workers=2, budget=120, seed=seed)
    answer = browser.find_element(By.ID, "answer")
    # mid-run: two columns, both written in, no answer yet
    early = wait(lambda: (cols := columns(browser)) and all(len(c) > 20 for c in cols) and cols, what="text")
    assert len(early) == 2 and not answer.get_attribute("data-done")
    wait(lambda: answer.get_attribute("data-done"), what="the answer")
    late = columns(browser)
    assert all(len(b) > len(a) and b.startswith(a) for a, b in zip(early, late, strict=True)), "columns did not fill"
    # the default cross-check: each worker writes a solution of its own, with no step headers
    assert not late[0].startswith("**Alice") and late[0] != late[1]
    shown = browser.find_elements(By.CSS_SELECTOR, "#history li")
    assert len(shown) == len(message["hogwild"]["history"]), "the page's shared history differs from the API's"
    assert "finished by" in browser.find_element(By.ID, "status").text
    # the page shows the API's answer for the same seeded request (the content leads with it), or says there is
    # none, and each worker's whole transcript
    given = message["hogwild"]["answer"]
    assert answer.text == ("(no answer)" if given is None else given) and message["content"].startswith(given or "")
    assert late == [worker["text"] for worker in message["hogwild"]["workers"]]
    live.wait_idle()


def test_stop_cancels_the_run(browser, live):
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/")
    ask(browser, workers=3, budget=2000, seed=0)  # long enough to stop mid-way; its KV reservation fits 1 GiB
    wait(lambda: (cols := columns(browser)) and all(len(c) > 20 for c in cols), what="text")
    assert live.metric("hogwild_kv_bytes_in_use") > 0
    browser.find_element(By.ID, "stop").click()
    wait(lambda: browser.find_element(By.ID, "status").text == "stopped", timeout=10, what="the page to stop")
    live.wait_idle()  # the server saw the request go and cancelled the run
    assert live.server.backend.engine.stats.steps < 4000


def test_a_page_of_another_origin_cannot_call_the_server(browser, live):
    """The browser on another origin (http://localhost:PORT is not http://127.0.0.1:PORT) sends what any web page
    can send without a CORS preflight, a text/plain POST: the server refuses it and runs nothing."""
    port = live.url.rsplit(":", 1)[1]
    browser.get(f"http://localhost:{port}/")
    refused = live.metric("hogwild_requests_total", endpoint="/v1/chat/completions", status="403")
    passes = live.metric("hogwild_forward_passes_total")
    send = """
        const done = arguments[arguments.length - 1];
        const simple = {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: arguments[1]};
        fetch(arguments[0], simple).then(() => done("sent"), (error) => done("not sent: " + error));
    """
    body = json.dumps({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    assert browser.execute_async_script(send, live.url + "/v1/chat/completions", body) == "sent"
    wait(lambda: live.metric("hogwild_requests_total", endpoint="/v1/chat/completions", status="403") > refused,
         timeout=10, what="the refusal")  # fmt: skip
    assert live.metric("hogwild_forward_passes_total") == passes
