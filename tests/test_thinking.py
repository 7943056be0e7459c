"""Thinking models: the reasoning comes apart from the answer (VisionChat, edge-serve plain and streamed,
read by the official openai client), a thinking budget cuts a runaway reasoning, and a JSON schema
constrains the answer only.

The tiny model has random weights: it never closes its reasoning by chance, so a test either spends
a budget (the close tag is forced) or biases the close tag's id (read from the GGUF's token list) to
make the model close it itself. Expected splits come from the raw text (reasoning_format "none",
keep_think) cut at the close tag with str.partition, not from the code that separates them.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_models.qwen3vl.chat_format import CHAT_FORMAT, DEFAULT_TEMPLATE, THINKING_TEMPLATE
from edge_runtime import VisionChat
from edge_runtime.chat.chat import Reasoning
from edge_runtime.core.template import ChatTemplate, ThinkFilter, opens_think
from edge_runtime.server.prompting import PromptFormat, render_prompt
from edge_runtime.server.schemas import generation_options, parse_chat_request
from support.server import ServerProcess
from support.thinking import token_id, with_chat_template

OPEN, CLOSE = CHAT_FORMAT.think_open, CHAT_FORMAT.think_close
SDIST = Path.home() / ".cache" / "qwen3-vl-edge" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
QWEN3_TEMPLATE = "vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja"
ANSWER_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                 "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]
BUDGET = 6
SPEC = SyntheticSpec(tied=False, seed=3)


def split_raw(raw: str) -> tuple[str, str]:
    """A raw Thinking answer (its prompt opened the block) -> (reasoning, answer), as a reader cuts it."""
    reasoning, _, answer = raw.partition(CLOSE)
    return reasoning.strip(), answer.strip()


def qwen3_template() -> str:
    """Qwen3-0.6B's real template (a hybrid thinker) from the llama.cpp llama-cpp-python vendors."""
    with tarfile.open(SDIST) as tar:
        return tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(QWEN3_TEMPLATE))).read().decode()


# --- templates -------------------------------------------------------------------------------------------


def test_thinking_template_is_detected_from_its_generation_prompt():
    assert ChatTemplate(THINKING_TEMPLATE).thinking
    assert not ChatTemplate(DEFAULT_TEMPLATE).thinking
    real = ChatTemplate(qwen3_template())  # opens no block itself: the model writes <think> when it reasons
    assert not real.thinking


def test_earlier_reasoning_is_dropped_from_history_as_qwens_own_template_does():
    history = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "weighing it\n" + CLOSE + "\n\nYes."},
               {"role": "user", "content": "b?"}]
    ours = ChatTemplate(THINKING_TEMPLATE).render(history)
    qwen = ChatTemplate(qwen3_template()).render(
        [history[0], {"role": "assistant", "content": OPEN + "\nweighing it\n" + CLOSE + "\n\nYes."}, history[2]])
    for text in (ours, qwen):
        assert "weighing it" not in text and "<|im_start|>assistant\nYes.<|im_end|>" in text
    assert opens_think(ours) and not opens_think(qwen)


def test_enable_thinking_reaches_the_template_through_the_servers_renderer():
    fmt = PromptFormat(ChatTemplate(qwen3_template()), "<__media__>", False, "tiny")
    off = render_prompt(fmt, MESSAGES, None, None, template_kwargs={"enable_thinking": False})
    on = render_prompt(fmt, MESSAGES, None, None)
    assert off.text.endswith(CLOSE + "\n\n") and not on.text.endswith(CLOSE + "\n\n")
    assert not off.starts_inside_think


@pytest.mark.parametrize("raw", [
    "The user asks about the sky.\nIt is blue.\n" + CLOSE + "\n\nYes, it is blue.",
    CLOSE + "\n\nNo reasoning at all.",
    "  unfinished thought " + CLOSE[:3],
])
def test_reasoning_is_kept_apart_for_every_split(raw: str):
    reasoning, answer = split_raw(raw)
    for cut in range(len(raw) + 1):
        f = ThinkFilter(starts_inside=True)
        shown = f.feed(raw[:cut]) + f.feed(raw[cut:]) + f.flush()
        assert (f.take_reasoning(), shown) == (reasoning, answer), cut


