"""The chat page in a real browser (the system's headless Chromium via Selenium) against a real
edge-serve on the tiny model: it loads, attaches an image, streams an answer, stops one, draws the
boxes of a grounding answer (forced by the page's JSON schema), shows a server error, keeps several
conversations. Expected values come from the HTTP API and from the answer's own JSON."""
from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from edge_models.qwen3vl.synthetic import SyntheticSpec
from support.browser import ask_on_page as ask
from support.browser import headless_chromium
from support.server import ServerProcess

pytestmark = pytest.mark.browser

SPEC = SyntheticSpec(tied=False, seed=3)
API_KEY, ADMIN_KEY = "page-key-1", "page-admin-2"
WAIT_S = 120


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    model_dir = artifacts.converted(SPEC, "f16")
    args = ["--parallel", "2", "--ctx-size", "4096", "--threads", "1",
            "--conversation-dir", str(tmp_path_factory.mktemp("saved"))]
    with ServerProcess(model_dir, args, env={"EDGE_API_KEY": API_KEY, "EDGE_ADMIN_KEY": ADMIN_KEY}) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, test_image):
    path = tmp_path_factory.mktemp("page") / "photo.png"
    test_image.save(path)
    return path


@pytest.fixture()
def page(server, browser):
    return open_page(server, browser, API_KEY)


def open_page(server, browser, api_key):
    """The page, freshly loaded, with a key typed in and the model listed."""
    browser.get(server.url("/"))
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(api_key)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    WebDriverWait(browser, WAIT_S).until(EC.text_to_be_present_in_element((By.ID, "model"), "model:"))
    return browser


def wait(browser, condition, timeout=WAIT_S):
    # the page re-renders its message list, so an element found a moment ago may be gone
    return WebDriverWait(browser, timeout, poll_frequency=0.02,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def answers(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")


def wait_done(browser):
    wait(browser, lambda d: d.find_element(By.ID, "ask").is_enabled() and answers(d)
         and answers(d)[-1].find_elements(By.CSS_SELECTOR, ".figures, .error, p"))


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_page_is_served_and_names_the_model_only_with_the_key(server, browser):
    browser.get(server.url("/"))
    assert browser.title == "qwen3-vl-edge"
    # no key yet: the page shows the server's 401, it does not swallow it
    wait(browser, EC.visibility_of_element_located((By.ID, "error")))
    assert "API key" in browser.find_element(By.ID, "error").text
    resp = httpx.get(server.url("/"))
    assert resp.status_code == 200 and "default-src 'self'" in resp.headers["content-security-policy"]
    assert httpx.get(server.url("/static/app.js")).status_code == 200
    models = httpx.get(server.url("/v1/models"), headers={"Authorization": f"Bearer {API_KEY}"}).json()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait(browser, EC.text_to_be_present_in_element((By.ID, "model"), models["data"][0]["id"]))
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_a_question_about_an_image_streams_its_answer_and_figures(page, server, image_file):
    # record every length the answer's text takes on screen (the tiny model is too fast to poll)
    page.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const t = document.querySelectorAll('.message.assistant .text');
          if (t.length) window.seen.push(t[t.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    ask(page, "What is in this picture?", image=image_file, max_tokens=48)
    wait_done(page)
    answer = answers(page)[-1]
    lengths = set(page.execute_script("return window.seen"))
    assert len(answer.find_element(By.CSS_SELECTOR, ".text").text) > 0
    assert len({n for n in lengths if n > 0}) >= 2, f"the text arrived in one piece: {lengths}"
    # the same request through the API says how many image tokens the picture takes
    usage = httpx.post(server.url("/v1/chat/completions"), headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=WAIT_S, json={"max_tokens": 1, "messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": data_uri(image_file)}},
                           {"type": "text", "text": "What is in this picture?"}]}]}).json()["usage"]
    figures = answer.find_element(By.CSS_SELECTOR, ".figures").text
    assert f"image tokens {usage['prompt_tokens_details']['image_tokens']}" in figures
    assert f"/{usage['prompt_tokens']} prompt tokens" in figures
    assert "TTFT" in figures and "tok/s" in figures
    user = page.find_elements(By.CSS_SELECTOR, ".message.user")[-1]
    assert user.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute("src").startswith("data:image/png")

    # a follow-up reuses the conversation in the server's KV cache
    ask(page, "And the colours?", max_tokens=4)
    wait_done(page)
    follow = answers(page)[-1].find_element(By.CSS_SELECTOR, ".figures").text
    cached, prompt = follow.split("cached ")[1].split(" prompt")[0].split("/")
    assert int(cached) >= usage["prompt_tokens"]


