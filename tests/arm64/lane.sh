#!/usr/bin/env bash
# `make test-arm64`: the Raspberry Pi 5 lane. A Debian 12 arm64 root (Raspberry Pi OS's base,
# Python 3.11) run by QEMU's user-mode emulator with a Pi 5's CPU (QEMU_CPU=cortex-a76):
#  1. the package installed in the root as docs/devices.md tells a Pi user (runtime only: no torch);
#  2. every test that needs no torch, on GGUF files converted on x86 (the same tests run on x86
#     first, writing them);
#  3. parity with x86 (tests/arm64/parity.py) at four CPU profiles (PROFILES below).
# The root and the aarch64 llama-cpp-python wheel are built once per set of flags under
# ~/.cache/qwen3-vl-edge/arm64/ (the user cache dir, as the Makefile keeps the x86 wheel).
# Needs root (binfmt_misc, chroot, mounts) and Debian's apt on an x86-64 host.
# ARM64_PYTEST_ARGS chooses the tests run on both sides; the x86 run writes every GGUF file a test
# converts into the store the root then reads, so runtime tests run in the root on x86's files.
# ARM64_PYTEST_ARGS=tests is every test that needs no torch when it runs (the `torch` mark,
# tests/conftest.py; browser and docs-build tests are skipped in the root with the reason in the
# summary): 760 tests, 29 minutes in the root on a quiet 2-core host. The default leaves out the
# four modules that take 57% of that (the bench CLI's image cases, the tuning sweep, the quant
# quality walk, the server's prefill interleaving: they run the same llama.cpp paths as the rest,
# many times over) so that a cached rerun of the lane stays near 20 minutes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/tests/arm64
host_python=${HOST_PYTHON:-$repo/.venv/bin/python}
# EDGE_ARM64_CACHE: another cache folder (a cold one times a fresh machine, the real one intact)
cache=${EDGE_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen3-vl-edge/arm64}
LLAMA_CPP_VERSION=0.3.36
# libgomp1: ggml threads with OpenMP; mount: tests make read-only folders as root with a bind mount;
# make: a test dry-runs the Makefile's wheel build (a Pi user builds with it too)
ROOT_PACKAGES=python3,python3-venv,python3-pip,ca-certificates,libgomp1,mount,make
LLAMA_FLAGS="-DGGML_RPC=ON -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
# Parity profiles (QEMU_CPU): a Pi 5 / Jetson Orin core (NEON, dotprod); + i8mm without SVE (Apple
# M2-class); + SVE at 256 bits, the only width ggml's SVE q4_0 8x8 repack kernel takes (Graviton 3 /
# Neoverse V1-class; sve-max-vq=2 caps the vector length as that core's hardware does); QEMU's
# default 512-bit SVE (max), where ggml's vector-length-generic SVE paths run and repacking falls
# back to the i8mm layouts.
PROFILES=(cortex-a76 "max,sve=off" "max,sve-max-vq=2" max)
HEAVY=(test_bench test_tuned test_quant_quality test_server_prefill)
ARM64_PYTEST_ARGS=${ARM64_PYTEST_ARGS-tests $(printf -- '--ignore=tests/%s.py ' "${HEAVY[@]}")}
root=$cache/root/bookworm_$ROOT_PACKAGES
wheels=$cache/llama-cpp-python-$LLAMA_CPP_VERSION/$(echo "$LLAMA_FLAGS" | sed 's/-D//g; s/ /_/g')
run=$cache/run  # this run's GGUF files and results (replaced each run)
venv=/opt/edge-venv
t0=$SECONDS
mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
timings=() t_step=$SECONDS name_step=""
step() {  # each step's wall time goes into the summary printed at the end
    [ -z "$name_step" ] || timings+=("$(mmss $((SECONDS - t_step)))  $name_step")
    t_step=$SECONDS name_step=$*
    printf '\n== [%s] %s\n' "$(mmss $((SECONDS - t0)))" "$*"
}