@pytest.mark.parametrize("fields,server_default,expected", [
    ({}, -1, None), ({}, 5, 5), ({"thinking_budget_tokens": 3}, 5, 3), ({"reasoning_budget_tokens": -1}, 5, 5),
    ({"reasoning_budget_tokens": 0, "thinking_budget_tokens": 9}, -1, 0),  # llama-server reads this one first
])
def test_request_budget_precedence_as_llama_server(fields, server_default, expected):
    req = parse_chat_request(json.dumps({"messages": MESSAGES, **fields}).encode())
    assert generation_options(req, None, server_default).max_thinking_tokens == expected


def test_reasoning_format_none_keeps_the_reasoning_inline():
    for fmt, inline in (("none", True), ("auto", False), ("deepseek", False), (None, False)):
        req = parse_chat_request(json.dumps({"messages": MESSAGES, "reasoning_format": fmt}).encode())
        assert generation_options(req).keep_think is inline


# --- VisionChat ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_dir(artifacts, tmp_path_factory) -> Path:
    # The spec the tool-call tests use: its random weights write varied tokens (the default's repeat "\n").
    return with_chat_template(artifacts.converted(SPEC, "f16"), tmp_path_factory.getbasetemp() / "thinking-f16",
                              THINKING_TEMPLATE)


@pytest.fixture(scope="module")
def chat(thinking_dir):
    with VisionChat.from_dir(thinking_dir, n_ctx=1024, threads=1, seed=7, image_max_tokens=64) as c:
        yield c


def test_visionchat_separates_reasoning_from_answer(chat):
    assert chat.thinking
    opts = dict(max_tokens=BUDGET + 12, max_thinking_tokens=BUDGET, temperature=0.0)
    raw = chat.generate(MESSAGES, keep_think=True, **opts)
    reasoning, answer = split_raw(raw)
    assert reasoning and answer, raw
    pieces = list(chat.generate_stream(MESSAGES, with_reasoning=True, **opts))
    thoughts = [p for p in pieces if isinstance(p, Reasoning)]
    assert "".join(thoughts) == reasoning == chat.last_stats.reasoning
    assert "".join(p for p in pieces if not isinstance(p, Reasoning)).strip() == answer
    assert pieces.index(thoughts[-1]) < min(i for i, p in enumerate(pieces) if not isinstance(p, Reasoning))
    # the budget, then the forced "\n" and close tag (the "\n\n" after it opens the answer)
    assert chat.last_stats.thinking_tokens == BUDGET + 2
    assert chat.generate(MESSAGES, **opts) == answer  # hidden by default


def test_visionchat_history_keeps_the_answer_only(chat):
    chat.reset()
    answer = chat.ask("Is the sky blue?", max_tokens=BUDGET + 8, max_thinking_tokens=BUDGET, temperature=0.0)
    assert chat.history[-1] == {"role": "assistant", "content": answer}
    assert chat.last_stats.reasoning and chat.last_stats.reasoning not in answer
    chat.reset()


def test_thinking_budget_cuts_a_runaway_reasoning(chat):
    runaway = chat.generate(MESSAGES, max_tokens=24, temperature=0.0, keep_think=True)
    assert CLOSE not in runaway and chat.last_stats.stop_reason == "length"  # never closes by itself
    assert chat.generate(MESSAGES, max_tokens=24, temperature=0.0) == ""  # all of it was reasoning
    cut = chat.generate(MESSAGES, max_tokens=24, temperature=0.0, max_thinking_tokens=BUDGET)
    assert cut and chat.last_stats.thinking_tokens == BUDGET + 2
    assert chat.last_stats.generated_tokens == 24  # the reasoning counts toward max_tokens
    zero = chat.generate(MESSAGES, max_tokens=8, temperature=0.0, max_thinking_tokens=0)
    assert zero and chat.last_stats.reasoning == "" and chat.last_stats.thinking_tokens == 2


