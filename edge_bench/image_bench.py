"""`edge-bench --images`: the image scenarios, each case in a fresh process, ratios from one run.

A 4032x3024 phone-like JPEG and a 640x480 image with the defaults, 640x480 at the
processor's own 300 tokens (what llama.cpp's default budget gives it), attach then
ask, a second process served by the encoder cache on disk, encoder efficiency
(encoder FLOP/s over text-prefill FLOP/s) and what flash attention and the
projector type change, and transformers bf16 on the same image at the same tokens.
One encode is profiled per stage and operation for each projector type (time and
cosine to the float projector); the fastest type that keeps cosine >= 0.999, with
weights not repacked, is then asked too: the configuration that answers first.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .encoder_profile import OpRow, cosine_rows

Log = Callable[[str], None]
GB = 1e9
# The projector types compared (each derived from the float projector where there is one).
PROJECTOR_TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k", "q4_k")
# A projector type "keeps" the image when every token's embedding keeps this cosine to the float one.
FAST_MIN_COSINE = 0.999


def photo_like_jpeg(path: Path, width: int = 4032, height: int = 3024, seed: int = 0) -> Path:
    """A synthetic phone photo: smooth gradients, shapes, blur and sensor noise, saved as a q90 JPEG."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)  # large smooth colour fields, like sky and walls
    draw = ImageDraw.Draw(small)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 40, width // 6)), int(rng.integers(height // 40, height // 6))
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    img = small.filter(ImageFilter.GaussianBlur(2))
    noise = rng.normal(0, 6, size=(height, width, 1)).astype(np.int16)
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


@dataclass(frozen=True)
class ImageBenchSetup:
    text: Path
    mmproj: Path
    mmproj_float: Path | None  # the float projector: cosine reference of the projector types
    hf_dir: Path | None
    threads: int
    kv: str = "q8_0"
    n_ctx: int = 4096
    repeats: int = 2
    transformers: bool = True
    timeout: float = 1800.0
    projectors: dict[str, Path] = field(default_factory=dict)  # type -> projector GGUF, for the comparison
    must_show: bool = False  # only the cases the targets read (a few minutes on 2 cores)
    auto_mmproj: tuple[str, Path] | None = None  # (type, file) edge-convert --mmproj-quant auto picks here


