"""A 10-second clip against one photo: frames, tokens, encode time, TTFT, follow-up TTFT, peak RSS.

    python benchmarks/video_clip.py MODEL.gguf MMPROJ.gguf [--seconds 10] [--size 640x480] [--kv f16]

Writes a 640x480 clip (30 fps, moving shapes) with PyAV, then runs two parties, each
in its own process (so peak RSS is its own), with VisionChat's default settings: a
first question about one 640x480 photo, and a first question about the clip; each is
followed by a second question on the same conversation (KV reuse). Prints one line per
party and the clip / photo ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTION = "What happens in this clip? Answer briefly."
FOLLOW_UP = "And what colour is the moving square?"


def write_clip(path: Path, seconds: float, width: int, height: int, fps: int = 30) -> Path:
    import av
    import numpy as np

    from edge_bench.scenario import bench_image

    background = np.asarray(bench_image(width, height, 0), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(int(seconds * fps)):
            frame = background.copy()
            x = int((width - 80) * i / (seconds * fps))
            frame[height // 2 - 40 : height // 2 + 40, x : x + 80] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def party(args: argparse.Namespace) -> dict:
    """One measured conversation in this process."""
    from edge_runtime import VisionChat
    from edge_bench.scenario import bench_image

    t0 = time.perf_counter()
    chat = VisionChat(args.model, args.mmproj, kv_cache_type=args.kv, threads=args.threads)
    load_s = time.perf_counter() - t0
    media: dict = {"videos": [args.clip]} if args.party == "video" else {"images": [bench_image(*args.wh, 0)]}
    out: dict = {"party": args.party, "load_s": load_s}
    if args.party == "video":
        t0 = time.perf_counter()
        clip = chat.load_video(args.clip)
        out.update(frames=len(clip.indices), groups=clip.n_groups, frame_size=f"{clip.width}x{clip.height}",
                   video_load_s=time.perf_counter() - t0)
    chat.ask(QUESTION, max_tokens=args.max_tokens, **media)
    s = chat.last_stats
    out.update(image_tokens=s.image_tokens, prompt_tokens=s.prompt_tokens, encode_s=s.image_encode_s,
               prefill_s=s.prefill_s, ttft_s=s.ttft_s)
    chat.ask(FOLLOW_UP, max_tokens=args.max_tokens)
    out.update(follow_up_ttft_s=chat.last_stats.ttft_s, follow_up_encoded=chat.last_stats.images_encoded,
               peak_rss_mb=chat.last_stats.peak_rss_bytes / 1e6)
    chat.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("mmproj")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--kv", default="f16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--party", choices=["photo", "video"], help=argparse.SUPPRESS)
    ap.add_argument("--clip", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.wh = tuple(int(v) for v in args.size.lower().split("x"))
    if args.party:
        print(json.dumps(party(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", args.seconds, *args.wh)
        results = {}
        for name in ("photo", "video"):
            cmd = [sys.executable, __file__, args.model, args.mmproj, "--party", name, "--clip", str(clip),
                   "--size", args.size, "--kv", args.kv, "--max-tokens", str(args.max_tokens)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    photo, video = results["photo"], results["video"]
    print(f"clip: {args.seconds:g} s {args.size} @ 30 fps; VisionChat defaults (KV {args.kv}, n_ctx 4096)")
    print(f"photo {args.size}: tokens {photo['image_tokens']}, encode {photo['encode_s']:.2f} s, "
          f"TTFT {photo['ttft_s']:.2f} s, follow-up TTFT {photo['follow_up_ttft_s']:.2f} s, "
          f"peak RSS {photo['peak_rss_mb']:.0f} MB")
    print(f"video: frames {video['frames']} ({video['groups']} groups of 2 at {video['frame_size']}), "
          f"tokens {video['image_tokens']}, decode+resize {video['video_load_s']:.2f} s, "
          f"encode {video['encode_s']:.2f} s, TTFT {video['ttft_s']:.2f} s, "
          f"follow-up TTFT {video['follow_up_ttft_s']:.2f} s (re-encoded {video['follow_up_encoded']}), "
          f"peak RSS {video['peak_rss_mb']:.0f} MB")
    print(f"ratios video / photo: tokens {video['image_tokens'] / photo['image_tokens']:.2f}, "
          f"encode {video['encode_s'] / photo['encode_s']:.2f}, TTFT {video['ttft_s'] / photo['ttft_s']:.2f}, "
          f"peak RSS {video['peak_rss_mb'] / photo['peak_rss_mb']:.2f}; "
          f"follow-up / first TTFT (video) {video['follow_up_ttft_s'] / video['ttft_s']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
