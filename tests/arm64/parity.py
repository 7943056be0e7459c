"""Same answers on ARM64 as on x86: greedy tokens, logits, image embeddings, a video, a saved chat.

    python parity.py prepare GGUF_ROOT                    # on x86 (torch): edge-convert one checkpoint per type
    python parity.py record  GGUF_ROOT OUT_DIR            # on x86: the reference
    python parity.py compare GGUF_ROOT OUT_DIR PROFILE    # in the arm64 root, under QEMU_CPU=PROFILE
    python parity.py table   OUT_DIR PROFILE...           # the parity table

GGUF_ROOT holds one edge-convert output folder per weight type (written on x86). Every run
writes OUT_DIR/<label>.npz (arrays) and OUT_DIR/<label>.json (facts: ggml's CPU features as
llama_print_system_info reports them, the CPU backend variant ggml loaded, the buffer types
the weights went to). Uses only the runtime (no torch): it runs where a Pi user's install does.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

TYPES = ("f16", "q8_0", "q4_0", "q4_k_m", "iq4_nl")
KVS = ("f16", "q8_0")
STEPS = 8
TEXT_PROMPT = "<|im_start|>user\nDescribe the weather on Mars in one sentence.<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PROMPT = "<|im_start|>user\n{marker}What is in this picture?<|im_end|>\n<|im_start|>assistant\n"
LOGIT_TOL = 1e-2  # where two kernels part at a near tie, the logits there must agree this closely
COS_MIN = 0.999


def prepare(gguf_root: Path) -> None:
    """A synthetic checkpoint with 256-wide rows (so k-quants and iq4_nl keep their own types and
    llama.cpp repacks them), converted by edge-convert once per type."""
    import subprocess

    from edge_models.qwen3vl.synthetic import SyntheticSpec, TextShape, VisionShape, build_checkpoint

    spec = SyntheticSpec(
        text=TextShape(hidden=256, ff=512, layers=4, heads=4, kv_heads=1, head_dim=64, mrope_section=(8, 12, 12),
                       max_positions=4096),
        vision=VisionShape(depth=2, hidden=256, ff=512, heads=4, patch=16, merge=2, num_positions=256, deepstack=(0,)),
        seed=3,
    )
    ckpt = build_checkpoint(gguf_root / "checkpoint", spec)
    for q in TYPES:
        subprocess.run([sys.executable, "-m", "edge_app.cli", str(ckpt), "--quant", q, "-o", str(gguf_root / q), "-q"],
                       check=True, stdout=subprocess.DEVNULL)


def _pair(out_dir: Path) -> tuple[Path, Path]:
    m = json.loads((out_dir / "manifest.json").read_text())
    return out_dir / m["text"]["path"], out_dir / m["mmproj"]["path"]


def _greedy(ctx, pos: int) -> tuple[list[int], np.ndarray]:
    """STEPS greedy tokens from the logits left by the last decode, with each step's logits."""
    tokens, rows = [], []
    for i in range(STEPS):
        row = ctx.logits(-1).astype(np.float32)
        tok = int(np.argmax(row))
        tokens.append(tok)
        rows.append(row)
        ctx.decode([tok], pos + i)
    return tokens, np.stack(rows)


def _eval_encoded(ctx, chunks: list, embds: list) -> int:
    """The image prompt evaluated from embeddings encoded once per weight type (under an emulated
    SVE core an encode is most of a profile's time), the way the runtime decodes a cached image:
    text chunks as tokens, image chunks as an embeddings batch at mtmd's decoder positions."""
    from edge_llama import EmbeddingBatch, chunk_text_tokens, image_positions
    from edge_llama.projector import M

    n_past = 0
    for chunk, embd in zip(chunks, embds):
        if embd is None:
            toks = chunk_text_tokens(chunk)
            ctx.decode(toks, n_past)
            n_past += len(toks)
        else:
            batch = EmbeddingBatch(len(embd))
            batch.set(embd, image_positions(chunk, n_past, mrope=True))
            ctx.decode_batch(batch)
            batch.close()
            n_past += int(M.mtmd_input_chunk_get_n_pos(chunk))
    return n_past


