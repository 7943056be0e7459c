"""Counters the scheduler bumps and the Prometheus text format GET /metrics serves.

Counters only grow (rates are the scraper's job), except the decode rate: a
device without a Prometheus server still wants to read "tokens/s now" directly,
so it is kept over a sliding window.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from edge_runtime.core.step import STEP_PARTS

OUTCOMES = ("ok", "invalid", "error", "cancelled", "timeout", "rejected")


@dataclass(frozen=True)
class Gauges:
    """Point-in-time state the scheduler reports."""

    ready: bool = False
    queue_depth: int = 0
    slots_busy: int = 0
    slots_total: int = 0
    kv_used_bytes: int = 0
    kv_total_bytes: int = 0
    encoder_cache_entries: int = 0
    encoder_cache_bytes: int = 0


class Metrics:
    def __init__(self, window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._window_s = window_s
        self._requests: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self._totals: Counter[str] = Counter()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of decode steps
        # Counters of an engine child process: those of processes that died, plus the live one's.
        self._remote_base: Counter[str] = Counter()
        self._remote: Counter[str] = Counter()
        self._remote_rate = 0.0

    def request(self, outcome: str) -> None:
        with self._lock:
            self._requests[outcome] += 1

    def add(self, name: str, value: int | float = 1) -> None:
        with self._lock:
            self._totals[name] += value

    def tokens_generated(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._totals["completion_tokens"] += n
            self._recent.append((now, n))
            self._trim(now)

    def decode_rate(self, now: float | None = None) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self._window_s

    def requests(self, outcome: str) -> int:
        return int(self._merged()[0][outcome])

    def total(self, name: str) -> int | float:
        return self._merged()[1][name]

    def snapshot(self) -> dict[str, float]:
        """Every counter as 'requests:<outcome>' / '<total>' -> value, for the parent process."""
        rate = self.decode_rate()
        with self._lock:
            out = {f"requests:{k}": float(v) for k, v in self._requests.items()}
            out.update({k: float(v) for k, v in self._totals.items()})
        out["rate"] = rate
        return out

    def set_remote(self, snapshot: dict[str, float]) -> None:
        """The engine process's latest counters (its `snapshot()`)."""
        with self._lock:
            self._remote_rate = snapshot.get("rate", 0.0)
            self._remote = Counter({k: v for k, v in snapshot.items() if k != "rate"})

    def retire_remote(self) -> None:
        """The engine process died: keep its counts, so counters never go back."""
        with self._lock:
            self._remote_base.update(self._remote)
            self._remote, self._remote_rate = Counter(), 0.0

    def _merged(self) -> tuple[Counter[str], Counter[str], float]:
        with self._lock:
            remote = self._remote_base + self._remote
            requests = Counter(self._requests)
            totals = Counter(self._totals)
            rate = self._remote_rate
        for key, value in remote.items():
            if key.startswith("requests:"):
                requests[key[len("requests:"):]] += value
            else:
                totals[key] += value
        return requests, totals, rate

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()

    def render(self, gauges: Gauges) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        requests, totals, remote_rate = self._merged()
        rate = self.decode_rate() + remote_rate
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

        metric("edge_requests_total", "counter", "Chat completion requests by outcome (invalid: refused with a 4xx; "
               "rejected: 429, queue full).",
               [(f'{{outcome="{o}"}}', requests.get(o, 0)) for o in OUTCOMES])
        for key, help_ in (
            ("prompt_tokens", "Prompt tokens (text and image) of admitted requests."),
            ("prompt_tokens_cached", "Prompt tokens found in a slot's KV cache (not evaluated again)."),
            ("completion_tokens", "Generated tokens."),
            ("images", "Images in admitted requests."),
            ("images_encoded", "Images sent to the vision encoder (neither cache held their output)."),
            ("encoder_disk_hits", "Images whose encoder output came from the encoder cache on disk."),
            ("decode_steps", "Batched decode steps (one llama_decode each)."),
            ("decode_batch_tokens", "Tokens evaluated by batched decode steps (divide by steps: mean batch size)."),
            ("decode_seconds", "Time of the decode steps, sampling and the loop's work included (batch tokens / "
             "this: decode tok/s); a step that also evaluates a prompt piece counts here and as prefill."),
            ("prefill_seconds", "Time of the steps evaluating a prompt piece (the vision encoder runs beside them)."),
            ("decode_only_steps", "Decode steps holding generated tokens only (no prompt piece): the profiled ones."),
            ("decode_only_tokens", "Tokens evaluated by decode-only steps (divide by the sum of "
             "edge_decode_step_seconds_total: the batched decode rate)."),
            ("engine_restarts", "Times the engine process died and was started again."),
        ):
            metric(f"edge_{key}_total", "counter", help_, [("", totals.get(key, 0))])
        metric("edge_decode_step_seconds_total", "counter", "Time of the decode-only steps by part: inside "
               "llama_decode, sampling, logits handling (bias, logprobs), detokenizing, messages to the clients, "
               "the loop's bookkeeping.", [(f'{{part="{p}"}}', totals.get(f"step_seconds:{p}", 0)) for p in STEP_PARTS])
        metric("edge_decode_tokens_per_second", "gauge", "Generated tokens per second over the last "
               f"{self._window_s:g} s, all slots together.", [("", rate)])
        metric("edge_model_ready", "gauge", "1 once the model is loaded.", [("", int(gauges.ready))])
        metric("edge_queue_depth", "gauge", "Requests waiting for a free slot.", [("", gauges.queue_depth)])
        metric("edge_slots_busy", "gauge", "Slots generating for a request.", [("", gauges.slots_busy)])
        metric("edge_slots_total", "gauge", "Slots (--parallel).", [("", gauges.slots_total)])
        metric("edge_kv_cache_used_bytes", "gauge", "KV-cache bytes holding tokens (all slots).",
               [("", gauges.kv_used_bytes)])
        metric("edge_kv_cache_bytes", "gauge", "KV-cache bytes allocated.", [("", gauges.kv_total_bytes)])
        usage = gauges.kv_used_bytes / gauges.kv_total_bytes if gauges.kv_total_bytes else 0.0
        metric("edge_kv_cache_usage_ratio", "gauge", "Used / allocated KV cache.", [("", usage)])
        metric("edge_encoder_cache_entries", "gauge", "Images whose encoder output is cached.",
               [("", gauges.encoder_cache_entries)])
        metric("edge_encoder_cache_bytes", "gauge", "Bytes of cached encoder outputs.",
               [("", gauges.encoder_cache_bytes)])
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; for tests and the benchmark."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
