"""`edge-convert`: Hugging Face Qwen3-VL checkpoint -> GGUF pair + manifest."""
from __future__ import annotations

import json
from pathlib import Path

import click

from convert import convert_checkpoint
from edge_common import cli_options as flags
from edge_common.cli_options import CONTEXT, refusals
from edge_common.floats import FLOAT_TYPES
from edge_runtime.core.options import EngineOptions


PROG = "edge-convert"
ENGINE = EngineOptions()  # --plan sizes memory for the runtime's defaults unless told otherwise


@click.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="Output directory for the GGUF files and manifest.json.")
@click.option("--quant", default="f16", show_default=True,
              help=f"Text model type: {', '.join(FLOAT_TYPES)} or a llama.cpp quantization (q8_0, q6_k, q4_k_m, "
                   "iq4_xs, iq2_xxs, ...; --plan lists them all).")
@click.option("--mmproj-quant", default=None,
              help="Projector type: f32 f16 bf16 q8_0 q6_k q5_k q4_k q4_0, or auto: the fastest here that keeps the "
                   "image (bf16 on a GPU or a CPU with AVX-512 BF16, else q6_k) (default: q8_0 for a quantized "
                   "text model, else the text model's float type).")
@click.option("--imatrix", default=None, metavar="auto|FILE",
              help="Importance matrix: 'auto' computes one with the reference model over images and prompts "
                   "(saved as OUT/imatrix.gguf); FILE is one from llama-imatrix. Required for iq1/iq2/iq3 types.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="With --imatrix auto: a folder of images and a prompts.txt to calibrate on.")
@click.option("--keep-f16", is_flag=True, help="Keep the f16 intermediate files of a quantized conversion.")
@click.option("--report", is_flag=True,
              help="Measure the quantized pair against f16 (KL divergence, top-1, image cosine) into manifest.json.")
@click.option("--plan", is_flag=True, help="Print file sizes and runtime memory of every type, then exit.")
@flags.ctx_size(ENGINE.n_ctx, "Context length --plan sizes the KV cache for.")
@flags.cache_types("f16", "f16")  # the runtime's KV type when no tuned one is stored
@flags.rpc_flags("With --plan: also split --quant over this machine and these edge-rpc-worker processes, by "
                 "their free memory (or --tensor-split), and say what fits where.")
@flags.options(
    click.option("--cpu-moe", "-cmoe", "cpu_moe", is_flag=True,
                 help="With --plan --rpc: keep every MoE expert weight on this machine."),
    click.option("--n-cpu-moe", "-ncmoe", "n_cpu_moe", type=click.IntRange(min=0), default=None, metavar="N",
                 help="With --plan --rpc: keep the MoE experts of the first N blocks on this machine [default: the "
                      "fewest that let the workers' share fit, as the runtime chooses]."))
@flags.image_latency(ENGINE.image_latency_s, "With --plan: seconds of image encode + prefill the image budgets "
                     "of detail auto aim for (edge-chat's --image-latency).")
@flags.threads("Threads for quantizing [default: all cores].")
@click.option("--name", default=None, help="File-name stem (default: MODEL_DIR's name).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the manifest.")
def main(model_dir: Path, out_dir: Path, quant: str, mmproj_quant: str | None, imatrix: str | None,
         calibration: Path | None, keep_f16: bool, report: bool, plan: bool, n_ctx: int, kv_cache_type_k: str,
         kv_cache_type_v: str, image_latency_s: float, rpc_servers: tuple[str, ...] | None,
         tensor_split: tuple[float, ...] | None, cpu_moe: bool, n_cpu_moe: int | None, threads: int | None,
         name: str | None, overwrite: bool, quiet: bool) -> None:
    """Convert the Hugging Face Qwen3-VL checkpoint in MODEL_DIR into a llama.cpp text GGUF,
    a multimodal projector GGUF and OUT/manifest.json."""
    quant, mmproj_quant = quant.lower(), mmproj_quant and mmproj_quant.lower()
    if mmproj_quant == "auto":
        from edge_llama.hardware import fastest_projector_type, this_cpuinfo
        from edge_llama.offload import gpu_offload_available

        mmproj_quant, why = fastest_projector_type(this_cpuinfo(), gpu_offload_available())
        click.echo(f"{PROG}: --mmproj-quant auto: {mmproj_quant} ({why})", err=True)
    with refusals(PROG):
        if tensor_split and not rpc_servers:  # without workers there is one device: nothing to split
            flags.fail(PROG, "--tensor-split gives each device's share of the layers: this machine first, then "
                             "each --rpc worker; give --rpc HOST:PORT[,...] too")
        if plan:
            from convert.shapes import model_shapes
            from quant.estimate import format_plan, plan_table

            from edge_runtime.vision.disk_cache import user_cache_dir
            from .image_plan import PlanDevice, image_budget_plan

            shapes = model_shapes(model_dir)
            rows = plan_table(shapes, n_ctx, kv_cache_type_k, mmproj_quant=mmproj_quant, kv_type_v=kv_cache_type_v)
            click.echo(format_plan(rows))
            click.echo(image_budget_plan(model_dir, shapes, n_ctx, quant, mmproj_quant, latency_s=image_latency_s,
                                         cache_dir=user_cache_dir(), device=PlanDevice.this_machine()))
            if rpc_servers:
                moe = flags.expert_settings({"cpu_moe": cpu_moe, "n_cpu_moe": n_cpu_moe})["n_cpu_moe"]
                click.echo(split_plan(shapes, quant, mmproj_quant, n_ctx, kv_cache_type_k,
                                      rpc_servers, tensor_split, moe))
            return
        if rpc_servers or tensor_split or cpu_moe or n_cpu_moe is not None:
            flags.fail(PROG, "--rpc, --tensor-split, --cpu-moe and --n-cpu-moe go with --plan")
        from .pipeline import QuantizeOptions, convert_quantized, needs_quant_pipeline

        if needs_quant_pipeline(quant, mmproj_quant, imatrix, report) or keep_f16 or calibration is not None:
            manifest = convert_quantized(model_dir, out_dir, QuantizeOptions(
                quant, mmproj_quant, imatrix, calibration, keep_f16, report, overwrite, not quiet, name, threads or 0))
        else:
            manifest = convert_checkpoint(model_dir, out_dir, quant, mmproj_quant=mmproj_quant,
                                          overwrite=overwrite, progress=not quiet, name=name)
    if not quiet:
        for role in ("text", "mmproj"):
            entry = manifest[role]
            click.echo(f"{role:7s} {out_dir / entry['path']}  {entry['type']}  {entry['bytes'] / 1e6:.1f} MB", err=True)
    click.echo(json.dumps(manifest, indent=2))


def split_plan(shapes, quant: str, mmproj_quant: str | None, n_ctx: int, kv_type: str,
               rpc_servers: tuple[str, ...], tensor_split: tuple[float, ...] | None,
               n_cpu_moe: int | str = "auto") -> str:
    """--plan --rpc: each device's share of `quant`, against the free memory it reports; for a MoE
    model, with the experts of the first `n_cpu_moe` blocks kept here ("auto": the fewest that fit)."""
    from edge_llama.ggml_devices import DEVICE_CPU, local_devices
    from edge_llama.rpc import RpcEndpointError, parse_endpoints, worker_memory
    from quant.estimate import estimate
    from quant.memory import TextDims
    from quant.split_fit import fit_experts, format_split, split_fit

    cpu = next(d for d in local_devices() if d.kind == DEVICE_CPU)
    devices = [(f"local {cpu.name}", cpu.free)]
    for ep in parse_endpoints(list(rpc_servers)):
        devices.append((f"RPC {ep}", worker_memory(ep)[0]))
    if tensor_split is not None and len(tensor_split) != len(devices):
        raise RpcEndpointError(f"--tensor-split has {len(tensor_split)} shares for {len(devices)} devices "
                               "(this machine first, then each worker)")
    e = estimate(shapes, quant, mmproj_quant, n_ctx, kv_type)
    if not e.experts_bytes:
        return format_split(e, split_fit(e, devices, tensor_split))
    if n_cpu_moe == "auto":
        n, fits = fit_experts(e, devices, tensor_split)
    else:
        n = TextDims.of(e.text.tensors).n_layer if n_cpu_moe == "all" else int(n_cpu_moe)
        fits = split_fit(e, devices, tensor_split, n_cpu_moe=n)
    return format_split(e, fits, n)


if __name__ == "__main__":
    main()