def _run(case: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "edge_bench.image_worker"], input=json.dumps(case),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['name']} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_image_bench(setup: ImageBenchSetup, log: Log) -> dict:
    with tempfile.TemporaryDirectory(prefix="edge-bench-images-") as tmp:
        work = Path(tmp)
        photo = photo_like_jpeg(work / "photo-4032x3024.jpg")
        small = photo_like_jpeg(work / "photo-640x480.jpg", 640, 480, seed=1)
        cost_dir, disk_dir = work / "cost", work / "encoder-cache"
        base = {"n_ctx": setup.n_ctx, "kv_cache_type": setup.kv, "threads": setup.threads,
                "cost_cache_dir": str(cost_dir)}

        def case(name: str, image: Path, mode: str = "ask", repeats: int | None = None,
                 embeddings: str | None = None, **chat) -> dict:
            spec = {"name": name, "mode": mode, "text": str(setup.text), "embeddings": embeddings,
                    "mmproj": str(chat.pop("mmproj", setup.mmproj)),
                    "image": str(image), "repeats": repeats or setup.repeats, "chat": {**base, **chat},
                    "threads": setup.threads, "hf_dir": str(setup.hf_dir) if setup.hf_dir else None}
            log(f"edge-bench --images: {name}")
            result = _run(spec, setup.timeout)
            result["name"], result["n_ctx"] = name, spec["chat"]["n_ctx"]
            return result

        cases: dict[str, dict] = {}
        # llama.cpp's default budget (4096 tokens) leaves 640x480 at the processor's 300 tokens; this
        # case also measures this device once for the cost model the default ("auto") cases read.
        cases["640x480@300"] = case("640x480 at 300 tokens", small, image_max_tokens=4096)
        # A phone photo in a fresh process on a fresh device (its own empty cost cache), the runtime's
        # defaults (f16 KV): the first ask is planned from the load-time calibration, the third from
        # the rates measured by the first; its peak RSS is the photo ask's at n_ctx 4096.
        cases["fresh"] = case("4032x3024, fresh process and device, runtime defaults (f16 KV): asks 1-3", photo,
                              repeats=3, kv_cache_type="f16", cost_cache_dir=str(work / "fresh-cost"))
        if setup.auto_mmproj is not None and setup.auto_mmproj[1] != setup.mmproj:
            q, path = setup.auto_mmproj
            cases["auto-projector"] = case(f"640x480 at 300 tokens, {q} projector (--mmproj-quant auto here)", small,
                                           image_max_tokens=4096, mmproj=str(path))
        if setup.must_show:
            if setup.transformers and setup.hf_dir is not None:
                cases["transformers"] = case("transformers bf16, 640x480 (300 tokens)", small, mode="transformers")
            return cases
        cases["640x480"] = case("640x480, defaults", small)
        cases["4032x3024"] = case("4032x3024 JPEG, defaults", photo)
        cases["attach"] = case("4032x3024: attach, then ask", photo, mode="attach")
        cases["disk-first"] = case("4032x3024, encoder cache on disk: first process", photo, repeats=1,
                                   encoder_cache_dir=str(disk_dir))
        cases["disk-second"] = case("4032x3024, encoder cache on disk: second process", photo, repeats=1,
                                    encoder_cache_dir=str(disk_dir))
        cases["fa-off"] = case("640x480 at 300 tokens, projector without flash attention", small,
                               image_max_tokens=4096, kv_cache_type="f16", flash_attn=False)
        projectors = dict(setup.projectors)
        if setup.mmproj_float is not None and setup.mmproj_float not in projectors.values():
            projectors["float"] = setup.mmproj_float  # the reference, e.g. an f32 conversion
        profiles = {q: case(f"encoder profile, {q} projector", small, mode="profile", repeats=1, mmproj=str(path),
                            image_max_tokens=4096, embeddings=str(work / f"embd-{q}.npy"))
                    for q, path in projectors.items()}
        if setup.mmproj_float is not None:
            ref_q = next(q for q, p in projectors.items() if p == setup.mmproj_float)
            ref_embd = np.load(profiles[ref_q]["embeddings"])
            for q, prof in profiles.items():
                prof["cosine_mean"], prof["cosine_worst"] = cosine_rows(np.load(prof["embeddings"]), ref_embd)
                prof["reference"] = ref_q
        for q, prof in profiles.items():
            prof["type"], prof["bytes"] = q, projectors[q].stat().st_size
            cases[f"profile-{q}"] = prof
        fast = fastest_projector(profiles)
        if fast is not None:
            # f16 KV: ggml's tiled CPU flash attention takes f16/f32 K and V only (q8_0 KV: 2.7x slower there)
            cases["fast"] = case(f"640x480 at 300 tokens, {fast} projector, weights not repacked, f16 KV", small,
                                 image_max_tokens=4096, mmproj=str(projectors[fast]), repack=False,
                                 kv_cache_type="f16")
        if setup.transformers and setup.hf_dir is not None:
            cases["transformers"] = case("transformers bf16, 640x480 (300 tokens)", small, mode="transformers")
    return cases


def transformers_ratio(ours: dict, hf: dict) -> str:
    """First and second ask of one case against transformers' first and second, at equal image tokens only."""
    if ours["image_tokens"] != hf["image_tokens"]:
        return f"{ours['name']}: not compared ({ours['image_tokens']} vs {hf['image_tokens']} image tokens)"
    a, b = ours["ttft_all_s"], hf["ttft_all_s"]
    cells = [f"{which} ask {a[i]:.2f} s vs {b[i]:.2f} s = {a[i] / b[i]:.2f}"
             for i, which in enumerate(("first", "second")) if i < len(a) and i < len(b)]
    return f"{ours['name']} (both {hf['image_tokens']} image tokens): " + "; ".join(cells)


def fidelity(c: dict) -> str:
    """Tokens per image and their share of the model's native budget (its processor at max_pixels)."""
    native = c.get("native_tokens")
    return f"{c['image_tokens']} ({c['image_tokens'] / native:.0%})" if native else str(c["image_tokens"])


def fastest_projector(profiles: dict[str, dict]) -> str | None:
    """The projector type with the fastest encode among those keeping every token's cosine >= FAST_MIN_COSINE."""
    kept = [q for q, p in profiles.items() if p.get("cosine_worst", 0.0) >= FAST_MIN_COSINE]
    return min(kept, key=lambda q: profiles[q]["encode_s"]) if kept else None