# The tiny model streams ~1000 tokens/s, faster than WebDriver can react, so the page itself
# presses Stop the moment the first words show (a MutationObserver); llama-server's
# `ignore_eos` extension, added to the page's own request, keeps the answer going until then.
_STOP_ON_FIRST_WORDS = """
const send = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body && String(url).endsWith("/v1/chat/completions")) {
    opts = Object.assign({}, opts, {body: JSON.stringify(Object.assign(JSON.parse(opts.body), {ignore_eos: true}))});
  }
  return send(url, opts);
};
const watch = new MutationObserver(() => {
  const texts = document.querySelectorAll(".message.assistant .text");
  if (texts.length && texts[texts.length - 1].textContent.length > 0) {
    watch.disconnect();
    document.getElementById("stop").click();
  }
});
watch.observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def test_stop_ends_the_stream_and_frees_the_slot(page, server):
    page.execute_script(_STOP_ON_FIRST_WORDS)
    ask(page, "Tell me a very long story.", max_tokens=1500)
    wait(page, lambda d: "stopped" in answers(d)[-1].text and d.find_element(By.ID, "ask").is_enabled())
    text = answers(page)[-1].find_element(By.CSS_SELECTOR, ".text").text
    assert text
    time.sleep(1.0)
    assert answers(page)[-1].find_element(By.CSS_SELECTOR, ".text").text == text  # nothing more arrives
    wait(page, lambda d: httpx.get(server.url("/health")).json()["slots_busy"] == 0, timeout=30)


def test_grounding_answer_draws_its_boxes(page, image_file):
    ask(page, "cat, dog", image=image_file, mode="locate", max_tokens=200)
    wait_done(page)
    answer = answers(page)[-1]
    text = answer.find_element(By.CSS_SELECTOR, ".text").text
    # The reference is the answer itself, read with json: the page's schema makes it a list of
    # {"bbox_2d": [x1, y1, x2, y2], "label": ...} in Qwen3-VL's 0..1000 frame, and a box is drawn
    # at percent = coordinate / 10 from its smaller corner (the model may give the corners in any order).
    expected = json.loads(text)
    assert expected, f"the schema should force boxes, got {text!r}"
    boxes = answer.find_elements(By.CSS_SELECTOR, "figure.grounding .box")
    assert len(boxes) == len(expected)
    for el, item in zip(boxes, expected):
        (x1, x2), (y1, y2) = sorted(item["bbox_2d"][0::2]), sorted(item["bbox_2d"][1::2])
        assert el.get_attribute("data-label") == item["label"] and item["label"] in ("cat", "dog")
        style = {k.strip(): v.strip() for k, v in (p.split(":") for p in el.get_attribute("style").split(";") if ":" in p)}
        assert float(style["left"].rstrip("%")) == pytest.approx(x1 / 10)
        assert float(style["top"].rstrip("%")) == pytest.approx(y1 / 10)
        assert float(style["width"].rstrip("%")) == pytest.approx((x2 - x1) / 10)
        assert float(style["height"].rstrip("%")) == pytest.approx((y2 - y1) / 10)
    assert answer.find_element(By.CSS_SELECTOR, "figure.grounding img").get_attribute("src").startswith("data:image/")


def test_a_bad_image_shows_the_servers_error(page, server, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG at all")
    ask(page, "What is this?", image=bad)
    wait(page, EC.visibility_of_element_located((By.ID, "error")))
    shown = page.find_element(By.ID, "error").text
    direct = httpx.post(server.url("/v1/chat/completions"), headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                + base64.b64encode(bad.read_bytes()).decode()}},
                            {"type": "text", "text": "What is this?"}]}]})
    assert direct.status_code == 400
    assert shown == direct.json()["error"]["message"]


def test_several_conversations_are_kept_apart(page):
    ask(page, "first conversation", max_tokens=2)
    wait_done(page)
    page.find_element(By.ID, "new-chat").click()
    assert answers(page) == []
    ask(page, "second conversation", max_tokens=2)
    wait_done(page)
    items = page.find_elements(By.CSS_SELECTOR, "#conversations button")
    assert [b.text for b in items] == ["second conversation", "first conversation"]
    items[1].click()
    users = [m.text for m in page.find_elements(By.CSS_SELECTOR, ".message.user")]
    assert users == ["first conversation"]


def test_saving_on_the_server_needs_the_admin_key_and_restores_the_conversation(server, browser, image_file):
    page = open_page(server, browser, API_KEY)
    ask(page, "Remember this picture.", image=image_file, max_tokens=4)
    wait_done(page)
    page.find_element(By.ID, "save-server").click()
    wait(page, EC.text_to_be_present_in_element((By.ID, "error"), "admin key"))

    page = open_page(server, browser, ADMIN_KEY)  # the admin key works for the API too
    ask(page, "Remember this picture.", image=image_file, max_tokens=4)
    wait_done(page)
    said = answers(page)[-1].find_element(By.CSS_SELECTOR, ".text").text
    page.find_element(By.ID, "save-server").click()
    wait(page, EC.text_to_be_present_in_element((By.ID, "saved-list"), "tokens"))
    page.find_element(By.ID, "new-chat").click()
    page.find_element(By.ID, "list-server").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#saved-list li button"))
    page.find_elements(By.CSS_SELECTOR, "#saved-list li button")[0].click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.user img.thumb"))
    assert [m.text for m in page.find_elements(By.CSS_SELECTOR, ".message.user")] == ["Remember this picture."]
    assert answers(page)[-1].find_element(By.CSS_SELECTOR, ".text").text == said
    # the follow-up finds the restored conversation in a slot
    ask(page, "What was it?", max_tokens=2)
    wait_done(page)
    figures = answers(page)[-1].find_element(By.CSS_SELECTOR, ".figures").text
    cached, prompt = figures.split("cached ")[1].split(" prompt")[0].split("/")
    assert int(cached) > int(prompt) // 2
