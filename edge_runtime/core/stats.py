"""Per-answer measurements: the one stats type of an answer (`VisionChat.last_stats`, the server's
finished job) and the one function that turns it into OpenAI's `usage` body."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.core.logprobs import TokenLogprob


@dataclass
class GenerationStats:
    """The numbers of one answer, so a caller can see what reuse and caches saved and where time went.

    Filled by `VisionChat` (read it as `chat.last_stats`); `summary()` is one line for a log.
    """

    prompt_tokens: int = 0  # whole prompt, text + image tokens
    image_tokens: int = 0
    images: int = 0
    reused_tokens: int = 0  # prompt tokens already in the KV cache
    evaluated_tokens: int = 0  # prompt tokens decoded this call
    images_encoded: int = 0  # images that ran the vision encoder
    encoder_cache_hits: int = 0  # images whose embeddings came from a cache (memory or disk)
    disk_cache_hits: int = 0  # of those, read from the encoder cache on disk
    image_encode_s: float = 0.0
    prefill_s: float = 0.0  # decoding new prompt tokens, excluding the encoder
    ttft_s: float = 0.0  # call start -> first generated token
    generated_tokens: int = 0
    decode_s: float = 0.0  # first -> last generated token
    stop_reason: str = ""  # a generation.StopReason ("eog" | "stop" | "length" | "cancelled") once it ended
    kv_cache_bytes: int = 0  # allocated K+V buffers
    kv_used_bytes: int = 0  # the part holding this sequence
    peak_rss_bytes: int = 0
    # One dict per image of the prompt: tokens, grid, sizes, detail, budget and why (image_report).
    image_details: list[dict[str, Any]] = field(default_factory=list)
    # One per answer token when GenerationOptions.top_logprobs asked for them (VisionChat); not a number,
    # so as_dict leaves it out. The server sends them with its text deltas instead.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # A Thinking model's reasoning, apart from the answer (VisionChat; the server streams it instead).
    # Text, not a number: as_dict leaves it out (its token count below stays).
    reasoning: str = ""
    thinking_tokens: int = 0  # of generated_tokens, the reasoning's (a forced close tag included)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens evaluated per second, the encoder excluded (0 when nothing was evaluated)."""
        return self.evaluated_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (the first is part of TTFT)."""
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        """The fields plus the derived rates, ready for JSON (benchmarks, logs)."""
        data: dict[str, float | int | str] = asdict(self)
        del data["logprobs"], data["reasoning"]
        data["prefill_tok_s"] = self.prefill_tok_s
        data["decode_tok_s"] = self.decode_tok_s
        return data

    def summary(self) -> str:
        """One human-readable line (edge-chat's /stats, the demo)."""
        mib = 1 << 20
        return (
            f"prompt {self.prompt_tokens} tok ({self.image_tokens} image, {self.reused_tokens} reused) | "
            f"image encode {self.image_encode_s * 1000:.0f} ms | "
            f"prefill {self.evaluated_tokens} tok in {self.prefill_s * 1000:.0f} ms ({self.prefill_tok_s:.1f} tok/s) | "
            f"TTFT {self.ttft_s * 1000:.0f} ms | "
            f"decode {self.generated_tokens} tok at {self.decode_tok_s:.1f} tok/s ({self.stop_reason}) | "
            f"KV {self.kv_used_bytes / mib:.1f}/{self.kv_cache_bytes / mib:.1f} MiB | "
            f"peak RSS {self.peak_rss_bytes / mib:.0f} MiB"
        )


def usage_body(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's `usage` of a chat completion (plus `images`, an extension: what each image cost and why)."""
    body: dict[str, Any] = {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens, "image_tokens": stats.image_tokens},
    }
    if stats.thinking_tokens:  # OpenAI's field for the reasoning's share of completion_tokens
        body["completion_tokens_details"] = {"reasoning_tokens": stats.thinking_tokens}
    if stats.image_details:
        body["images"] = list(stats.image_details)
    return body


def image_report(image: Any, n_tokens: int) -> dict[str, Any]:
    """What one image cost and why: its tokens, grid, sizes and the budget that chose them."""
    plan = getattr(image, "plan", None)
    factor = plan.factor if plan is not None else 0
    report: dict[str, Any] = {
        "tokens": n_tokens,
        "size": [image.width, image.height],
        "source_size": list(image.source_size) if image.source_size else None,
        "grid": [image.width // factor, image.height // factor] if factor else None,
    }
    if plan is not None:
        report.update(plan.report())  # the budget, its floor, the predicted seconds and whether they meet the target
    return report
