"""Pack a cross-built llama-cpp-python source tree (its Python code + llama_cpp/lib) as a wheel.

llama-cpp-python reaches llama.cpp through ctypes only, so the wheel holds no CPython
extension: py3-none-linux_aarch64 is its honest tag, and pip in the arm64 root takes it from
--find-links exactly as the x86 Makefile installs its own built wheel.
Usage: python3 make_wheel.py SRC_DIR OUT_DIR
"""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

TAG = "py3-none-linux_aarch64"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def main(src: Path, out: Path) -> Path:
    meta = (src / "PKG-INFO").read_text()
    version = next(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Version:"))
    dist = f"llama_cpp_python-{version}"
    files: dict[str, bytes] = {}
    for p in sorted((src / "llama_cpp").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            files[p.relative_to(src).as_posix()] = p.read_bytes()
    libs = [n for n in files if n.startswith("llama_cpp/lib/") and n.endswith(".so")]
    if not any(n.endswith("/libllama.so") for n in libs):
        raise SystemExit(f"no libllama.so under {src}/llama_cpp/lib: the build did not install")
    files[f"{dist}.dist-info/METADATA"] = meta.encode()
    files[f"{dist}.dist-info/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: qwen3-vl-edge tests/arm64/make_wheel.py\n"
        f"Root-Is-Purelib: false\nTag: {TAG}\n").encode()
    record = [_record_line(n, d) for n, d in files.items()] + [f"{dist}.dist-info/RECORD,,"]
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{dist}-{TAG}.whl"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    tmp.replace(wheel)
    print(f"{wheel} ({len(libs)} libraries: {', '.join(sorted(Path(n).name for n in libs))})")
    return wheel


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
