#!/usr/bin/env bash
# Kernel tests and benchmark on a GPU machine that has CUDA 13.0 and PyTorch but no Rust and no
# package registry. Two steps, one command each:
#
#   perf/gpu/run.sh build   # here (x86-64 build machine): release-builds the GPU test binaries
#                           # (kernels, worker CUDA backend) and kernel_bench into perf/gpu/bin/
#                           # (git-ignored; carry it)
#   perf/gpu/run.sh run     # on the GPU machine: GPU tests, then the benchmark with PyTorch's
#                           # SDPA side by side; logs and the table go to $OUT (or perf/gpu/out)
#   perf/gpu/run.sh decode  # on the GPU machine: decode step vs roofline for the Llama-3.2-1B
#                           # and Llama-3.1-8B shaped presets (written to $MODELS, default
#                           # /tmp/llmctl-models: 2.5 and 16 GB, written on every core the first time)
#   perf/gpu/run.sh serve   # on the GPU machine: serving throughput at 64 concurrent streams
#                           # for the same presets (the worker runs on cuda:0)
#   perf/gpu/run.sh sanitize [S]  # on the GPU machine: the GPU kernel tests under NVIDIA's
#                           # compute-sanitizer (memcheck, racecheck, synccheck, initcheck), at
#                           # most S seconds (default 540) shared among them; where the machine's
#                           # runtime refuses the tool (gVisor) it says so in the first seconds
#   perf/gpu/run.sh exec CMD...  # on the GPU machine: CMD with the environment the parts get
#                           # (NVRTC and cuBLAS found, binaries unpacked): how to rerun one part
#                           # `all` skipped, as its results.md line spells out
#   perf/gpu/run.sh all [S] # on the GPU machine: all of the above in one call of at most S
#                           # seconds (default 540), most wanted first, each part under its own
#                           # time limit, so a short device lease still brings back the first
#                           # numbers; see all() for the order. SKIP=REGEX leaves out the parts
#                           # whose name and command match (a rerun of what failed)
#
# With the device tool: run `perf/gpu/run.sh build` here, then run `bash perf/gpu/run.sh run`
# there with carry = ["perf/gpu/bin"]. NVRTC 13 and cuBLAS 13 are found in PyTorch's nvidia-*
# wheels (nvidia/cu13/lib) unless LD_LIBRARY_PATH already has them; the driver's libcuda is the
# system's. Run from the repository root (the worker's tests read its fixtures).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=perf/gpu/bin

# Stores binary `$1` as $BIN/$2.gz, stripped.
pack() {
    strip -o "$BIN/$2" "$1"
    gzip -9 -f "$BIN/$2"
}

