"""`edge-convert`: Hugging Face Qwen3-VL checkpoint -> GGUF pair + manifest."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import ConvertError
from .gguf_out import FLOAT_TYPES
from .pipeline import convert_checkpoint


def fail(message: str) -> None:
    click.echo(f"edge-convert: error: {message}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="Output directory for the GGUF files and manifest.json.")
@click.option("--quant", default="f16", show_default=True, help=f"Text model type: {', '.join(FLOAT_TYPES)}.")
@click.option("--mmproj-quant", default=None, help="Projector type (default: the text model's float type).")
@click.option("--name", default=None, help="File-name stem (default: MODEL_DIR's name).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the manifest.")
def main(model_dir: Path, out_dir: Path, quant: str, mmproj_quant: str | None, name: str | None,
         overwrite: bool, quiet: bool) -> None:
    """Convert the Hugging Face Qwen3-VL checkpoint in MODEL_DIR into a llama.cpp text GGUF,
    a multimodal projector GGUF and OUT/manifest.json."""
    try:
        manifest = convert_checkpoint(model_dir, out_dir, quant.lower(), mmproj_quant=mmproj_quant and mmproj_quant.lower(),
                                      overwrite=overwrite, progress=not quiet, name=name)
    except ConvertError as e:
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