def profile_table(prof: dict) -> list[str]:
    rows = [OpRow(**r) for r in prof["rows"]]
    total = sum(r.seconds for r in rows) or 1.0
    lines = [f"Encoder profile ({prof['type']} projector, {prof['tokens']} tokens): preprocessing "
             f"{prof['preprocess_s']:.2f} s, encode {prof['encode_s']:.2f} s (node by node "
             f"{prof['profiled_s']:.2f} s)", "",
             "| stage | operation | nodes | s | share | GFLOP/s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rate = f"{r.gflop_s:.0f}" if r.gflop_s else ""
        lines.append(f"| {r.stage} | {r.op} | {r.nodes} | {r.seconds:.3f} | {100 * r.seconds / total:.1f}% | {rate} |")
    return lines


def projector_table(profiles: list[dict]) -> list[str]:
    lines = ["| projector | MB | encode s | flash attention s | weight matmuls s | matmul GFLOP/s | "
             "cosine to float: mean / worst token |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p in profiles:
        rows = [OpRow(**r) for r in p["rows"]]
        fa = sum(r.seconds for r in rows if r.op == "FLASH_ATTN_EXT")
        mm = [r for r in rows if r.op.startswith("MUL_MAT") and r.op != "MUL_MAT (activations)"]
        mm_s, mm_flops = sum(r.seconds for r in mm), sum(r.flops for r in mm)
        cos = (f"{p['cosine_mean']:.5f} / {p['cosine_worst']:.5f} (to {p['reference']})"
               if "cosine_mean" in p else "")
        lines.append(f"| {p['type']} | {p['bytes'] / 1e6:.0f} | {p['encode_s']:.2f} | {fa:.2f} | {mm_s:.2f} | "
                     f"{mm_flops / mm_s / 1e9 if mm_s else 0:.0f} | {cos} |")
    return lines


def image_bench_markdown(cases: dict, machine: str, settings: str = "") -> str:
    ref = cases["640x480@300"]
    lines = [
        f"### Images (edge-bench --images; {machine}; one run, each case a fresh process)", "",
        *([settings, ""] if settings else []),
        "| case | image tokens (of native) | encode s | prefill s | TTFT s | TTFT / 640x480@300 | peak RSS GB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    profiles = [c for k, c in cases.items() if k.startswith("profile-")]
    for key, c in cases.items():
        if key == "transformers" or key.startswith("profile-"):
            continue
        lines.append(f"| {c['name']} | {fidelity(c)} | {c['image_encode_s']:.2f} | {c['prefill_s']:.2f} | "
                     f"{c['ttft_s']:.2f} | {c['ttft_s'] / ref['ttft_s']:.2f} | {c['peak_rss_bytes'] / GB:.2f} |")
    fresh = cases.get("fresh")
    if fresh:
        asks = ", ".join(f"ask {i + 1}: {t} tokens, TTFT {s:.2f} s"
                         for i, (t, s) in enumerate(zip(fresh["image_tokens_all"], fresh["ttft_all_s"])))
        lines += ["", f"- Phone photo in a fresh process (rates at load: {fresh['rates_at_load']}, calibration "
                  f"{fresh['calibration_s']:.2f} s of the {fresh['load_s']:.1f} s load): {asks}; "
                  f"peak RSS {fresh['peak_rss_bytes'] / GB:.2f} GB at n_ctx {fresh.get('n_ctx', '')}."]
    lines += ["", f"- Encoder efficiency (640x480 at 300 tokens): encoder {ref['encoder_gflop_s']:.1f} GFLOP/s, "
              f"text prefill {ref['prefill_gflop_s']:.1f} GFLOP/s: ratio "
              f"{ref['encoder_gflop_s'] / ref['prefill_gflop_s']:.2f}."]
    if "fa-off" in cases:
        off = cases["fa-off"]
        lines.append(f"- Projector flash attention: encode {off['image_encode_s']:.2f} s without, "
                     f"{ref['image_encode_s']:.2f} s with ({off['image_encode_s'] / ref['image_encode_s']:.2f}x).")
    second = cases.get("disk-second")
    if second:
        lines.append(f"- Encoder cache on disk: the second process encoded {second['images_encoded']} image(s), "
                     f"{second['disk_cache_hits']} disk hit(s), image encode {second['image_encode_s']:.2f} s.")
    hf = cases.get("transformers")
    if hf:
        lines.append(f"- First-image TTFT at {hf['image_tokens']} image tokens against transformers bf16 (each a "
                     "fresh process; the first ask pays one-time set-up on both sides, the second is warm):")
        for key in ("640x480@300", "auto-projector", "fast"):
            if key in cases:
                lines.append("  - " + transformers_ratio(cases[key], hf))
    for key in ("640x480", "4032x3024"):
        if key not in cases:
            continue
        img = cases[key].get("image") or {}
        lines.append(f"- {cases[key]['name']}: {img.get('size')} from {img.get('source_size')}, {img.get('reason')}.")
    configured = next((p for p in profiles if p.get("mmproj") == ref.get("mmproj")), profiles[0] if profiles else None)
    if configured:
        lines += ["", *profile_table(configured), "", "Projector types (640x480 at 300 tokens, one warm encode each; "
                  "the flash attention and matmul columns from the node-by-node run):", "", *projector_table(profiles)]
    return "\n".join(lines) + "\n"
