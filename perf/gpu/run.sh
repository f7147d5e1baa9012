#!/usr/bin/env bash
# Kernel tests and benchmark on a GPU machine that has CUDA 13.0 and PyTorch but no Rust and no
# package registry. Two steps, one command each:
#
#   perf/gpu/run.sh build   # here (x86-64 build machine): release-builds the GPU test binary
#                           # and kernel_bench into perf/gpu/bin/ (git-ignored; carry it)
#   perf/gpu/run.sh run     # on the GPU machine: GPU tests, then the benchmark with PyTorch's
#                           # SDPA side by side; logs and the table go to $OUT (or perf/gpu/out)
#
# With the device tool: run `perf/gpu/run.sh build` here, then run `bash perf/gpu/run.sh run`
# there with carry = ["perf/gpu/bin"]. NVRTC 13 is found in PyTorch's nvidia-* wheels
# (nvidia/cu13/lib) unless LD_LIBRARY_PATH already has it; the driver's libcuda is the system's.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=perf/gpu/bin

build() {
    mkdir -p "$BIN"
    cargo build --release -p llmctl-perf --bin kernel_bench
    cp target/release/kernel_bench "$BIN/"
    local test_bin
    test_bin=$(cargo test --release -p llmctl-kernels --test gpu --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
    cp "$test_bin" "$BIN/kernels-gpu-tests"
    ls -la "$BIN"
}

run() {
    local out="${OUT:-perf/gpu/out}"
    mkdir -p "$out"
    if ! ls /usr/lib/x86_64-linux-gnu/libnvrtc.so.13 >/dev/null 2>&1; then
        local nv
        nv=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
        if [ -n "$nv" ] && [ -e "$nv/libnvrtc.so.13" ]; then
            export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    fi
    export LLMCTL_KERNEL_CACHE="$out/kernel-cache"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
    local status=0
    "$BIN/kernels-gpu-tests" --ignored --test-threads=1 2>&1 | tee "$out/tests.log" || status=1
    "$BIN/kernel_bench" --sdpa perf/gpu/sdpa_bench.py --out "$out/kernels.md" 2>"$out/bench.log" || status=1
    tail -5 "$out/bench.log" || true
    cat "$out/kernels.md" 2>/dev/null || true
    return $status
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
