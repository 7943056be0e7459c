"""`edge-convert`: Hugging Face Qwen3-VL checkpoint -> GGUF pair + manifest."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from convert import convert_checkpoint
from edge_common.errors import EdgeError
from edge_common.floats import FLOAT_TYPES


def fail(message: str) -> None:
    click.echo(f"edge-convert: error: {message}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="Output directory for the GGUF files and manifest.json.")
@click.option("--quant", default="f16", show_default=True,
              help=f"Text model type: {', '.join(FLOAT_TYPES)} or a llama.cpp quantization (q8_0, q6_k, q4_k_m, "
                   "iq4_xs, iq2_xxs, ...; --plan lists them all).")
@click.option("--mmproj-quant", default=None,
              help="Projector type: f32 f16 bf16 q8_0 q6_k q5_k q4_k q4_0 (default: q8_0 for a quantized text "
                   "model, else the text model's float type).")
@click.option("--imatrix", default=None, metavar="auto|FILE",
              help="Importance matrix: 'auto' computes one with the reference model over images and prompts "
                   "(saved as OUT/imatrix.gguf); FILE is one from llama-imatrix. Required for iq1/iq2/iq3 types.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="With --imatrix auto: a folder of images and a prompts.txt to calibrate on.")
@click.option("--keep-f16", is_flag=True, help="Keep the f16 intermediate files of a quantized conversion.")
@click.option("--report", is_flag=True,
              help="Measure the quantized pair against f16 (KL divergence, top-1, image cosine) into manifest.json.")
@click.option("--plan", is_flag=True, help="Print file sizes and runtime memory of every type, then exit.")
@click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context length --plan sizes the KV cache for.")
@click.option("--kv-type", default="f16", show_default=True, help="KV cache type for --plan (f16, q8_0, q4_0, ...).")
@click.option("--threads", type=int, default=0, help="Threads for quantizing (default: all cores).")
@click.option("--name", default=None, help="File-name stem (default: MODEL_DIR's name).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the manifest.")
def main(model_dir: Path, out_dir: Path, quant: str, mmproj_quant: str | None, imatrix: str | None,
         calibration: Path | None, keep_f16: bool, report: bool, plan: bool, n_ctx: int, kv_type: str, threads: int,
         name: str | None, overwrite: bool, quiet: bool) -> None:
    """Convert the Hugging Face Qwen3-VL checkpoint in MODEL_DIR into a llama.cpp text GGUF,
    a multimodal projector GGUF and OUT/manifest.json."""
    quant, mmproj_quant = quant.lower(), mmproj_quant and mmproj_quant.lower()
    try:
        if plan:
            from convert.shapes import model_shapes
            from quant.estimate import format_plan, plan_table

            click.echo(format_plan(plan_table(model_shapes(model_dir), n_ctx, kv_type, mmproj_quant=mmproj_quant)))
            return
        from .pipeline import QuantizeOptions, convert_quantized, needs_quant_pipeline

        if needs_quant_pipeline(quant, mmproj_quant, imatrix, report) or keep_f16 or calibration is not None:
            manifest = convert_quantized(model_dir, out_dir, QuantizeOptions(
                quant, mmproj_quant, imatrix, calibration, keep_f16, report, overwrite, not quiet, name, threads))
        else:
            manifest = convert_checkpoint(model_dir, out_dir, quant, mmproj_quant=mmproj_quant,
                                          overwrite=overwrite, progress=not quiet, name=name)
    except EdgeError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; no finished-looking file was left behind")
    if not quiet:
        for role in ("text", "mmproj"):
            entry = manifest[role]
            click.echo(f"{role:7s} {out_dir / entry['path']}  {entry['type']}  {entry['bytes'] / 1e6:.1f} MB", err=True)
    click.echo(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
