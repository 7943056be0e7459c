"""`make demo`: build a tiny random-weight Qwen3-VL checkpoint, convert it, show what was written.

A random-weight model's words are noise; the point is the whole path on any
machine without downloading anything. See README for a real checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

from convert import convert_checkpoint
from edge_models import family_for_gguf

DEMO_DIR = Path(".cache/demo")


def main() -> None:
    ckpt = DEMO_DIR / "qwen3-vl-tiny"
    if not (ckpt / "config.json").is_file():
        print(f"building a tiny synthetic Qwen3-VL checkpoint in {ckpt} ...", file=sys.stderr)
        synthetic = family_for_gguf().module("synthetic")  # the default family: Qwen3-VL
        synthetic.build_checkpoint(ckpt, synthetic.SyntheticSpec())
    out = DEMO_DIR / "gguf"
    manifest = convert_checkpoint(ckpt, out, "f16", overwrite=True)
    print(f"converted {ckpt} -> {out}")
    for role in ("text", "mmproj"):
        e = manifest[role]
        print(f"  {role:7s} {out / e['path']}  type={e['type']}  {e['bytes']:,} bytes  sha256={e['sha256'][:16]}...")
    print(f"  manifest {out / 'manifest.json'}")
    from edge_runtime.cli import demo as runtime_demo

    runtime_demo.run(out)


if __name__ == "__main__":
    main()