def run_type(text: Path, mmproj: Path, image: np.ndarray) -> tuple[dict, dict]:
    """One weight type: the image embeddings once, then greedy text and image answers per KV type."""
    from edge_llama import (FLASH_ATTN_AUTO, FLASH_ATTN_ON, Context, ContextOptions, LoadOptions, Model, Projector,
                            ProjectorOptions, chunk_is_text, kv_type)

    facts, arrays = {}, {}
    model = Model(text, LoadOptions())
    facts["weights"] = model.how
    facts["buffers"] = [ln.strip() for ln in model.load_log if "buffer size" in ln]
    # ggml-cpu/repack.cpp logs the interleaved layout it picked for each weight ("... with q4_0_4x8")
    facts["repack"] = sorted({ln.rsplit(" with ", 1)[1].strip() for ln in model.load_log if "repack tensor" in ln})
    proj = Projector(mmproj, model, ProjectorOptions())
    chunks = proj.tokenize(IMAGE_PROMPT.format(marker=proj.marker), [image])
    embds = [None if chunk_is_text(c) else proj.encode(c) for c in chunks]
    arrays["image_embd"] = np.concatenate([e for e in embds if e is not None])
    toks = model.tokenize(TEXT_PROMPT, parse_special=True)
    for kv in KVS:
        t = int(kv_type(kv).ggml_type)
        fa = FLASH_ATTN_ON if kv != "f16" else FLASH_ATTN_AUTO
        with Context(model, ContextOptions(n_ctx=1024, type_k=t, type_v=t, flash_attn=fa)) as ctx:
            ctx.decode(toks, 0)
            arrays[f"{kv}/text_tokens"], arrays[f"{kv}/text_logits"] = _greedy(ctx, len(toks))
            ctx.clear()
            n_past = _eval_encoded(ctx, list(chunks), embds)
            arrays[f"{kv}/image_tokens"], arrays[f"{kv}/image_logits"] = _greedy(ctx, n_past)
    for obj in (chunks, proj, model):
        obj.close()
    return facts, arrays


def chat_checks(pair_dir: Path, out: Path, label: str, frames: list, conv: Path, record: bool) -> dict:
    """A video clip's answer and a conversation saved on x86 restored here (f16 weights, f16 KV)."""
    from edge_runtime import SavedConversationError, VisionChat

    greedy = dict(max_tokens=STEPS, temperature=0.0)
    facts = {}
    with VisionChat.from_dir(pair_dir, n_ctx=2048) as chat:
        facts["video_answer"] = chat.ask("What happens in this clip?", videos=[frames], **greedy)
    with VisionChat.from_dir(pair_dir, n_ctx=2048) as chat:
        if record:
            chat.ask("Name a colour.", **greedy)
            chat.save(conv)
            facts["conversation_answer"] = chat.ask("And another one?", **greedy)
        else:
            try:
                chat.restore(conv)
                facts["conversation_answer"] = chat.ask("And another one?", **greedy)
            except SavedConversationError as exc:
                facts["conversation_refused"] = str(exc)
    return facts


def system_facts() -> dict:
    from edge_llama import ensure_backend, system_info
    from edge_llama.ggml_devices import _mapped_paths

    ensure_backend()
    variant = sorted({Path(p).name for p in _mapped_paths() if Path(p).name.startswith("libggml-cpu")})
    return {"system_info": system_info()[1], "cpu_backend": variant}


def main_run(gguf_root: Path, out: Path, label: str, record: bool) -> None:
    from edge_bench.scenario import bench_image

    out.mkdir(parents=True, exist_ok=True)
    image = np.asarray(bench_image(256, 192, 0).convert("RGB"))
    frames = [bench_image(128, 96, s) for s in range(4)]
    facts = {"label": label, **system_facts(), "runs": {}}
    print(f"[{label}] {facts['system_info']}\n[{label}] CPU backend loaded: {facts['cpu_backend'] or 'built in'}", flush=True)
    arrays = {}
    t0 = time.time()
    for q in TYPES:
        f, a = run_type(*_pair(gguf_root / q), image)
        facts["runs"][q] = f
        arrays.update({f"{q}/{k}": v for k, v in a.items()})
        print(f"[{label}] {q}: weights {f['weights']}; repacked as {', '.join(f['repack']) or 'nothing'}; "
              + "; ".join(" ".join(b.split()) for b in f["buffers"]), flush=True)
    facts.update(chat_checks(gguf_root / "f16", out, label, frames, out / "conversation.x86.bin", record))
    facts["seconds"] = round(time.time() - t0, 1)
    np.savez(out / f"{label}.npz", **arrays)
    (out / f"{label}.json").write_text(json.dumps(facts, indent=1))


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-30)).min())