def test_json_schema_constrains_the_answer_not_the_reasoning(chat):
    text = chat.generate(MESSAGES, max_tokens=80, temperature=0.0, max_thinking_tokens=BUDGET,
                         json_schema=ANSWER_SCHEMA)
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    reasoning = chat.last_stats.reasoning
    assert reasoning
    with pytest.raises(json.JSONDecodeError):
        json.loads(reasoning)  # free text the grammar would never have let through


def test_bad_budget_is_refused_by_name(chat):
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        chat.generate(MESSAGES, max_thinking_tokens=-2)


# --- edge-serve with the official openai client ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(thinking_dir):
    with ServerProcess(thinking_dir, ["--parallel", "2", "--ctx-size", "2048", "--threads", "1"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def create(client, **kwargs):
    body = {"model": "any", "messages": MESSAGES, "temperature": 0.0, "max_tokens": BUDGET + 12, **kwargs}
    extra = {k: body.pop(k) for k in ("reasoning_format", "thinking_budget_tokens", "reasoning_budget_tokens",
                                      "chat_template_kwargs") if k in body}
    return client.chat.completions.create(**body, extra_body=extra or None)


def test_server_puts_reasoning_in_reasoning_content(client):
    raw = create(client, reasoning_format="none", thinking_budget_tokens=BUDGET).choices[0].message
    assert "reasoning_content" not in (raw.model_extra or {})
    reasoning, answer = split_raw(raw.content)
    assert reasoning and answer
    for fmt in ("auto", "deepseek"):
        resp = create(client, reasoning_format=fmt, thinking_budget_tokens=BUDGET)
        message = resp.choices[0].message
        assert message.model_extra["reasoning_content"] == reasoning
        assert message.content.strip() == answer
        assert resp.usage.completion_tokens_details.reasoning_tokens == BUDGET + 2


def test_server_streams_reasoning_deltas_before_the_answer(client):
    whole = create(client, reasoning_budget_tokens=BUDGET).choices[0].message
    kinds, reasoning, content = [], [], []
    for chunk in create(client, reasoning_budget_tokens=BUDGET, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        extra = (delta.model_extra or {}) if delta is not None else {}
        if extra.get("reasoning_content"):
            reasoning.append(extra["reasoning_content"])
            kinds.append("reasoning")
        if delta is not None and delta.content:
            content.append(delta.content)
            kinds.append("content")
    assert "".join(reasoning) == whole.model_extra["reasoning_content"]
    assert "".join(content) == whole.content
    assert len(reasoning) > 1 and kinds.index("content") > len(reasoning) - 1  # streamed, then the answer


def test_server_budget_cuts_runaway_reasoning(client):
    runaway = create(client, max_tokens=24)
    assert runaway.choices[0].message.content == "" and runaway.choices[0].finish_reason == "length"
    assert runaway.choices[0].message.model_extra["reasoning_content"]
    cut = create(client, max_tokens=24, thinking_budget_tokens=BUDGET)
    assert cut.choices[0].message.content and cut.usage.completion_tokens == 24


def test_server_json_schema_applies_after_the_model_closes_its_reasoning(server, client):
    close = token_id(server.model_dir, CLOSE)
    fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": ANSWER_SCHEMA}}
    resp = create(client, max_tokens=60, response_format=fmt, logit_bias={str(close): 100})
    jsonschema.validate(json.loads(resp.choices[0].message.content), ANSWER_SCHEMA)
    budget = create(client, max_tokens=80, response_format=fmt, thinking_budget_tokens=BUDGET)
    jsonschema.validate(json.loads(budget.choices[0].message.content), ANSWER_SCHEMA)
    assert budget.choices[0].message.model_extra["reasoning_content"]


def test_server_forced_tool_call_comes_after_free_reasoning(client):
    tool = {"type": "function", "function": {"name": "answer", "parameters": ANSWER_SCHEMA}}
    resp = create(client, max_tokens=80, tools=[tool], thinking_budget_tokens=BUDGET,
                  tool_choice={"type": "function", "function": {"name": "answer"}})
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and message.model_extra["reasoning_content"]
    (call,) = message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), ANSWER_SCHEMA)


@pytest.mark.parametrize("field,value", [
    ("reasoning_format", "deepseek-legacy"), ("thinking_budget_tokens", -2),
    ("chat_template_kwargs", {"enable_thinking": "no"}), ("chat_template_kwargs", {"messages": []}),
])
def test_bad_reasoning_fields_are_refused(server, field, value):
    res = httpx.post(server.url("/v1/chat/completions"), json={"messages": MESSAGES, "max_tokens": 2, field: value},
                     timeout=60)
    assert res.status_code == 400 and field in res.text, res.text


# --- the page --------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_page_streams_reasoning_into_a_folded_block(server):
    """The page's answer shows the reasoning folded (<details>), filled while the answer streams;
    its text is what the API returns as reasoning_content for the same request."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from support.browser import ask_on_page, headless_chromium

    tokens = 24
    expected = httpx.post(server.url("/v1/chat/completions"), timeout=120, json={
        "messages": MESSAGES, "max_tokens": tokens, "temperature": 0}).json()["choices"][0]["message"]
    driver = headless_chromium()
    try:
        driver.get(server.url("/"))
        WebDriverWait(driver, 120).until(lambda d: "model:" in d.find_element(By.ID, "model").text)
        driver.execute_script("""
            window.reasoningLengths = [];
            new MutationObserver(() => {
              const nodes = document.querySelectorAll('.message.assistant .reasoning-text');
              if (nodes.length && document.getElementById('ask').disabled) {  // while the answer streams
                window.reasoningLengths.push(nodes[nodes.length - 1].textContent.length);
              }
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        """)
        ask_on_page(driver, MESSAGES[0]["content"], max_tokens=tokens, temperature=0.0)
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "ask").is_enabled()
            and d.find_elements(By.CSS_SELECTOR, ".message.assistant .figures"))
        block = driver.find_element(By.CSS_SELECTOR, ".message.assistant details.reasoning")
        assert block.get_attribute("open") is None  # folded
        body = block.find_element(By.CSS_SELECTOR, ".reasoning-text")
        assert body.get_attribute("textContent") == expected["reasoning_content"]
        answer = driver.find_element(By.CSS_SELECTOR, ".message.assistant .text").get_attribute("textContent")
        assert answer == expected["content"]
        lengths = driver.execute_script("return window.reasoningLengths")
        assert any(lengths), lengths  # shown while the answer was still streaming, not only at its end
        block.find_element(By.TAG_NAME, "summary").click()
        assert block.get_attribute("open") is not None and body.is_displayed()
    finally:
        driver.quit()


def test_edge_chat_reasoning_budget(chat, thinking_dir):
    """edge-chat --reasoning-budget N prints the answer VisionChat gives with max_thinking_tokens=N."""
    from click.testing import CliRunner

    from edge_runtime.cli.cli import main

    expected = chat.generate(MESSAGES, max_tokens=BUDGET + 10, max_thinking_tokens=BUDGET, temperature=0.0)
    args = [str(thinking_dir), MESSAGES[0]["content"], "--reasoning-budget", str(BUDGET), "--max-tokens",
            str(BUDGET + 10), "--temperature", "0", "--threads", "1", "--ctx-size", "1024"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert expected and result.stdout.strip() == expected.strip()
    refused = CliRunner().invoke(main, [str(thinking_dir), "q", "--reasoning-budget", "-2"])
    assert refused.exit_code == 2 and "--reasoning-budget" in refused.output
