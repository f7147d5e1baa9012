#!/usr/bin/env python3
"""Hugging Face `transformers` side of the llmctl engine benchmark.

Loads a model folder on CPU in float32 and, for each batch size, times
  * prefill: one forward over a [batch, prompt_len] tensor of random token ids
    (seeded) with use_cache=True;
  * decode:  `decode_tokens` single-token forward steps over the returned KV
    cache, feeding back the argmax token of each row (greedy, no EOS stop).
One untimed warm-up round per batch size, then `repeats` timed rounds; prefill
and decode each report their best (minimum) time over the rounds.

Attention: PyTorch SDPA by default (`--attn sdpa`, transformers' default on
CPU); `--attn eager` selects the plain matmul/softmax path.

Prints exactly one JSON line on stdout; progress goes to stderr.

Example:
  python3 perf/engine_bench/hf_bench.py --model DIR --batches 1,8,32 \
      --prompt-len 128 --decode-tokens 32 --threads 2 --repeats 3
"""

import argparse
import json
import platform
import sys
import time


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_batches(s):
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or any(b <= 0 for b in out):
        raise argparse.ArgumentTypeError(f"bad --batches {s!r}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    ap.add_argument("--batches", type=parse_batches, default=[1, 8, 32], help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attn_implementation")
    ap.add_argument("--seed", type=int, default=1234, help="seed for the random prompt token ids")
    args = ap.parse_args()
    if args.prompt_len < 1 or args.decode_tokens < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--prompt-len, --decode-tokens, --repeats and --threads must be >= 1")

    import torch

    # Thread settings before any parallel work.
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()

    log(f"loading {args.model} (float32, attn={args.attn}, threads={args.threads})")
    kwargs = dict(attn_implementation=args.attn)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 only knows torch_dtype
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, **kwargs)
    model = model.to("cpu").eval()
    cfg = model.config
    vocab = cfg.vocab_size
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and args.prompt_len + args.decode_tokens > max_pos:
        log(
            f"warning: prompt_len + decode_tokens = {args.prompt_len + args.decode_tokens} "
            f"exceeds max_position_embeddings = {max_pos}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {type(model).__name__}, {n_params / 1e6:.2f} M params, vocab {vocab}")

    def one_round(input_ids):
        batch = input_ids.shape[0]
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        decode_s = time.perf_counter() - t0
        assert nxt.shape == (batch, 1)
        return prefill_s, decode_s

    results = []
    with torch.inference_mode():
        for batch in args.batches:
            gen = torch.Generator().manual_seed(args.seed + batch)
            input_ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen, dtype=torch.long)
            log(f"batch {batch}: warm-up")
            one_round(input_ids)
            best_prefill = best_decode = float("inf")
            for r in range(args.repeats):
                p_s, d_s = one_round(input_ids)
                log(f"batch {batch}: round {r + 1}/{args.repeats} prefill {p_s * 1e3:.1f} ms, "
                    f"decode {d_s / args.decode_tokens * 1e3:.2f} ms/step")
                best_prefill = min(best_prefill, p_s)
                best_decode = min(best_decode, d_s)
            results.append(
                dict(
                    batch=batch,
                    prompt_len=args.prompt_len,
                    decode_tokens=args.decode_tokens,
                    prefill_tokens_per_s=batch * args.prompt_len / best_prefill,
                    prefill_s=best_prefill,
                    decode_tokens_per_s=batch * args.decode_tokens / best_decode,
                    decode_step_ms=best_decode / args.decode_tokens * 1e3,
                )
            )

    import numpy

    report = dict(
        engine="transformers",
        versions=dict(
            transformers=transformers.__version__,
            torch=torch.__version__,
            numpy=numpy.__version__,
            python=platform.python_version(),
        ),
        threads=args.threads,
        attn_implementation=args.attn,
        dtype="float32",
        model=args.model,
        repeats=args.repeats,
        results=results,
    )
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
