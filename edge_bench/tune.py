"""`edge-bench --tune`: measure the load settings on this device for one model pair and store the winners.

A small sweep, one setting at a time from the defaults (coordinate descent from one start, not the
cross product): repack off, text flash attention off (decode at a short and a long context),
projector flash attention off, fewer threads, larger ubatches, a q8_0 KV cache. Every point is a
fresh load answering a 640x480 image at exactly 300 tokens (first-image TTFT) and then a text
follow-up (decode tok/s). The sweep runs twice, forward then backward, and each point keeps its best
figures: on a shared or thermally throttled device one sample per point decided settings by noise
(the first load of a process pays one-time costs; a neighbour's burst lands on one point). The runtime's `tuned.choose` picks per workload and `tuned.save_tuned`
stores the choice with every measured value; a last pair of loads with no explicit setting checks
that the defaults after tuning are as fast as the sweep's best point.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .scenario import FIRST_QUESTION, FOLLOW_UP, bench_image, filler_text

IMAGE_TOKENS = 300  # 640x480 at 20x15 merged patches: the must-show's budget
DECODE_TOKENS = 32
LONG_WORDS = 1200  # "long context" for the flash attention decision: about 1.2k tokens of chat
UBATCHES = (128, 512)


@dataclass
class TuneSetup:
    text: Path
    mmproj: Path
    n_ctx: int = 4096
    tuned_dir: Path | None = None  # None: the user cache dir
    passes: int = 2  # sweeps, alternating direction; each point keeps its best figures


@dataclass
class Point:
    label: str
    vary: str  # the one setting changed from the defaults ("" for the defaults)
    changes: dict[str, Any]  # VisionChat / EngineOptions keywords
    settings: dict[str, Any] = field(default_factory=dict)  # name -> value shown
    long: bool = False  # also measure decode at long context
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    decode_long_tok_s: float | None = None
    image_tokens: int = 0
    load_s: float = 0.0
    tuned: dict[str, Any] = field(default_factory=dict)  # the tuned values the load used
    error: str | None = None
    samples: list[list[float]] = field(default_factory=list)  # [TTFT s, decode tok/s] per pass (JSON lists)

    def keep_best(self, other: "Point") -> None:
        """Fold another pass's measurement in: the fastest TTFT and decode seen, every sample kept."""
        self.samples.append([other.ttft_s, other.decode_tok_s])
        if len(self.samples) == 1:
            self.ttft_s, self.decode_tok_s, self.decode_long_tok_s = (other.ttft_s, other.decode_tok_s,
                                                                      other.decode_long_tok_s)
            self.image_tokens, self.load_s, self.tuned = other.image_tokens, other.load_s, other.tuned
            return
        self.ttft_s = min(self.ttft_s, other.ttft_s)
        self.decode_tok_s = max(self.decode_tok_s, other.decode_tok_s)
        if other.decode_long_tok_s is not None:
            self.decode_long_tok_s = max(self.decode_long_tok_s or 0.0, other.decode_long_tok_s)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "vary": self.vary, "changes": self.changes, "settings": self.settings,
                "ttft_s": self.ttft_s, "decode_tok_s": self.decode_tok_s,
                "decode_long_tok_s": self.decode_long_tok_s, "image_tokens": self.image_tokens,
                "load_s": self.load_s, "tuned": self.tuned, "error": self.error, "samples": self.samples}


