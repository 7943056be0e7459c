"""Splitting over RPC workers costs what? Local vs split across 2 loopback workers, same model.

    python benchmarks/rpc_split.py TEXT.gguf [--prompt 128] [--decode 32] [--threads 2] [--split 1,1,1]

Starts two `edge-rpc-worker` processes on 127.0.0.1, then runs one host
process per mode (local, split) so each peak RSS is its own. Per mode: a
text prompt of --prompt tokens (prefill tok/s) then --decode greedy tokens
(decode tok/s), best of --repeats. Bytes held: each process's peak RSS.
Bytes sent per token: what the workers' sockets received and sent (the
kernel's tcp_info counters, read with `ss`): an answer of one token gives the prompt's traffic, a full
answer minus that gives the decode steps', divided by the tokens decoded.
Loopback has no network cost: the figures show the protocol's own overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

FILLER = "The quick brown fox jumps over the lazy dog while the river keeps flowing past old mills. "


def io_bytes(port: int) -> tuple[int, int]:
    """(received, sent) bytes of the worker's established sockets on `port`, from the kernel's tcp_info (ss)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    received = sum(int(x) for x in re.findall(r"bytes_received:(\d+)", out))
    sent = sum(int(x) for x in re.findall(r"bytes_sent:(\d+)", out))
    return received, sent


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def host(args: argparse.Namespace) -> None:
    """One mode in this process: prints a JSON line."""
    from edge_runtime import VisionChat
    from edge_common.peak_rss import peak_rss_bytes

    rpc = [s for s in args.rpc.split(",") if s]
    worker_ports = [int(p) for p in args.worker_ports.split(",") if p]
    t0 = time.perf_counter()
    chat = VisionChat(args.model, None, n_ctx=args.prompt + args.decode + 256, threads=args.threads,
                      rpc_servers=rpc, tensor_split=[float(x) for x in args.split.split(",")] if rpc else None)
    load_s = time.perf_counter() - t0
    n_tok = len(chat.engine.tokenize(FILLER).chunks[0].tokens)
    prompt = FILLER * max(1, args.prompt // n_tok)
    best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
    prefill_bytes = decode_bytes = [0, 0]
    prefill_tokens = decoded = 0
    for _ in range(args.repeats):
        # one token: the prompt's traffic; then the whole answer: the difference is the decode steps'
        chat.reset()
        b0 = [io_bytes(p) for p in worker_ports]
        "".join(chat.stream(prompt, temperature=0.0, max_tokens=1))
        b1 = [io_bytes(p) for p in worker_ports]
        pre = chat.last_stats
        chat.reset()
        "".join(chat.stream(prompt, temperature=0.0, max_tokens=args.decode))
        b2 = [io_bytes(p) for p in worker_ports]
        stats = chat.last_stats
        best["prefill_tok_s"] = max(best["prefill_tok_s"], pre.prefill_tok_s, stats.prefill_tok_s)
        best["decode_tok_s"] = max(best["decode_tok_s"], stats.decode_tok_s)
        prefill_tokens, decoded = pre.evaluated_tokens, stats.generated_tokens - 1
        one = [sum(x[i] - y[i] for x, y in zip(b1, b0)) for i in (0, 1)]
        whole = [sum(x[i] - y[i] for x, y in zip(b2, b1)) for i in (0, 1)]
        prefill_bytes, decode_bytes = one, [w - o for w, o in zip(whole, one)]
    print(json.dumps({
        **best, "load_s": load_s, "prompt_tokens": prefill_tokens, "host_peak_rss": peak_rss_bytes(),
        "placement": chat.engine.device_weights,
        "decoded": decoded,
        "to_workers_per_token": decode_bytes[0] / decoded if decoded > 0 else 0,
        "from_workers_per_token": decode_bytes[1] / decoded if decoded > 0 else 0,
        "to_workers_per_prefill_token": prefill_bytes[0] / prefill_tokens if prefill_tokens else 0,
    }), flush=True)
    chat.close()


def run_mode(args: argparse.Namespace, rpc: str, ports: str) -> dict:
    cmd = [sys.executable, __file__, args.model, "--host-mode", "--rpc", rpc, "--worker-ports", ports,
           "--prompt", str(args.prompt), "--decode", str(args.decode), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--split", args.split]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"host failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--split", default="1,1,1", help="Shares: local, worker 1, worker 2.")
    p.add_argument("--host-mode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rpc", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-ports", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.host_mode:
        host(args)
        return
    from support.rpc import Worker

    local = run_mode(args, "", "")
    workers = [Worker("--threads", str(args.threads)), Worker("--threads", str(args.threads))]
    try:
        split = run_mode(args, ",".join(map(str, workers)), ",".join(str(w.port) for w in workers))
        worker_rss = [peak_rss(w.proc.pid) for w in workers]
    finally:
        for w in workers:
            w.stop(signal.SIGTERM)
    mb = lambda n: f"{n / 1e6:,.0f} MB"  # noqa: E731
    print(f"### RPC split on loopback: {Path(args.model).name}, prompt {local['prompt_tokens']} tokens, "
          f"{split['decoded']} decode steps, {args.threads} threads per process, shares {args.split}, machine "
          f"{os.cpu_count()} vCPU (shared)")
    print()
    print("| mode | prefill tok/s | decode tok/s | load s | host peak RSS | worker peak RSS | "
          "bytes to workers / decoded token | bytes back / decoded token | bytes to workers / prompt token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| local | {local['prefill_tok_s']:.1f} | {local['decode_tok_s']:.1f} | {local['load_s']:.1f} | "
          f"{mb(local['host_peak_rss'])} | - | - | - | - |")
    print(f"| split 2 workers | {split['prefill_tok_s']:.1f} | {split['decode_tok_s']:.1f} | {split['load_s']:.1f} | "
          f"{mb(split['host_peak_rss'])} | {' + '.join(mb(r) for r in worker_rss)} | "
          f"{split['to_workers_per_token']:,.0f} | {split['from_workers_per_token']:,.0f} | "
          f"{split['to_workers_per_prefill_token']:,.0f} |")
    print(f"| split / local | {split['prefill_tok_s'] / local['prefill_tok_s']:.2f} | "
          f"{split['decode_tok_s'] / local['decode_tok_s']:.2f} | | "
          f"{split['host_peak_rss'] / local['host_peak_rss']:.2f} | | | | |")
    print()
    print("placement (llama.cpp's load log): " + "; ".join(
        f"{k} {v[0]} layers {v[1] / 1e6:,.0f} MB" for k, v in split["placement"].items()))


if __name__ == "__main__":
    main()
