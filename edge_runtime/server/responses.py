"""OpenAI response bodies: completions, stream chunks, model lists, SSE framing."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from edge_runtime.core.logprobs import TokenLogprob
from edge_runtime.core.stats import GenerationStats, usage_body
from edge_runtime.chat.tool_calls import ToolCall

OWNER = "qwen3-vl-edge"


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one completion repeats."""

    model: str
    system_fingerprint: str | None = None  # fingerprint.system_fingerprint, computed once at load
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, obj: str) -> dict[str, Any]:
        """The fields every body and chunk of this completion starts with."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A call as OpenAI streams it: id, type and name first, then the arguments."""
    return [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def finish_with_calls(finish_reason: str, calls: int) -> str:
    """OpenAI's reason: "tool_calls" when the model ended its turn with calls; a length limit stays
    "length" (a call it cut is reported with the arguments so far)."""
    return "tool_calls" if calls and finish_reason != "length" else finish_reason


def logprobs_body(entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's `choices[].logprobs`: per token its text (undecodable bytes replaced), logprob, bytes and
    top_logprobs; None when the request did not ask."""
    if entries is None:
        return None

    def one(token: bytes, logprob: float) -> dict[str, Any]:
        return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(token)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice of a completion."""

    text: str
    finish_reason: str
    calls: Sequence[ToolCall] = ()
    logprobs: Sequence[TokenLogprob] | None = None  # None: not asked
    reasoning: str = ""  # a Thinking model's reasoning, apart from the answer


def choice_body(index: int, choice: ChoiceResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    finish_reason = choice.finish_reason
    if choice.calls:
        message = {"role": "assistant", "content": choice.text or None,
                   "tool_calls": [tool_call_body(c) for c in choice.calls]}
        finish_reason = finish_with_calls(finish_reason, len(choice.calls))
    if choice.reasoning:  # the field llama-server, vLLM and DeepSeek's API use; absent without reasoning
        message["reasoning_content"] = choice.reasoning
    return {"index": index, "message": message, "logprobs": logprobs_body(choice.logprobs),
            "finish_reason": finish_reason}


def completion_body(meta: ResponseMeta, choices: Sequence[ChoiceResult], stats: GenerationStats) -> dict[str, Any]:
    return {
        **meta.head("chat.completion"),
        "choices": [choice_body(i, c) for i, c in enumerate(choices)],
        "usage": usage_body(stats),
    }


def chunk_body(meta: ResponseMeta, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: Sequence[TokenLogprob] | None = None, index: int = 0) -> dict[str, Any]:
    return {
        **meta.head("chat.completion.chunk"),
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs_body(logprobs),
                     "finish_reason": finish_reason}],
    }


def usage_chunk_body(meta: ResponseMeta, stats: GenerationStats) -> dict[str, Any]:
    """stream_options.include_usage: a last chunk with no choices and the totals."""
    return {
        **meta.head("chat.completion.chunk"),
        "choices": [],
        "usage": usage_body(stats),
    }


def model_body(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode("utf-8")


SSE_DONE = sse("[DONE]")