def sweep_points(cores: int) -> list[Point]:
    """The defaults, then each setting changed alone."""
    points = [Point("defaults", "", {}, long=True)]
    points.append(Point("repack off", "repack", {"repack": False}, {"repack": False}))
    points.append(Point("text flash attention off", "flash_attn", {"flash_attn": False}, {"flash_attn": False},
                        long=True))
    points.append(Point("projector flash attention off", "mmproj_flash_attn", {"mmproj_flash_attn": False},
                        {"mmproj_flash_attn": False}))
    for t in sorted({1, max(1, cores // 2), cores - 1} - {0, cores}):
        points.append(Point(f"threads {t}", "threads", {"threads": t}, {"threads": t}))
    for u in UBATCHES:
        points.append(Point(f"ubatch {u}", "n_ubatch", {"n_ubatch": u}, {"n_ubatch": u}))
    points.append(Point("KV q8_0", "kv", {"kv_cache_type_k": "q8_0", "kv_cache_type_v": "q8_0"}, {"kv": "q8_0"}))
    return points


def measure(setup: TuneSetup, point: Point, image: Path, cost_dir: Path, tuned_dir: str | None,
            workload: str = "auto") -> Point:
    """One fresh load at the point's settings: first-image TTFT at 300 tokens, then decode tok/s."""
    from edge_runtime import VisionChat

    t0 = time.perf_counter()
    chat = VisionChat(setup.text, setup.mmproj, n_ctx=setup.n_ctx, image_min_tokens=IMAGE_TOKENS,
                      image_max_tokens=IMAGE_TOKENS, encoder_cache_mb=0, cost_cache_dir=cost_dir,
                      tuned_dir=tuned_dir, workload=workload, **point.changes)
    point.load_s = time.perf_counter() - t0
    with chat:
        chat.ask(FIRST_QUESTION, images=[image], max_tokens=2, temperature=0)
        point.ttft_s, point.image_tokens = chat.last_stats.ttft_s, chat.last_stats.image_tokens
        chat.ask(FOLLOW_UP, max_tokens=DECODE_TOKENS, temperature=0)
        point.decode_tok_s = chat.last_stats.decode_tok_s
        if point.long:
            chat.reset()
            chat.ask(filler_text(LONG_WORDS) + "\nSummarise.", max_tokens=DECODE_TOKENS, temperature=0)
            point.decode_long_tok_s = chat.last_stats.decode_tok_s
        point.tuned = dict(chat.engine.tuned)
    return point


def warm_page_cache(*paths: Path) -> None:
    """Reads the files once, so the first point (the defaults) does not pay the disk the others skip."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def run_tune(setup: TuneSetup, log: Callable[[str], None], progress: bool = True) -> dict[str, Any]:
    """The sweep, the choice per workload (stored), and the defaults after tuning measured against the best."""
    from tqdm import tqdm

    from edge_common.errors import EdgeError
    from edge_llama import physical_cores
    from edge_runtime.core.tuned import WORKLOADS, choose, save_tuned, tuned_dir, tuned_key
    from edge_runtime.vision.disk_cache import user_cache_dir

    directory = setup.tuned_dir or tuned_dir("auto") or user_cache_dir()
    points = sweep_points(physical_cores())
    with tempfile.TemporaryDirectory(prefix="edge-tune-") as tmp:
        image = Path(tmp) / "photo.png"
        bench_image(640, 480).save(image)
        cost_dir = Path(tmp) / "costs"  # the sweep's rates stay out of the device's cost file
        warm_page_cache(setup.text, setup.mmproj)
        order = [(i, p) for i in range(setup.passes) for p in (points if i % 2 == 0 else points[::-1])]
        for i, p in tqdm(order, desc="edge-bench --tune", unit="load", disable=not progress, leave=False):
            if p.error:
                continue
            try:
                sample = measure(setup, Point(p.label, p.vary, p.changes, long=p.long), image, cost_dir,
                                 tuned_dir=None)
            except EdgeError as exc:  # a setting this device refuses is a result, not the sweep's end
                p.error = f"{type(exc).__name__}: {exc}"
                log(f"edge-bench --tune: {p.label} failed: {p.error}")
            else:
                p.keep_best(sample)
                log(f"edge-bench --tune: pass {i + 1}, {p.label}: TTFT {sample.ttft_s:.2f} s, decode "
                    f"{sample.decode_tok_s:.2f} tok/s"
                    + (f", long-context decode {sample.decode_long_tok_s:.2f} tok/s" if p.long else ""))
        if points[0].error:
            raise RuntimeError(f"the defaults could not be measured: {points[0].error}")
        ok = [p.to_dict() for p in points if p.error is None]
        workloads = {}
        for w in WORKLOADS:
            settings, why = choose(ok, w)
            workloads[w] = {"settings": settings, "why": why}
        key = tuned_key(setup.text, setup.mmproj)
        path = save_tuned(directory, key, {"workloads": workloads, "sweep": ok,
                                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        log(f"edge-bench --tune: tuned settings written to {path}")
        after = {}
        for w in WORKLOADS:  # no explicit setting: the tuned file decides; as many passes as the sweep's
            p = Point(f"defaults after tuning ({w})", "", {})
            for _ in range(setup.passes):
                p.keep_best(measure(setup, Point(p.label, "", {}), image, cost_dir, tuned_dir=str(directory),
                                    workload=w))
            after[w] = p.to_dict()
    return {"key": key, "file": str(path), "sweep": [p.to_dict() for p in points], "workloads": workloads,
            "after": after}


def _fmt(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value else "-"


def tune_markdown(result: dict[str, Any], machine: str) -> str:
    """The sweep's table, the choice per workload and why, and the check against the sweep's best."""
    passes = max((len(p.get("samples", ())) for p in result["sweep"]), default=1)
    lines = [f"### Tuning sweep ({machine})", "",
             f"Each row: the best of {passes} fresh loads (the sweep forward, then backward), each a 640x480 "
             f"image at {IMAGE_TOKENS} tokens (first-image TTFT), a text follow-up ({DECODE_TOKENS} tokens decoded), and for the flash-attention rows a ~{LONG_WORDS}-token "
             "chat (long-context decode).", "",
             "| configuration | image tokens | first-image TTFT (s) | decode (tok/s) | long-context decode (tok/s) |",
             "|---|---:|---:|---:|---:|"]
    for p in result["sweep"]:
        if p["error"]:
            lines.append(f"| {p['label']} | - | failed: {p['error'][:80]} | - | - |")
            continue
        lines.append(f"| {p['label']} | {p['image_tokens']} | {_fmt(p['ttft_s'])} | {_fmt(p['decode_tok_s'])} | "
                     f"{_fmt(p['decode_long_tok_s'])} |")
    lines += ["", f"Chosen defaults, stored in `{result['file']}`:", ""]
    for w, choice in result["workloads"].items():
        chosen = ", ".join(f"{k}={v}" for k, v in choice["settings"].items()) or "the built-in defaults"
        lines.append(f"- **{w}**: {chosen}")
        lines += [f"  - {name}: {why}" for name, why in choice["why"].items()]
    ok = [p for p in result["sweep"] if not p["error"]]
    best_ttft = min(p["ttft_s"] for p in ok)
    best_decode = max(p["decode_tok_s"] for p in ok)
    img, chat = result["after"]["image"], result["after"]["chat"]
    lines += ["", "Defaults after tuning vs the sweep's best:", "",
              "| figure | after tuning | sweep's best | ratio | target |", "|---|---:|---:|---:|---:|",
              f"| first-image TTFT at {IMAGE_TOKENS} tokens (image workload) | {img['ttft_s']:.2f} s | "
              f"{best_ttft:.2f} s | {img['ttft_s'] / best_ttft:.3f} | <= 1.05 |",
              f"| decode (chat workload) | {chat['decode_tok_s']:.2f} tok/s | {best_decode:.2f} tok/s | "
              f"{best_decode / chat['decode_tok_s'] if chat['decode_tok_s'] else float('inf'):.3f} | <= 1.03 |", ""]
    return "\n".join(lines)
