"""PyTorch scaled_dot_product_attention on the shapes kernel_bench measures (causal prefill,
bf16, GQA), timed with CUDA events (median). Prints {"<len>": {"ms": .., "tflops": ..}} as JSON.
Run by kernel_bench --sdpa perf/gpu/sdpa_bench.py in the same call as our kernels."""

import argparse
import json

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lens", default="1024,2048,4096,8192,16384")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    a = p.parse_args()
    torch.manual_seed(0)
    out = {}
    for n in [int(x) for x in a.lens.split(",")]:
        q = torch.randn(1, a.q_heads, n, a.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, a.kv_heads, n, a.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        for _ in range(3):
            run()
        times = []
        for _ in range(min(a.repeats, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        ms = times[len(times) // 2]
        flops = 4.0 * n * (n + 1) / 2 * a.head_dim * a.q_heads
        out[str(n)] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
