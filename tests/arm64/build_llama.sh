#!/usr/bin/env bash
# Cross-compiles llama-cpp-python's libraries for aarch64 on this x86 host and packs them,
# with the sdist's Python code, into a py3-none-linux_aarch64 wheel in $1 (the cache folder
# named for the flags). Building natively inside the emulated root takes well over an hour;
# the cross toolchain builds the same C++ at native speed.
#
# One wheel for every ARM64 core: GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS build the CPU
# backend once per feature level and ggml loads the best one the CPU has at run time (a Pi 4
# gets armv8.0, a Pi 5 / Jetson Orin dotprod+fp16, a Graviton 4 SVE2+i8mm). A single
# -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod build would run the Pi 5's kernels on every core, so
# the i8mm and SVE repack kernels would never be built, let alone tested. Changes to
# llama.cpp's ARM Linux variant list (ggml/src/CMakeLists.txt), printed in the build log:
#  - the armv9.2 SME variants are dropped: Debian 12's GCC 12 has no +sme (GCC 14 has),
#    and no Pi, Jetson or Graviton has SME;
#  - armv8.2_1 (dotprod without fp16) and armv8.2_3 (SVE without i8mm) are dropped: no board
#    this project names has either (such a core runs the armv8.0 or dotprod variant), and each
#    variant is ~17 more compile units;
#  - an i8mm variant without SVE is added (armv8.6-a+dotprod+fp16+i8mm): upstream's Linux
#    variants only pair i8mm with SVE, so an i8mm core without SVE (Snapdragon X, Apple M2+
#    under Asahi, QEMU's max,sve=off) would fall back to the dotprod kernels.
# Only the libraries the wheel ships are built (llama, mtmd, ggml and its backend modules),
# not llama.cpp's common library (a third of the compile units).
set -euo pipefail
out=$1 sdist=$2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/arm64-llama.XXXXXX)
trap 'rm -rf "$work"' EXIT
tar xzf "$sdist" -C "$work"
src=$(echo "$work"/llama_cpp_python-*)
cm=$src/vendor/llama.cpp/ggml/src/CMakeLists.txt
grep -q 'ggml_add_cpu_backend_variant(armv9.2_1' "$cm"
sed -i -e '/ggml_add_cpu_backend_variant(armv9.2_[12] /d' -e '/ggml_add_cpu_backend_variant(armv8.2_[13] /d' \
    -e 's/^\( *\)ggml_add_cpu_backend_variant(armv8.6_1 /\1ggml_add_cpu_backend_variant(armv8.6_i8mm DOTPROD FP16_VECTOR_ARITHMETIC MATMUL_INT8)\n&/' "$cm"
echo "ARM CPU variants built:"; grep -o 'ggml_add_cpu_backend_variant(armv[^)]*)' "$cm" | sed 's/^/  /'
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$here/aarch64-linux-gnu.cmake" \
    -DSKBUILD_PLATLIB_DIR="$work/platlib" -DCMAKE_INSTALL_PREFIX="$work/prefix" \
    -DGGML_NATIVE=OFF -DGGML_RPC=ON -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF > "$work/configure.log"
cmake --build "$work/build" --target llama mtmd ggml -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# The libraries under every file name they are linked by (libllama.so, .so.0, ...), as copies:
# a wheel holds no links. The dynamically loaded backends (ggml-cpu-<variant>, ggml-rpc) are
# MODULE libraries llama-cpp-python's install list does not name: they go beside libggml.so.
lib=$src/llama_cpp/lib
mkdir -p "$lib"
find "$work/build" -path '*/CMakeFiles' -prune -o -name 'lib*.so*' -print | while read -r f; do cp -L "$f" "$lib/"; done
mkdir -p "$out"
python3 "$here/make_wheel.py" "$src" "$out"
