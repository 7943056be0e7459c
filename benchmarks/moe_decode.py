"""What a 30B-A3B user can expect: decode speed of Qwen3-VL-30B-A3B's layer shapes against the dense 2B's.

    python benchmarks/moe_decode.py [--layers 2,4] [--quant q4_0] [--decode 32] [--repeats 5] [--threads 1]

Builds text GGUFs with the published layer shapes (tests/data's config.json files: 30B-A3B's 128
experts of 768, top-8, 32 query / 4 KV heads, against the 2B's 6144-wide dense FFN, 16 / 8 heads)
but only a few blocks, so they fit a small machine (4 MoE blocks at q4_0: ~1.9 GB). No torch
weights and no quantizer: every weight is written as random q4_0 / q8_0 blocks (a fixed small
scale, random quants; norms 1, the router random), which llama.cpp decodes exactly as fast as
trained ones. Both models of one depth then run in one process through VisionChat (greedy, text
only), answering in turn, so a busy machine's load changes fall on both alike.

Printed per model: decode tok/s, active parameters per token (what one token multiplies: every
weight of a dense model, the router and top-k of the experts of an MoE one, plus the output
layer; token embeddings are a row lookup), and their product, active parameters per second; then
the MoE / dense ratios at each depth, and the per-block cost from the difference of two depths
(the output layer and per-token overhead cancel), which predicts the full models' decode rates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO / "tests" / "data"
MODELS = {"2b": DATA / "qwen3-vl-2b-instruct.config.json", "30b-a3b": DATA / "qwen3-vl-30b-a3b-instruct.config.json"}
FULL_LAYERS = {"2b": 28, "30b-a3b": 48}  # the published models' depths (tests/data)
PROMPT = "Write a long story about a lighthouse keeper."
SCALE = 0.004  # block scale: random quants then give unit-scale activations through a 2048-wide row


def config_with_layers(name: str, layers: int) -> dict:
    config = json.loads(MODELS[name].read_text())
    config["text_config"]["num_hidden_layers"] = layers
    # deepstack feeds image features into the first blocks only (unused by text decoding); fewer blocks, fewer taps
    vision = config["vision_config"]
    vision["deepstack_visual_indexes"] = vision["deepstack_visual_indexes"][:layers - 1]
    return config


def write_model(name: str, layers: int, quant: str, out: Path) -> Path:
    """A text GGUF with `name`'s shapes and `layers` blocks of random `quant` blocks (norms 1, router random)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as G

    from convert.checkpoint import Checkpoint
    from convert.pipeline import spec_for, write_file_metadata
    from convert.shapes import model_shapes
    from edge_models import family_for_gguf
    from quant.rules import allows_quantization

    if out.exists():
        return out
    qtype = {"q4_0": G.Q4_0, "q8_0": G.Q8_0}[quant]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    config = config_with_layers(name, layers)
    synthetic = family_for_gguf().module("synthetic")  # the default family's small tokenizer (the vocab is padded)
    rng = np.random.default_rng(layers)
    with tempfile.TemporaryDirectory() as tok_dir:
        synthetic.write_tokenizer(Path(tok_dir), synthetic.train_tokenizer(300))
        text = next(o for o in spec_for(config).outputs if o.role == "text")
        tensors = model_shapes(config).tensors["text"]
        partial = out.with_suffix(".partial")
        w = gguf.GGUFWriter(partial, text.gguf_arch)
        write_file_metadata(w, text, Checkpoint(Path(tok_dir), config, {}))
        plan = []
        for t in tensors:
            kind = qtype if allows_quantization(t.name, len(t.shape)) else G.F32
            nbytes = (int(np.prod(t.shape)) // block * block_bytes) if kind == qtype else 4 * int(np.prod(t.shape))
            w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), nbytes, raw_dtype=kind)
            plan.append((t, kind, nbytes))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        scale = np.frombuffer(np.float16(SCALE).tobytes(), dtype=np.uint8)
        for t, kind, nbytes in plan:
            if kind == G.F32:
                n = int(np.prod(t.shape))
                data = np.ones(n, np.float32) if t.name.endswith("norm.weight") else \
                    rng.standard_normal(n, dtype=np.float32) * 0.02
            else:  # blocks of (f16 scale, quants): random quants, one scale
                data = rng.integers(0, 256, size=(nbytes // block_bytes, block_bytes), dtype=np.uint8)
                data[:, :2] = scale
                if qtype == G.Q8_0:  # int8 quants: keep them small so activations stay bounded
                    data[:, 2:] = (data[:, 2:].astype(np.int16) % 32 - 16).astype(np.int8).view(np.uint8)
            w.write_tensor_data(data.reshape(-1))
        w.close()
        partial.rename(out)
    return out


def active_params(path: Path) -> tuple[int, int]:
    """(active parameters per token, all parameters), from the file's tensor table and expert keys."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    used = r.fields.get(f"{arch}.expert_used_count")
    count = r.fields.get(f"{arch}.expert_count")
    k_of_n = (int(used.parts[-1][0]) / int(count.parts[-1][0])) if used is not None else 1.0
    tied = not any(t.name == "output.weight" for t in r.tensors)
    total = active = 0
    for t in r.tensors:
        n = int(t.n_elements)
        total += n
        if t.name == "token_embd.weight" and not tied:
            continue  # a row lookup, not a matmul (a tied model's output layer multiplies it)
        active += n * k_of_n if "_exps." in t.name else n
    return int(active), total


def answer_rate(chat, decode: int) -> float | None:
    chat.reset()
    chat.ask(PROMPT, max_tokens=decode, temperature=0)
    s = chat.last_stats
    return (s.generated_tokens - 1) / s.decode_s if s.generated_tokens >= 3 and s.decode_s > 0 else None


def pair(dense: str, moe: str, decode: int, repeats: int, threads: int) -> None:
    """Both models of one depth in this process, answering in turn (dense, MoE, dense, ...) so that a load
    change on a busy machine falls on both; prints one JSON line with each answer's rate."""
    from edge_runtime import VisionChat

    chats = [VisionChat(path, None, n_ctx=512, threads=threads) for path in (dense, moe)]
    try:
        for chat in chats:
            chat.ask("Hi", max_tokens=4, temperature=0)  # warm-up
        rates: list[list[float | None]] = [[], []]
        for _ in range(repeats):
            for i, chat in enumerate(chats):
                rates[i].append(answer_rate(chat, decode))
        print(json.dumps({"dense": rates[0], "moe": rates[1], "weights": chats[1].engine.weights_how}))
    finally:
        for chat in chats:
            chat.close()


def run_pair(dense: Path, moe: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--pair", str(dense), str(moe), "--decode", str(args.decode), "--repeats",
           str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{dense.name} / {moe.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4", help="Block counts to build and time (two give the per-block cost).")
    ap.add_argument("--quant", default="q4_0", choices=["q4_0", "q8_0"])
    ap.add_argument("--decode", type=int, default=32, help="Greedy tokens per answer.")
    ap.add_argument("--repeats", type=int, default=5, help="Answers per model, the two models in turn.")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (1 keeps a busy machine's descheduled threads out of the figures).")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qwen3-vl-edge" / "bench-moe",
                    help="Where the built GGUFs are kept between runs.")
    ap.add_argument("--pair", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pair:
        pair(*args.pair, args.decode, args.repeats, args.threads)
        return

    depths = sorted({int(x) for x in args.layers.split(",")})
    if depths[0] < 2:
        raise SystemExit("--layers: at least 2 blocks (one deepstack tap needs a block after it)")
    args.cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for layers in depths:
        for name in MODELS:
            t0 = time.perf_counter()
            files[name, layers] = write_model(name, layers, args.quant,
                                              args.cache / f"{name}-{layers}L-{args.quant}.gguf")
            print(f"# {files[name, layers].name}: {files[name, layers].stat().st_size / 1e9:.2f} GB "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rate, ratio = {}, {}
    for layers in depths:
        r = run_pair(files["2b", layers], files["30b-a3b", layers], args)
        pairs = [(d, m) for d, m in zip(r["dense"], r["moe"]) if d and m]
        if not pairs:
            raise SystemExit(f"no decode rate at {layers} blocks: the answers were too short ({r})")
        rate["2b", layers] = statistics.median(d for d, _ in pairs)
        rate["30b-a3b", layers] = statistics.median(m for _, m in pairs)
        ratio[layers] = statistics.median(m / d for d, m in pairs)  # answer by answer: load drift cancels
        print(f"# {layers} blocks: 2b {[round(d, 1) for d, _ in pairs]} tok/s, 30b-a3b "
              f"{[round(m, 1) for _, m in pairs]} tok/s ({r['weights']})", file=sys.stderr)

    params = {key: active_params(path) for key, path in files.items()}
    print(f"Decode, {args.quant}, {args.threads} thread(s), {args.decode} greedy tokens per answer, medians of "
          f"{args.repeats} answers per model, the two models answering in turn in one process: read the ratios "
          "(a busy machine moves the rates, much less the ratios).\n")
    print("| model | blocks | file GB | decode tok/s | active params/token (M) | active Mparams/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, layers), path in files.items():
        active, _ = params[name, layers]
        print(f"| {name} | {layers} | {path.stat().st_size / 1e9:.2f} | {rate[name, layers]:.1f} | "
              f"{active / 1e6:.0f} | {rate[name, layers] * active / 1e6:,.0f} |")
    print("\n| blocks | tok/s 30b-a3b / 2b | active params 30b-a3b / 2b | active params/s 30b-a3b / 2b |")
    print("| ---: | ---: | ---: | ---: |")
    for layers in depths:
        m, d = ("30b-a3b", layers), ("2b", layers)
        print(f"| {layers} | {ratio[layers]:.2f} | {params[m][0] / params[d][0]:.2f} | "
              f"{ratio[layers] * params[m][0] / params[d][0]:.2f} |")
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        per_block = {n: (1 / rate[n, hi] - 1 / rate[n, lo]) / (hi - lo) for n in MODELS}
        fixed = {n: 1 / rate[n, lo] - per_block[n] * lo for n in MODELS}
        if min(per_block.values()) <= 0 or min(fixed.values()) <= 0:
            print(f"\nNo per-block figure: the deeper models did not decode slower ({rate}); the machine was too "
                  "busy for a difference of two depths, rerun it quiet.")
            return
        print(f"\nPer block (from {lo} vs {hi} blocks): 30b-a3b block / 2b block = "
              f"{per_block['30b-a3b'] / per_block['2b']:.2f} x the time; output layer and overhead: "
              f"30b-a3b / 2b = {fixed['30b-a3b'] / fixed['2b']:.2f}.")
        full = {n: 1 / (fixed[n] + per_block[n] * FULL_LAYERS[n]) for n in MODELS}
        print(f"Predicted full depth ({FULL_LAYERS['30b-a3b']} vs {FULL_LAYERS['2b']} blocks): 30b-a3b decodes at "
              f"{full['30b-a3b'] / full['2b']:.2f} x the 2B's rate on this machine.")


if __name__ == "__main__":
    main()