def compare(ref: dict, ref_facts: dict, got: dict, got_facts: dict, q: str, kv: str) -> dict:
    row = {}
    for what in ("text", "image"):
        rt, gt = ref[f"{q}/{kv}/{what}_tokens"], got[f"{q}/{kv}/{what}_tokens"]
        same = bool((rt == gt).all())
        part = int(np.argmax(rt != gt)) if not same else None
        # up to and at the first differing step the two runs saw the same tokens: their logits compare
        upto = STEPS if same else part + 1
        diff = float(np.abs(ref[f"{q}/{kv}/{what}_logits"][:upto] - got[f"{q}/{kv}/{what}_logits"][:upto]).max())
        at_part = float(np.abs(ref[f"{q}/{kv}/{what}_logits"][part] - got[f"{q}/{kv}/{what}_logits"][part]).max()) \
            if part is not None else None
        row[what] = {"same": same, "part": part, "max_logit_diff": diff, "logit_diff_at_part": at_part}
    row["cos_min"] = _cos_min(ref[f"{q}/image_embd"], got[f"{q}/image_embd"])
    return row


def table(out: Path, profiles: list[str]) -> int:
    ref = np.load(out / "x86.npz")
    ref_facts = json.loads((out / "x86.json").read_text())
    bad = 0
    lines = ["| type | KV | profile | text tokens same | image tokens same | max logit diff (to where they part) | "
             "embedding cosine min |", "| --- | --- | --- | --- | --- | ---: | ---: |"]
    extra = []
    for p in profiles:
        got = np.load(out / f"{p}.npz")
        facts = json.loads((out / f"{p}.json").read_text())
        extra.append(f"{p}: CPU backend {', '.join(facts['cpu_backend']) or 'built in'} | {facts['system_info']}")
        for q in TYPES:
            for kv in KVS:
                r = compare(ref, ref_facts, got, facts, q, kv)
                diff = max(r["text"]["max_logit_diff"], r["image"]["max_logit_diff"])

                def cell(w):
                    return "yes" if r[w]["same"] else f"no (step {r[w]['part']}, {r[w]['logit_diff_at_part']:.2e})"
                lines.append(f"| {q} | {kv} | {p} | {cell('text')} | {cell('image')} | {diff:.2e} | {r['cos_min']:.6f} |")
                parted_far = any(not r[w]["same"] and r[w]["logit_diff_at_part"] > LOGIT_TOL for w in ("text", "image"))
                bad += int(parted_far or r["cos_min"] < COS_MIN)
        layouts = {q: ", ".join(facts["runs"][q]["repack"]) or "none" for q in TYPES}
        extra.append(f"{p}: repacked layouts " + "; ".join(f"{q} -> {v}" for q, v in layouts.items())
                     + f" (weights: {facts['runs']['q4_0']['weights']})")
        v_ok = facts.get("video_answer") == ref_facts["video_answer"]
        c = facts.get("conversation_answer")
        conv = ("restored, same answer" if c == ref_facts["conversation_answer"] else f"restored, answer differs: {c!r}") \
            if c is not None else f"refused: {facts.get('conversation_refused')}"
        extra.append(f"{p}: video answer {'same as x86' if v_ok else 'differs: ' + repr(facts.get('video_answer'))}; "
                     f"x86 conversation {conv}; {facts['seconds']} s")
        bad += int(not v_ok) + int(c is not None and c != ref_facts["conversation_answer"])
    print("\n".join(lines))
    print("\n".join(extra))
    print(f"x86 reference: {ref_facts['system_info']}")
    print(f"parity: {'all within bounds' if not bad else f'{bad} row(s) out of bounds'} "
          f"(tokens identical or parting where logits differ by <= {LOGIT_TOL}; cosine >= {COS_MIN})")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(Path(sys.argv[2]))
    elif cmd == "record":
        main_run(Path(sys.argv[2]), Path(sys.argv[3]), "x86", True)
    elif cmd == "compare":
        main_run(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], False)
    elif cmd == "table":
        sys.exit(table(Path(sys.argv[2]), sys.argv[3:]))
    else:
        sys.exit(__doc__)