[ "$(id -u)" = 0 ] || { echo "make test-arm64 needs root (binfmt_misc, chroot, mounts)" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || { echo "make test-arm64 runs on an x86-64 host" >&2; exit 1; }
[ -x "$host_python" ] || { echo "$host_python missing: run make setup first (HOST_PYTHON= to use another)" >&2; exit 1; }

step "tools: qemu-user-static binfmt-support mmdebstrap g++-aarch64-linux-gnu cmake ninja-build"
need=()
for t in qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support mmdebstrap:mmdebstrap \
         aarch64-linux-gnu-g++:g++-aarch64-linux-gnu cmake:cmake ninja:ninja-build; do
    command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

step "emulator: binfmt_misc + qemu-aarch64"
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64
[ "$(cat /proc/sys/fs/binfmt_misc/qemu-aarch64 | head -1)" = enabled ]

# A cold cache builds the root (mostly downloads and dpkg under the emulator) in the background
# while the cross build keeps both cores busy: the two overlap instead of adding up.
root_pid=""
if [ ! -x "$root/usr/bin/python3" ]; then
    step "root: mmdebstrap bookworm arm64 ($ROOT_PACKAGES) into $root (background, log $root.log)"
    rm -rf "$root.tmp" && mkdir -p "$(dirname "$root")"
    mmdebstrap --quiet --arch=arm64 --variant=apt --include="$ROOT_PACKAGES" bookworm "$root.tmp" \
        >"$root.log" 2>&1 &
    root_pid=$!
else
    step "root: reusing $root"
fi

if ! ls "$wheels"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl >/dev/null 2>&1; then
    step "llama-cpp-python $LLAMA_CPP_VERSION for aarch64 [$LLAMA_FLAGS]: cross-compiling into $wheels"
    sdist=$cache/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
    [ -f "$sdist" ] || "$host_python" -m pip download -q --no-deps --no-binary :all: -d "$cache/src" \
        llama-cpp-python==$LLAMA_CPP_VERSION
    "$here/build_llama.sh" "$wheels" "$sdist"
else
    step "llama-cpp-python $LLAMA_CPP_VERSION for aarch64 [$LLAMA_FLAGS]: reusing $wheels"
fi

if [ -n "$root_pid" ]; then
    step "root: waiting for mmdebstrap"
    wait "$root_pid" || { cat "$root.log" >&2; echo "mmdebstrap failed (log above: $root.log)" >&2; exit 1; }
    mv "$root.tmp" "$root"
fi

step "x86, in the background: GGUF files (edge-convert), the torch-free tests, the parity reference"
rm -rf "$run" && mkdir -p "$run/gguf-tests" "$run/parity/out"
# The torch-free selection is what the root runs; here it also writes the GGUF files it needs.
# It needs nothing from the root, so it runs while the root installs the package.
(
    cd "$repo" && export PYTHONPATH="$repo"
    EDGE_TEST_GGUF_STORE="$run/gguf-tests" EDGE_TEST_RUNTIME_ONLY=1 \
        "$host_python" -m pytest -q -p no:cacheprovider $ARM64_PYTEST_ARGS > "$run/x86-tests.log" 2>&1
    "$host_python" "$here/parity.py" prepare "$run/parity/gguf"
    "$host_python" "$here/parity.py" record "$run/parity/gguf" "$run/parity/out" > "$run/parity/x86.log"
) > "$run/x86.log" 2>&1 &
x86_pid=$!

mounts=()
cleanup() { for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() { mkdir -p "$root$2"; mount --bind "$1" "$root$2"; mounts+=("$root$2"); }
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
bind /dev /dev
bind /sys /sys
bind "$run" /run-arm64
# llama-cpp-python's sdist (make setup keeps it): tests read llama.cpp's own templates and converter from it
sdist_dir=${XDG_CACHE_HOME:-$HOME/.cache}/qwen3-vl-edge/sdist
[ -d "$sdist_dir" ] && bind "$sdist_dir" /root/.cache/qwen3-vl-edge/sdist
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"  # pip behind the host's proxy CA
# The project, as a Pi user's clone: the tracked and new files of this checkout.
rm -rf "$root/src" && mkdir -p "$root/src" && mkdir -p "$root/wheels"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - --no-recursion) | tar -xf - -C "$root/src"
rm -f "$root"/wheels/*.whl && cp "$wheels"/*.whl "$root/wheels/"

in_root() {  # QEMU_CPU picks the emulated core for every arm64 process of the command
    local cpu=$1; shift
    chroot "$root" /usr/bin/env -i PATH=$venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$cpu" \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        /bin/sh -c "cd /src && $*"
}

step "root: install as docs/devices.md says (runtime only)"
[ -x "$root$venv/bin/python" ] || in_root cortex-a76 "python3 -m venv $venv"
in_root cortex-a76 "pip install -q --find-links /wheels --only-binary llama-cpp-python '.[server,video]'"
step "root: the test tools ([bench,dev])"
in_root cortex-a76 "pip install -q --no-compile '.[bench,dev]'"
in_root cortex-a76 "python -c 'import platform, llama_cpp; print(platform.machine(), \"llama_cpp\", llama_cpp.__version__)'"
in_root cortex-a76 "python -c 'import torch'" 2>/dev/null && { echo "torch is importable in the root: the runtime install pulled it in" >&2; exit 1; }
in_root cortex-a76 "python -c 'import transformers'" 2>/dev/null && { echo "transformers is importable in the root" >&2; exit 1; }
echo "import torch / import transformers in the root: ModuleNotFoundError (runtime only, as on a Pi)"

step "x86: waiting for the torch-free tests and the parity reference"
wait "$x86_pid" || { tail -40 "$run/x86-tests.log" "$run/x86.log" >&2; echo "the x86 half failed (logs above)" >&2; exit 1; }
tail -1 "$run/x86-tests.log"

step "root: the torch-free tests under QEMU_CPU=cortex-a76 (Raspberry Pi 5)"
in_root cortex-a76 "EDGE_TEST_GGUF_STORE=/run-arm64/gguf-tests python -m pytest -q -p no:cacheprovider -o addopts= -rfEs $ARM64_PYTEST_ARGS"

for p in "${PROFILES[@]}"; do
    step "root: parity with x86 under QEMU_CPU=$p"
    in_root "$p" "python tests/arm64/parity.py compare /run-arm64/parity/gguf /run-arm64/parity/out '$p'"
done

step "parity table (x86 reference vs the arm64 root)"
"$host_python" "$here/parity.py" table "$run/parity/out" "${PROFILES[@]}"
step "arm64 lane done"
echo "wall time per step:"; printf '  %s\n' "${timings[@]}"
echo "total $(mmss $((SECONDS - t0)))"
