"""Resuming a conversation: restoring its saved KV cache vs evaluating it again.

    python benchmarks/conversation_resume.py MODEL.gguf MMPROJ.gguf [--kv q8_0] [--words 380] [--threads 2]

One 640x480 photo plus a long question (about 2k tokens in all) is answered by
a fresh VisionChat and saved (`chat.save`). Then, each in a fresh VisionChat
(own llama context, empty encoder cache), the same follow-up question is asked
(a) after `chat.restore(file)` and (b) by sending the whole conversation again
(`generate(history + question)`: the vision encoder and the prefill run again).
Prints the file size, save/restore times, follow-up TTFTs and their ratio; the
greedy follow-up answers must be identical.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime import VisionChat  # noqa: E402
from edge_common.manifest import file_sha256  # noqa: E402

GREEDY = {"temperature": 0.0}
WORDS = ("river stone market window orange seven quietly engine paper garden north silver question "
         "bridge morning copper lantern winter harbour signal forest yellow camera island").split()


def photo(width: int = 640, height: int = 480) -> Image.Image:
    """A photo-like test image: smooth gradients, shapes and noise (deterministic)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height)) + 64], -1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    img[120:300, 200:420] = (200, 40, 40)
    return Image.fromarray(img)


def long_question(n_words: int) -> str:
    rng = random.Random(0)
    notes = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return f"Here are my field notes: {notes}. Which of these things can you see in the photo?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("mmproj")
    ap.add_argument("--kv", default="q8_0")
    ap.add_argument("--words", type=int, default=380)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    settings = dict(n_ctx=args.n_ctx, kv_cache_type=args.kv, threads=args.threads)
    follow_up = "Which colour is the rectangle?"
    out: dict = {"kv": args.kv, "threads": args.threads, "n_ctx": args.n_ctx}

    t0 = time.perf_counter()
    file_sha256(args.model), file_sha256(args.mmproj)
    out["hash_model_files_s"] = time.perf_counter() - t0  # once per process, then cached

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversation.edgeconv"
        with VisionChat(args.model, args.mmproj, **settings) as chat:
            chat.ask(long_question(args.words), images=[photo()], max_tokens=8, **GREEDY)
            s = chat.last_stats
            out.update(conversation_tokens=chat.engine.seq_state().n_tokens, image_tokens=s.image_tokens,
                       first_turn_ttft_s=s.ttft_s)
            history = [dict(m) for m in chat.history]
            t0 = time.perf_counter()
            out["file_bytes"] = chat.save(path)
            out["save_s"] = time.perf_counter() - t0
            out["kv_bytes_per_token"] = chat.engine.kv_used_bytes() / max(1, chat.engine.seq_state().n_tokens)
        print("first turn and save:", json.dumps(out), flush=True)

        with VisionChat(args.model, args.mmproj, **settings) as chat:
            t0 = time.perf_counter()
            chat.restore(path)
            out["restore_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            restored_answer = chat.ask(follow_up, max_tokens=8, **GREEDY)
            out["restored_follow_up_ttft_s"] = chat.last_stats.ttft_s
            out["restored_evaluated_tokens"] = chat.last_stats.evaluated_tokens
        print("restored follow-up:", json.dumps(out), flush=True)

        with VisionChat(args.model, args.mmproj, **settings) as chat:
            messages = [{"role": m["role"], "content": m["content"]} for m in history]
            messages.append({"role": "user", "content": [{"type": "text", "text": follow_up}]})
            messages[0]["content"] = [{"type": "image", "image": photo()} if p.get("type") == "image" else p
                                      for p in messages[0]["content"]]
            again_answer = chat.generate(messages, max_tokens=8, **GREEDY)
            out["reevaluated_follow_up_ttft_s"] = chat.last_stats.ttft_s
            out["reevaluated_tokens"] = chat.last_stats.evaluated_tokens

    out["same_answer"] = restored_answer == again_answer
    resume = out["restore_s"] + out["restored_follow_up_ttft_s"]
    out["resume_speedup"] = out["reevaluated_follow_up_ttft_s"] / resume
    print(json.dumps(out, indent=2))
    print(f"\n{Path(args.model).name} + {Path(args.mmproj).name}, KV {args.kv}, {args.threads} thread(s): "
          f"conversation of {out['conversation_tokens']} tokens ({out['image_tokens']} image tokens, 640x480); "
          f"file {out['file_bytes'] / 1e6:.1f} MB; save {out['save_s']:.2f} s; "
          f"restore {out['restore_s']:.2f} s + follow-up TTFT {out['restored_follow_up_ttft_s']:.2f} s "
          f"vs re-evaluating {out['reevaluated_follow_up_ttft_s']:.1f} s "
          f"({out['reevaluated_tokens']} tokens): {out['resume_speedup']:.0f}x faster; "
          f"answers identical: {out['same_answer']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
