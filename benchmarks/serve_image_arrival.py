"""What running streams get while a request with an image arrives: before vs after chunked prefill.

    python benchmarks/serve_image_arrival.py TEXT_GGUF --mmproj MMPROJ_GGUF [--baseline-ref main]

Starts edge-serve with --parallel 3, starts 2 streams (greedy, ignore_eos), and
once both are decoding sends a third request with a 640x480 image. Reports, for
the window from that request's arrival to its first token: the longest gap
between tokens of the running streams (the server's generated-token counter,
polled: random-weight models mostly pick tokens without text, which no client
sees), and the new request's TTFT; the target is longest gap <= 0.25 x TTFT. With --baseline-ref the same run is made first
with edge-serve from that git ref (extracted with `git archive` into a temporary
directory), where a new prompt is evaluated whole, its image encoded inline,
between two decode steps.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.server

from edge_bench.scenario import bench_image  # noqa: E402
from edge_runtime.server.metrics import parse_metrics  # noqa: E402
from support.server import ServerProcess  # noqa: E402

STREAM_PROMPT = "Describe scene number {i}: a busy street market at dusk, the stalls, the people and the light."


@dataclass
class Stream:
    response: httpx.Response | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


def run_stream(url: str, body: dict, out: Stream) -> None:
    """Keep a streaming request open until `out.stop` (closing it cancels the request)."""
    try:
        with httpx.Client(timeout=None) as http, http.stream("POST", url, json=body) as resp:
            out.response = resp
            resp.raise_for_status()
            for _ in resp.iter_lines():
                if out.stop.is_set():
                    return
    except Exception as exc:
        if not out.stop.is_set():
            out.error = f"{type(exc).__name__}: {exc}"


class TokenClock:
    """Polls the server's generated-token counter: when it moves, the running streams got tokens.

    Random-weight models mostly pick tokens with no text, which a client never sees;
    the counter counts every token, in the old code and the new alike.
    """

    def __init__(self, url: str, interval_s: float = 0.04) -> None:
        self.samples: list[tuple[float, float]] = []
        self._url, self._interval_s = url + "/metrics", interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                values = parse_metrics(http.get(self._url).text)
                self.samples.append((time.perf_counter(), values["edge_completion_tokens_total"]))
                time.sleep(self._interval_s)

    def tokens(self) -> float:
        return self.samples[-1][1] if self.samples else 0.0

    def changes(self) -> list[tuple[float, float]]:
        """(time, count) of each sample where the counter had moved."""
        return [(t, c) for (t, c), (_, prev) in zip(self.samples[1:], self.samples) if c != prev]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def image_uri(width: int, height: int) -> str:
    buf = io.BytesIO()
    bench_image(width, height).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class Result:
    label: str
    ttft_s: float
    longest_gap_s: float
    gap_before_s: float  # median gap between counter moves before the image request arrived
    tokens_meanwhile: int  # tokens the running streams got while the new request waited for its first

    @property
    def ratio(self) -> float:
        return self.longest_gap_s / self.ttft_s if self.ttft_s else float("inf")


def measure(label: str, url: str, width: int, height: int, warm_tokens: int, max_tokens: int) -> Result:
    endpoint = url + "/v1/chat/completions"
    clock = TokenClock(url)
    streams = [Stream(), Stream()]
    threads = []
    for i, stream in enumerate(streams):
        body = {"messages": [{"role": "user", "content": STREAM_PROMPT.format(i=i)}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        threads.append(threading.Thread(target=run_stream, args=(endpoint, body, stream), daemon=True))
        threads[-1].start()
    deadline = time.perf_counter() + 900
    while clock.tokens() < 2 * warm_tokens:  # both streams admitted and decoding together
        if any(s.error for s in streams) or time.perf_counter() > deadline:
            raise RuntimeError(f"{label}: the streams did not start: {[s.error for s in streams]}")
        time.sleep(0.05)
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_uri(width, height)}},
        {"type": "text", "text": "What is in this picture?"}]}], "max_tokens": 1, "temperature": 0}
    before_tokens = clock.tokens()
    sent = time.perf_counter()
    resp = httpx.post(endpoint, json=body, timeout=None)  # one token: the answer is its first token
    first = time.perf_counter()
    resp.raise_for_status()
    time.sleep(0.5)
    for stream in streams:
        stream.stop.set()
        if stream.response is not None:
            stream.response.close()
    for thread in threads:
        thread.join(60)
    clock.close()
    moves = clock.changes()
    times = [t for t, _ in moves]
    before = [b - a for a, b in zip(times, times[1:]) if b <= sent]
    window = [b - a for a, b in zip(times, times[1:]) if b >= sent and a <= first]
    meanwhile = max(0, int(max((c for t, c in moves if t <= first), default=before_tokens) - before_tokens) - 1)
    return Result(label, first - sent, max(window) if window else float("nan"),
                  statistics.median(before) if before else float("nan"), meanwhile)


def extract(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="text GGUF (or a converter output directory)")
    parser.add_argument("--mmproj", type=Path, default=None)
    parser.add_argument("--baseline-ref", default=None, help="git ref of the code to compare with (e.g. main)")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx-size", type=int, default=1024, help="per slot")
    parser.add_argument("--warm-tokens", type=int, default=8, help="tokens each stream has before the image arrives")
    parser.add_argument("--server-arg", action="append", default=[], help="extra edge-serve argument (new code only)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    common = ["--parallel", "3", "--ctx-size", str(args.ctx_size * 3), "--encoder-cache-mb", "0"]
    if args.mmproj:
        common += ["--mmproj", str(args.mmproj)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-baseline-") as tmp:
        runs = []
        if args.baseline_ref:
            runs.append((f"before ({args.baseline_ref})", extract(args.baseline_ref, Path(tmp)), common))
        runs.append(("after (this tree)", ROOT, common + args.server_arg))
        for label, root, server_args in runs:
            print(f"{label}: starting edge-serve ...", flush=True)
            with ServerProcess(args.model, server_args, startup_timeout_s=900, root=root) as server:
                results.append(measure(label, server.base_url, width, height, args.warm_tokens, args.ctx_size - 128))
            r = results[-1]
            print(f"{label}: TTFT {r.ttft_s:.2f} s, longest gap {r.longest_gap_s:.2f} s "
                  f"({r.ratio:.3f} x TTFT), median gap before {r.gap_before_s:.3f} s, "
                  f"{r.tokens_meanwhile} stream tokens meanwhile", flush=True)
    print(f"\n2 streams decoding, a {width}x{height} image request arrives (--parallel 3, encoder cache off)")
    print(f"{'run':<22} | {'new request TTFT s':>18} | {'longest gap s':>13} | {'gap / TTFT':>10} | "
          f"{'median gap before s':>19} | stream tokens meanwhile")
    for r in results:
        print(f"{r.label:<22} | {r.ttft_s:>18.2f} | {r.longest_gap_s:>13.2f} | {r.ratio:>10.3f} | "
              f"{r.gap_before_s:>19.3f} | {r.tokens_meanwhile}")
    if len(results) == 2:
        print(f"longest gap after / before: {results[1].longest_gap_s / results[0].longest_gap_s:.3f}")
    met = results[-1].ratio <= 0.25
    print(f"target longest gap <= 0.25 x TTFT: {'met' if met else 'NOT met'} ({results[-1].ratio:.3f})")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
