"""The chat page and the live cluster page in a real browser (headless Chromium) against a real 2-stage cluster of
the demo model: streamed replies equal the API's, stop frees the sequence in every stage, errors show as messages,
model text never runs as HTML, the cluster page follows a replica that dies and comes back, API keys."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request

import pytest
import yaml

from chatloop.demo import demo_model_dir
from chatloop.http_util import free_port
from tests.browser import screenshot, start_chromium, wait_for
from tests.cluster_harness import Cluster, chatloop_cmd, http_json, wait_ready, wait_until

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
SETTINGS_T0 = {"temperature": 0, "top_p": 1, "max_tokens": 40}


@pytest.fixture(scope="module")
def cluster(module_procs, tmp_path_factory):
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("web")).start()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium") / "profile")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def _open_chat(browser, url: str, settings: dict | None = None, conversations: list | None = None, key: str = ""):
    """Load the chat page with a fresh localStorage holding ``settings`` (and conversations, an API key)."""
    browser.get(f"{url}/")
    browser.execute_script(
        "localStorage.clear();"
        "localStorage.setItem('chatloop.settings', arguments[0]);"
        "if (arguments[1]) localStorage.setItem('chatloop.conversations', arguments[1]);"
        "if (arguments[2]) localStorage.setItem('chatloop.apiKey', arguments[2]);",
        json.dumps(settings or SETTINGS_T0),
        json.dumps(conversations) if conversations else "",
        key,
    )
    browser.get(f"{url}/")
    wait_for(lambda: browser.execute_script("return !!(window.ChatLoop && ChatLoop.chat)"), 20, "chat page script")


def _send(browser, text: str) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.common.keys import Keys  # noqa: PLC0415

    box = browser.find_element(By.ID, "input")
    browser.execute_script("arguments[0].value = arguments[1];", box, text)
    box.send_keys(Keys.ENTER)


def _state(browser) -> dict:
    return browser.execute_script(
        "const s = ChatLoop.chat.state();"
        "return {running: s.running, messages: s.current.messages.map(m => ({role: m.role, content: m.content,"
        " stats: m.stats || null}))};"
    )


def _finished(browser) -> dict:
    return wait_for(
        lambda: (lambda s: s if not s["running"] and s["messages"] else None)(_state(browser)),
        120,
        "the reply to finish",
    )


def _text_of(browser, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def _api_reply(url: str, messages: list[dict], **sampling) -> str:
    status, body = http_json(f"{url}/v1/chat/completions", {"messages": messages, **sampling}, timeout=120)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def _plain(text: str) -> str:
    """Text without Markdown markers and with whitespace collapsed, to compare rendered and raw replies."""
    return " ".join(re.sub(r"[*_`#>~]", "", text).split())


# -- plain HTTP ---------------------------------------------------------------------------------------------


def test_pages_and_assets_carry_security_headers(cluster):
    for path, ctype in [
        ("/", "text/html"),
        ("/cluster", "text/html"),
        ("/static/chat.js", "text/javascript"),
        ("/static/markdown.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ]:
        with urllib.request.urlopen(f"{cluster.url}{path}", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith(ctype), path
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["X-Frame-Options"] == "DENY"
    for path in ("/static/", "/static/../app.py", "/static/web.py", "/index.html"):
        assert http_json(f"{cluster.url}{path}")[0] == 404, path
    status, view = http_json(f"{cluster.url}/v1/cluster/live")
    assert status == 200
    assert [len(s["replicas"]) for s in view["stages"]] == [1, 1]
    assert view["stages"][0]["layers"][0] == 0 and view["stages"][1]["layers"][1] == view["n_layer"] == 30


# -- the chat page --------------------------------------------------------------------------------------------


def test_chat_streams_the_api_reply(cluster, browser, shots):
    _open_chat(browser, cluster.url)
    wait_for(lambda: _text_of(browser, "#model-name")[0], 30, "the model name")
    _send(browser, QUESTION)
    # While it streams, the stop button is shown instead of send.
    state = _finished(browser)
    reply = state["messages"][-1]
    assert reply["role"] == "assistant"
    expected = _api_reply(cluster.url, [{"role": "user", "content": QUESTION}], **SETTINGS_T0)
    assert reply["content"] == expected
    shown = _text_of(browser, "article.msg.assistant .body")[-1]
    assert _plain(shown) == _plain(expected)
    stats = _text_of(browser, "article.msg.assistant .stats")[-1]
    assert "tokens/s" in stats and "first token" in stats, stats
    # A second turn carries the first in its history, exactly as the API sees it.
    _send(browser, "And of Germany?")
    state = _finished(browser)
    history = [{"role": m["role"], "content": m["content"]} for m in state["messages"][:-1]]
    assert state["messages"][-1]["content"] == _api_reply(cluster.url, history, **SETTINGS_T0)
    # Regenerate at temperature 0 gives the same reply again; new conversation starts empty and is listed.
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    browser.find_elements(By.CSS_SELECTOR, "article.msg.assistant .regen")[-1].click()
    wait_for(lambda: _state(browser)["running"] is False and _state(browser)["messages"][-1]["stats"], 120, "regen")
    assert _state(browser)["messages"][-1]["content"] == state["messages"][-1]["content"]
    browser.find_element(By.ID, "new-chat").click()
    assert _state(browser)["messages"] == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2
    # A reply with a code block, for the screenshot.
    browser.execute_script("localStorage.setItem('chatloop.settings', JSON.stringify(arguments[0]))", SETTINGS_T0)
    _send(browser, "Write a Python function that returns the sum of two numbers.")
    _finished(browser)
    screenshot(browser, "chat", shots)
    # Conversations survive a reload (localStorage).
    browser.refresh()
    wait_for(lambda: browser.execute_script("return !!(window.ChatLoop && ChatLoop.chat)"), 20, "reload")
    assert any(QUESTION in t for t in _text_of(browser, "#conversations li"))


def test_stop_cancels_the_request_in_every_stage(cluster, browser):
    _open_chat(browser, cluster.url, {"temperature": 0, "top_p": 1, "max_tokens": 500})
    _send(browser, "Count from 1 to 500, separated by commas.")
    wait_for(lambda: len(_state(browser)["messages"][-1]["content"]) > 10, 120, "some streamed text")
    assert _state(browser)["running"], "the reply ended before it could be stopped"
    assert sum(cluster.live_sequences()) >= 1
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    browser.find_element(By.ID, "stop").click()
    state = _finished(browser)
    assert state["messages"][-1]["stats"]["finish"] == "stopped"
    wait_until(lambda: cluster.live_sequences() == [0, 0], timeout=30, what="the sequence freed in every stage")
    assert browser.find_element(By.ID, "send").is_displayed()


def test_model_text_is_never_run_as_html(cluster, browser):
    hostile = (
        '<img src=x onerror="window.xss=1"><script>window.xss=2</script>\n\n'
        "**bold** and [a link](javascript:window.xss=3) and <b>not bold</b>\n\n"
        "```html\n<script>window.xss=4</script>\n```"
    )
    conv = {
        "id": "x1",
        "title": "hostile",
        "system": "",
        "updated": 1,
        "messages": [{"role": "user", "content": "<i>hi</i>"}, {"role": "assistant", "content": hostile}],
    }
    _open_chat(browser, cluster.url, conversations=[conv])
    browser.execute_script("localStorage.setItem('chatloop.current', 'x1')")
    browser.refresh()
    wait_for(lambda: browser.execute_script("return !!(window.ChatLoop && ChatLoop.chat)"), 20, "reload")
    wait_for(lambda: _text_of(browser, "article.msg.assistant .body"), 10, "the stored reply")
    body = _text_of(browser, "article.msg.assistant .body")[0]
    assert '<img src=x onerror="window.xss=1">' in body and "<b>not bold</b>" in body
    counts = browser.execute_script(
        "const m = document.getElementById('messages');"
        "return {img: m.querySelectorAll('img').length, script: m.querySelectorAll('script').length,"
        " b: m.querySelectorAll('b, i').length, strong: m.querySelectorAll('strong').length,"
        " links: [...m.querySelectorAll('a')].map(a => a.href), pre: m.querySelectorAll('pre code').length,"
        " pwned: window.xss === undefined ? null : window.xss};"
    )
    assert counts == {"img": 0, "script": 0, "b": 0, "strong": 1, "links": [], "pre": 1, "pwned": None}
    # The same through a live reply: whatever the model writes back stays text.
    _send(browser, 'Repeat exactly: <img src=x onerror="window.xss=5"> <script>window.xss=6</script>')
    _finished(browser)
    assert browser.execute_script(
        "const m = document.getElementById('messages');"
        "return m.querySelectorAll('img, script').length === 0 && window.xss === undefined;"
    )


def test_errors_show_as_messages(cluster, browser):
    _open_chat(browser, cluster.url)
    _send(browser, "word " * 12000)  # longer than the context
    state = _finished(browser)
    assert state["messages"][-1]["role"] == "error"
    shown = _text_of(browser, "article.msg.error .body")[-1]
    assert shown.startswith("400") and "context" in shown, shown
    assert browser.execute_script("return document.querySelectorAll('.typing').length") == 0
    assert _text_of(browser, ".retry-row button") == ["Try again"]


def test_cluster_page_follows_a_replica_that_dies_and_returns(cluster, browser, shots, record_property):
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    browser.get(f"{cluster.url}/cluster")

    def states() -> dict:
        # One script call: the page replaces its cards on every poll, so element handles go stale at once.
        return browser.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('.replica')]"
            ".map(c => [c.dataset.name, c.dataset.state]));"
        )

    def card(name: str) -> dict:
        return browser.execute_script(
            'const c = document.querySelector(`.replica[data-name="${arguments[0]}"]`);'
            "return {cls: c.className, text: c.innerText};",
            name,
        )

    wait_for(lambda: len(states()) == 2 and set(states().values()) == {"healthy"}, 30, "both replicas healthy")
    # Traffic for the figures and the screenshot: one streamed request running while the page updates.
    stream = threading.Thread(target=_stream_some, args=(cluster.url, 200), daemon=True)
    stream.start()
    wait_for(lambda: _itl_samples(browser) >= 40, 120, "inter-token latencies on the page")
    wait_for(lambda: "%" in browser.find_element(By.ID, "pipeline").text, 30, "a busy share")
    # The picture is best taken while a request runs (between two of the streamed requests nothing does).
    running = "return document.querySelector('.coordinator-box') ?.innerText.includes('1 running')"
    try:
        wait_for(lambda: browser.execute_script(running), 20, "a running request on the page", 0.05)
    except TimeoutError:
        pass
    screenshot(browser, "cluster", shots)
    stream.join(timeout=120)
    figures = browser.find_element(By.ID, "figures").text
    assert "Tokens/s" in figures and "Time to first token" in figures and "Inter-token latency" in figures
    browser.execute_script("window.samePage = true")
    victim_url = cluster.stage_urls[1][0]
    victim = next(n for n in states() if n.startswith("stage-1@"))
    os.killpg(cluster.stage_procs[victim_url].pid, signal.SIGKILL)
    killed = time.monotonic()
    cluster.procs.stop(cluster.stage_procs[victim_url])
    wait_for(lambda: states()[victim] in ("failing", "unhealthy"), 30, "the dead replica shown as failing", 0.02)
    # Recorded, not asserted (a loaded machine must not fail the test): the issue asks for two health intervals.
    record_property("seconds_to_red", round(time.monotonic() - killed, 2))
    wait_for(lambda: states()[victim] == "unhealthy", 30, "the dead replica shown as unhealthy")
    shown = card(victim)
    assert "bad" in shown["cls"].split() and "last error" in shown["text"], shown
    screenshot(browser, "cluster-replica-down", shots)
    assert browser.execute_script("return window.samePage === true"), "the page reloaded"
    # The chat shows the 503 as a message while the stage is down.
    _open_chat(browser, cluster.url)
    _send(browser, QUESTION)
    state = _finished(browser)
    assert state["messages"][-1]["role"] == "error" and state["messages"][-1]["content"].startswith("503")
    browser.get(f"{cluster.url}/cluster")
    restarted = time.monotonic()
    cluster.start_stage(victim_url)
    wait_for(lambda: states().get(victim) == "healthy", 60, "the replica healthy again", 0.02)
    record_property("seconds_to_green_after_restart", round(time.monotonic() - restarted, 2))


def _itl_samples(browser) -> int:
    text = browser.execute_script("return document.getElementById('figures').innerText")
    m = re.search(r"Inter-token latency \(last minute, (\d+) sample", text)
    return int(m.group(1)) if m else 0


def _stream_some(url: str, tokens: int) -> None:
    """Keep one streamed request running until about ``tokens`` chunks came back (a story may end early)."""
    body = {"messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}], "stream": True}
    seen = 0
    for _ in range(5):
        req = urllib.request.Request(
            f"{url}/v1/chat/completions",
            json.dumps({**body, "max_tokens": tokens}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            seen += sum(1 for line in resp if line.startswith(b"data: {"))
        if seen >= tokens:
            return


# -- API keys -----------------------------------------------------------------------------------------------


def test_the_page_asks_for_a_key_and_shows_a_wrong_one(cluster, browser, module_procs, tmp_path):
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    port = free_port()
    cfg = {
        "stages": cluster.stage_urls,
        "model_dir": str(cluster.model_dir),
        "port": port,
        "security": {"api_keys": ["right-key"]},
    }
    path = tmp_path / "keyed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{port}"
    proc = module_procs.start(chatloop_cmd("coordinator", "--config", str(path)), name="keyed-coordinator")
    try:
        wait_ready(url, proc)
        assert http_json(f"{url}/v1/cluster/live")[0] == 401  # the data needs the key, the page does not
        _open_chat(browser, url, key="wrong-key")
        # api.js makes the dialog when it first asks for a key
        wait_for(lambda: any(d.get_attribute("open") is not None for d in browser.find_elements(By.ID, "key-dialog")))
        assert "invalid API key" in browser.find_element(By.ID, "key-reason").text
        browser.find_element(By.CSS_SELECTOR, "#key-dialog button[value=cancel]").click()
        _send(browser, QUESTION)
        state = _finished(browser)
        assert state["messages"][-1]["role"] == "error"
        assert "401: missing or invalid API key" in _text_of(browser, "article.msg.error .body")[-1]
        browser.find_element(By.CSS_SELECTOR, "#key-dialog button[value=cancel]").click()
        browser.find_element(By.ID, "settings-toggle").click()
        browser.find_element(By.ID, "key-change").click()
        key_input = browser.find_element(By.ID, "key-input")
        key_input.clear()
        key_input.send_keys("right-key")
        browser.find_element(By.CSS_SELECTOR, "#key-dialog button[value=save]").click()
        browser.find_element(By.CSS_SELECTOR, ".retry-row button").click()
        state = _finished(browser)
        assert state["messages"][-1]["role"] == "assistant" and state["messages"][-1]["content"]
    finally:
        module_procs.stop(proc)