# Unpacks $BIN/*.gz (on the GPU machine) once.
unpack() {
    local gz
    for gz in "$BIN"/*.gz; do
        [ -e "${gz%.gz}" ] || { gunzip -c "$gz" >"${gz%.gz}" && chmod +x "${gz%.gz}"; }
    done
}

# Packs the release test binary `$2` of package `$1` as $BIN/$3.
test_binary() {
    local exe
    exe=$(cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2")
    pack "$exe" "$3"
}

build() {
    rm -rf "$BIN"
    mkdir -p "$BIN"
    cargo build --release -p llmctl-perf --bin kernel_bench --bin decode_bench --bin serve_bench
    local b
    for b in kernel_bench decode_bench serve_bench; do pack "target/release/$b" "$b"; done
    test_binary llmctl-kernels gpu kernels-gpu-tests
    test_binary llmctl-inference-worker cuda worker-cuda-tests
    # What the binaries ask of the GPU machine's C library, for all()'s first lines there.
    local elf=/tmp/llmctl-gpu-elf needs gz
    needs=$(for gz in "$BIN"/*.gz; do
        gunzip -c "$gz" >"$elf" && objdump -T "$elf" 2>/dev/null || true
    done | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
    rm -f "$elf"
    printf 'built on: %s\nneeds: %s or later\n' "$(ldd --version 2>&1 | head -1)" "$needs" >"$BIN/built.txt"
    ls -la "$BIN"
    du -sh "$BIN"
}

# NVRTC and cuBLAS from the system, the CUDA toolkit or PyTorch's wheels, whichever has them
# first; the binaries unpacked.
cuda_env() {
    local dirs=() d nv
    nv=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
    for d in /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib "$nv"; do
        [ -n "$d" ] && { [ -e "$d/libnvrtc.so.13" ] || [ -e "$d/libcublas.so.13" ]; } && dirs+=("$d")
    done
    for d in "${dirs[@]}"; do
        [[ ":${LD_LIBRARY_PATH:-}:" == *":$d:"* ]] || export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    done
    # Compiled kernels stay out of $OUT: what comes back from the device machine is capped at 8
    # files.
    export LLMCTL_KERNEL_CACHE=/tmp/llmctl-kernel-cache
    unpack
}

# Runs `$2...` once per Llama-shaped preset (adding --preset, --models and --out), logging to
# $OUT/$1.log and printing each table.
per_preset() {
    local name=$1; shift
    local out="${OUT:-perf/gpu/out}" models="${MODELS:-/tmp/llmctl-models}" status=0
    mkdir -p "$out"
    cuda_env
    for preset in llama-3.2-1b llama-3.1-8b; do
        "$@" --preset "$preset" --models "$models" --out "$out/$name-$preset.md" \
            2>>"$out/$name.log" || status=1
        cat "$out/$name-$preset.md" 2>/dev/null || true
    done
    tail -5 "$out/$name.log" || true
    return $status
}

# The decode and serving benchmarks' arguments (before --preset, --models and --out).
DECODE=(--device cuda --batches 1,64 --context 512 --steps 32)
SERVE_SHAPE=(--device cuda --concurrency 64 --prompt-len 128:512 --output-len 128:256)
SERVE=("${SERVE_SHAPE[@]}" --num-requests 256)

decode() {
    per_preset decode "$BIN/decode_bench" "${DECODE[@]}"
}

serve() {
    per_preset serve "$BIN/serve_bench" "${SERVE[@]}"
}

run() {
    local out="${OUT:-perf/gpu/out}"
    mkdir -p "$out"
    cuda_env
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
    local status=0
    "$BIN/kernels-gpu-tests" --ignored --test-threads=1 2>&1 | tee "$out/tests.log" || status=1
    # The worker's CUDA backend reads the Hugging Face fixtures from the source tree.
    "$BIN/worker-cuda-tests" --ignored --test-threads=1 2>&1 | tee -a "$out/tests.log" || status=1
    "$BIN/kernel_bench" --sdpa perf/gpu/sdpa_bench.py --out "$out/kernels.md" 2>"$out/bench.log" || status=1
    tail -5 "$out/bench.log" || true
    cat "$out/kernels.md" 2>/dev/null || true
    return $status
}

# Everything in one device call, most wanted first: correctness of the kernels, the 1B decode
# step against its roofline (issue 7's first number), the kernel benchmark's decode, GEMV and
# sampling parts, the worker's CUDA tests, prefill beside SDPA, then the 8B decode step, serving,
# and serving with logprobs drawn on the GPU vs on the host.
# Each part runs under `timeout` (its own cap, or what is left before the deadline) and is
# skipped once too little is left, so whatever finished comes back. Three files in $OUT:
# results.md (device, each part's table, and a line per part with its exit status and time),
# tests.log and all.log (everything else the parts printed).
all() {
    local out="${OUT:-perf/gpu/out}" models="${MODELS:-/tmp/llmctl-models}"
    local deadline=$(($(date +%s) + ${1:-540})) status=0 table=/tmp/llmctl-gpu-table.md
    mkdir -p "$out"
    cuda_env
    local results="$out/results.md" log="$out/all.log"
    {
        echo "# GPU run, $(date -u +%Y-%m-%d)"
        echo
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        echo
        # The binaries were built elsewhere: say at once if one cannot start here, instead of
        # a part failing with the loader's message in all.log.
        echo "here: $(ldd --version 2>&1 | head -1)"
        echo "CUDA libraries from: ${LD_LIBRARY_PATH:-nowhere}"
        cat "$BIN/built.txt" 2>/dev/null || true
        local exe missing
        for exe in "$BIN"/*; do
            [[ $exe == *.gz || ! -x $exe ]] && continue
            missing=$(ldd "$exe" 2>&1 | grep -E "not found|version .* not found" || true)
            [ -z "$missing" ] || echo "- $(basename "$exe") cannot start here: $missing"
        done
    } >"$results"
    # part CAP NAME COMMAND...: runs COMMAND with --out $table when NAME ends in .md, and adds
    # the table to results.md.
    part() {
        local cap=$1 name=$2 left
        shift 2
        left=$((deadline - $(date +%s)))
        if [ -n "${SKIP:-}" ] && [[ "$name $*" =~ $SKIP ]]; then
            echo "- $name: skipped (SKIP), alone: perf/gpu/run.sh exec $*" >>"$results"
            return
        fi
        if ((left < 20)); then
            echo "- $name: skipped, ${left}s left (alone: perf/gpu/run.sh exec $*)" >>"$results"
            return
        fi
        ((cap < left)) || cap=$left
        local started rc=0
        started=$(date +%s)
        rm -f "$table"
        echo "== $name (cap ${cap}s): $*" >>"$log"
        if [[ $name == *.md ]]; then
            timeout -k 10 "$cap" "$@" --out "$table" >>"$log" 2>&1 || rc=$?
            { echo; echo "## $name"; echo; cat "$table" 2>/dev/null || true; } >>"$results"
        else
            timeout -k 10 "$cap" "$@" >>"$out/$name" 2>&1 || rc=$?
        fi
        ((rc == 0)) || status=1
        echo "- $name: exit $rc after $(($(date +%s) - started))s (cap ${cap}s)" >>"$results"
    }
    local p1b=(--preset llama-3.2-1b --models "$models") p8b=(--preset llama-3.1-8b --models "$models")
    part 180 tests.log "$BIN/kernels-gpu-tests" --ignored --test-threads=1
    part 150 decode-llama-3.2-1b.md "$BIN/decode_bench" "${DECODE[@]}" "${p1b[@]}"
    part 90 kernels-decode-gemv-sampling.md "$BIN/kernel_bench" --sections decode,gemv,sampling
    part 90 tests.log "$BIN/worker-cuda-tests" --ignored --test-threads=1
    part 120 kernels-prefill.md "$BIN/kernel_bench" --sections prefill --sdpa perf/gpu/sdpa_bench.py
    part 240 decode-llama-3.1-8b.md "$BIN/decode_bench" "${DECODE[@]}" "${p8b[@]}"
    part 180 serve-llama-3.2-1b.md "$BIN/serve_bench" "${SERVE[@]}" "${p1b[@]}"
    # Tokens drawn on the GPU vs every step's logits copied to the host sampler, for requests
    # with the SDKs' default temperature and logprobs (docs/inference-worker.md).
    local asks=("${SERVE_SHAPE[@]}" --num-requests 128 --sampling default --logprobs 5 "${p1b[@]}")
    part 120 serve-llama-3.2-1b-logprobs-gpu.md "$BIN/serve_bench" "${asks[@]}" --device-sampling true
    part 120 serve-llama-3.2-1b-logprobs-host.md "$BIN/serve_bench" "${asks[@]}" --device-sampling false
    cat "$results"
    return $status
}

# The GPU kernel tests once under each compute-sanitizer tool, each getting an equal share of
# what is left of S seconds; $OUT/sanitize.md gets a line per tool (exit status and the tool's
# summary: 99 means it reported errors, 101 a failed test), $OUT/sanitize-TOOL.log the rest.
# The hardware check of what the CPU emulator checks by construction (out-of-bounds accesses,
# shared-memory races, divergent barriers, reads of unwritten memory).
sanitize() {
    local out="${OUT:-perf/gpu/out}" deadline=$(($(date +%s) + ${1:-540}))
    mkdir -p "$out"
    cuda_env
    local cs report="$out/sanitize.md"
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    echo "# compute-sanitizer on the GPU kernel tests, $(date -u +%Y-%m-%d)" >"$report"
    echo >>"$report"
    local tools=(memcheck racecheck synccheck initcheck) i left cap rc summary log
    for i in "${!tools[@]}"; do
        left=$((deadline - $(date +%s)))
        cap=$((left / (${#tools[@]} - i)))
        log="$out/sanitize-${tools[i]}.log"
        if ((cap < 20)); then
            echo "- ${tools[i]}: skipped, ${left}s left" >>"$report"
            continue
        fi
        rc=0
        timeout -k 10 "$cap" "$cs" --tool "${tools[i]}" --error-exitcode 99 --print-limit 20 \
            "$BIN/kernels-gpu-tests" --ignored --test-threads=1 >"$log" 2>&1 || rc=$?
        summary=$(grep -m1 -E "ERROR SUMMARY|RACECHECK SUMMARY|not supported|Error" "$log" || echo "no summary")
        echo "- ${tools[i]}: exit $rc (cap ${cap}s): $summary" >>"$report"
    done
    cat "$report"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    decode) decode ;;
    serve) serve ;;
    all) all "${2:-540}" ;;
    sanitize) sanitize "${2:-540}" ;;
    exec) shift; cuda_env; "$@" ;;
    *) echo "usage: $0 build|run|decode|serve|all|sanitize [seconds] | exec COMMAND..." >&2; exit 2 ;;
esac
