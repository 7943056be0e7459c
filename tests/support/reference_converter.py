"""llama.cpp's own converter (convert_hf_to_gguf.py + gguf-py, as vendored by llama-cpp-python), the
independent reference our converter is compared with tensor by tensor.

The pip wheel does not ship the converter; the sdist does. `make setup` keeps the sdist in
`~/.cache/qwen3-vl-edge/sdist/`; elsewhere it is fetched with `pip download` (PyPI) once per test run.
Only the converter's files are unpacked. Its tokenizer check hashes a probe string against the hub
models it knows, which a synthetic tokenizer is not, so the driver names the pre-tokenizer (`qwen2`,
what it picks for real Qwen3-VL files); nothing else of the converter is touched.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
_DRIVER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def find_sdist(cache_roots, scratch: Path) -> Path:
    for root in cache_roots:
        p = Path(root) / "sdist" / SDIST
        if p.is_file():
            return p
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(scratch)], check=True)
    return scratch / SDIST


def unpack_converter(sdist: Path, dest: Path) -> Path:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ of the vendored llama.cpp, under dest."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/gguf/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def convert(root: Path, model_dir: Path, outfile: Path, outtype: str = "f32", mmproj: bool = False) -> Path:
    """Run llama.cpp's converter on model_dir; returns the GGUF it wrote."""
    args = [sys.executable, "-c", _DRIVER, str(root), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    if mmproj:
        args.append("--mmproj")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {model_dir}:\n{proc.stderr[-4000:]}")
    return outfile
