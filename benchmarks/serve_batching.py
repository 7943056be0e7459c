"""Continuous batching pays: aggregate decode tok/s of N concurrent streams vs one at a time.

    python benchmarks/serve_batching.py MODEL_DIR [--streams 1,2,4] [--max-tokens 32]

Starts `edge-serve MODEL_DIR --parallel max(streams)` (or uses --url), then for
each N sends N different prompts one after another, and the same N at once.
Every answer generates exactly --max-tokens tokens (ignore_eos), so both runs
decode the same tokens (and, being greedy, must give the same answers: checked).
Decode tok/s comes from the server's own counters
(batch tokens / seconds inside decode steps), so HTTP and prefill time do not
blur it; end-to-end tok/s (completion tokens / wall time) is printed beside it.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.server

from edge_common import cli_options as flags  # noqa: E402
from edge_runtime.server.metrics import parse_metrics  # noqa: E402
from support.server import ServerProcess  # noqa: E402

PROMPT = "Describe scene number {i}: a busy street market at dusk, the stalls, the people and the light."


@dataclass(frozen=True)
class Phase:
    tokens: int  # completion tokens of all requests
    wall_s: float
    decode_tokens: float  # evaluated in batched decode steps (server counter)
    decode_s: float
    decode_steps: float
    answers: tuple[str, ...]  # in prompt order: greedy, so one-at-a-time and concurrent must agree

    @property
    def mean_batch(self) -> float:
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def end_to_end_tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def ask(http: httpx.Client, url: str, i: int, max_tokens: int) -> tuple[int, str]:
    body = {"messages": [{"role": "user", "content": PROMPT.format(i=i)}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    resp = http.post(url + "/v1/chat/completions", json=body)
    resp.raise_for_status()
    data = resp.json()
    return int(data["usage"]["completion_tokens"]), data["choices"][0]["message"]["content"]


def counters(http: httpx.Client, url: str) -> tuple[float, float, float]:
    values = parse_metrics(http.get(url + "/metrics").text)
    return (values["edge_decode_batch_tokens_total"], values["edge_decode_seconds_total"],
            values["edge_decode_steps_total"])


def run_phase(url: str, n: int, max_tokens: int, concurrent: bool, headers: dict[str, str]) -> Phase:
    with httpx.Client(timeout=3600, headers=headers) as http:
        tok0, sec0, steps0 = counters(http, url)
        t0 = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda i: ask(http, url, i, max_tokens), range(n)))
        else:
            results = [ask(http, url, i, max_tokens) for i in range(n)]
        wall = time.perf_counter() - t0
        tok1, sec1, steps1 = counters(http, url)
    return Phase(sum(t for t, _ in results), wall, tok1 - tok0, sec1 - sec0, steps1 - steps0,
                 tuple(a for _, a in results))


@click.command(context_settings=flags.CONTEXT, help=__doc__)
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--url", help="An already running edge-serve (its --parallel must cover --streams).")
@click.option("--api-key", default=None)
@click.option("--streams", default="1,2,4", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run each phase this many times (alternating) and keep the fastest: on a shared machine the "
                   "slowest runs measure the neighbours.")
@flags.ctx_size(512, "Context per slot (started server only).")
@flags.threads("llama.cpp threads (started server only).")
@click.option("--server-arg", multiple=True, help="Extra edge-serve argument; repeatable.")
def main(model_dir: Path | None, url: str | None, api_key: str | None, streams: str, max_tokens: int, repeats: int,
         n_ctx: int, threads: int | None, server_arg: tuple[str, ...]) -> None:
    try:
        levels = [int(s) for s in streams.split(",")]
    except ValueError:
        flags.fail("serve_batching", f"--streams {streams!r}: use comma-separated integers, e.g. 1,2,4")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if url:
        sys.exit(report(url.rstrip("/"), levels, max_tokens, repeats, headers))
    if model_dir is None:
        flags.fail("serve_batching", "give MODEL_DIR or --url")
    server_args = ["--parallel", str(max(levels)), "--ctx-size", str(n_ctx * max(levels)), *server_arg]
    if threads:
        server_args += ["--threads", str(threads)]
    with ServerProcess(model_dir, server_args, startup_timeout_s=900) as server:
        sys.exit(report(server.base_url, levels, max_tokens, repeats, headers))


def best(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.decode_tok_s)


def report(url: str, streams: list[int], max_tokens: int, repeats: int, headers: dict[str, str]) -> int:
    print(f"edge-serve at {url}: {max_tokens} tokens per answer, greedy, ignore_eos, best of {repeats}", flush=True)
    run_phase(url, 1, 4, False, headers)  # warm-up: first-call allocations
    print(f"{'streams':>7} | {'one at a time':>14} | {'concurrent':>11} | {'decode ratio':>12} | "
          f"{'end-to-end ratio':>16} | same answers", flush=True)
    all_same = True
    for n in streams:
        runs = [(run_phase(url, n, max_tokens, False, headers), run_phase(url, n, max_tokens, True, headers))
                for _ in range(repeats)]
        alone, together = best([a for a, _ in runs]), best([t for _, t in runs])
        ratio = together.decode_tok_s / alone.decode_tok_s if alone.decode_tok_s else 0.0
        e2e = together.end_to_end_tok_s / alone.end_to_end_tok_s if alone.end_to_end_tok_s else 0.0
        same = all(a.answers == t.answers for a, t in runs)
        all_same &= same
        print(f"{n:>7} | {alone.decode_tok_s:>8.2f} tok/s | {together.decode_tok_s:>5.2f} tok/s | "
              f"{ratio:>11.2f}x | {e2e:>15.2f}x | {'yes' if same else 'NO'}   (mean batch {together.mean_batch:.2f})",
              flush=True)
    return 0 if all_same else 1


if __name__ == "__main__":
    main()
