#!/usr/bin/env python3
"""Build small random Hugging Face model folders plus reference outputs.

Writes three complete model folders (config, safetensors weights, tokenizer,
generation config, reference.json) under inference-worker/tests/fixtures/hf/.
The reference numbers come from Hugging Face `transformers` (an implementation
independent of llmctl's inference worker) running in float32 on CPU.

Deterministic: fixed seeds, single thread, torch deterministic algorithms.
Nothing is downloaded; tokenizer and weights are created locally.

Usage:  python3 perf/hf_reference/make_fixtures.py [--out DIR]
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import tokenizers
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "inference-worker", "tests", "fixtures", "hf")

# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

BOS = "<|begin_of_text|>"
EOT_TEXT = "<|end_of_text|>"
EOT_ID = "<|eot_id|>"
START_HDR = "<|start_header_id|>"
END_HDR = "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOT_TEXT, EOT_ID, START_HDR, END_HDR]

TRAINED_VOCAB_SIZE = 440  # byte alphabet (256) + merges; specials are appended after

# Llama-3 style chat template, kept to plain standard Jinja (rendered on the
# Rust side by minijinja).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Training corpus: original plain prose, plus digits, punctuation and some
# multi-byte UTF-8 so the byte-level BPE learns a few non-ASCII merges.
CORPUS = [
    "The river ran slowly past the old mill, and the miller watched the water turn the wheel. "
    "Every morning he counted the sacks of grain, wrote the number in a small book, and walked "
    "down to the village to sell what the farmers had brought him the day before.",
    "In the winter the roads were hard and the carts came less often. The miller spent those "
    "weeks mending the gears, oiling the axle, and reading by the stove. He liked stories about "
    "ships, about storms at sea, and about people who found their way home after many years.",
    "A model that predicts the next word is trained on a large amount of text. It reads a "
    "sequence of tokens, computes a score for every token in its vocabulary, and picks the one "
    "with the highest score when it decodes greedily. The scores are called logits.",
    "Attention lets each position look back at the earlier positions. The keys and values of "
    "past tokens are kept in a cache, so that generating one more token does not require "
    "reading the whole prompt again. Grouped query attention shares each key head among "
    "several query heads, which makes the cache smaller.",
    "Numbers appear everywhere: 0 1 2 3 4 5 6 7 8 9, 10, 42, 128, 256, 1024, 3.14159, 2.71828, "
    "1,000,000 and 2024-06-01. Prices like $19.99 or 45% off; times like 07:30 and 23:59.",
    "Punctuation matters too! Does it? Yes: commas, periods, semicolons; quotes \"like this\", "
    "'single quotes', (parentheses), [brackets], {braces}, <angles>, a/b, c\\d, e|f, #tag, @user, "
    "a&b, x*y, p+q=r, ~tilde, ^caret, `backtick`, and ... ellipses.",
    "At the café on the corner, a naïve tourist ordered a crème brûlée and a piña colada. "
    "The waiter smiled and said: voilà, bon appétit! Über alles, façade, jalapeño, déjà vu.",
    "日本語のテキストも少し含めます。東京は大きな都市です。"
    " Emoji too: 🙂 🚀 🎉 ❤️ and symbols like € £ ¥ © ° ±.",
    "She opened the window and the cold air filled the room. Outside, the children were building "
    "a snowman with a carrot for a nose and two stones for eyes. Their laughter carried across "
    "the field to the edge of the forest, where a fox stood still and listened.",
    "def main():\n    for i in range(10):\n        print(i * i)\n\nif __name__ == \"__main__\":\n    main()\n",
]


def build_tokenizer(eos_token, model_max_length):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus a little so merge counts are not all ties.
    tok.train_from_iterator(CORPUS * 3, trainer)
    # Specials appended after the BPE vocab (like Llama 3: added_tokens only).
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=eos_token,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
    return fast


def save_tokenizer(fast, out_dir):
    fast.save_pretrained(out_dir)
    # transformers 5 writes the chat template to chat_template.jinja only; also
    # put it into tokenizer_config.json (the long-standing location) so loaders
    # that only read tokenizer_config.json find it. Both copies are identical.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

PROMPTS_COMMON = [
    "The river ran",  # ~5 tokens
    "Attention lets each position look back, and the cache keeps the keys and values of "
    "past tokens.",  # ~40 tokens
    "At the café, a naïve tourist wrote 日本語 🙂.",  # non-ASCII (2-, 3- and 4-byte UTF-8)
    "Numbers like 3.14, 42 and 1024; prices like $19.99!",
]

LONG_PROMPT = (
    "In the winter the roads were hard, so the miller stayed home and mended the gears. He read "
    "stories about ships and storms at sea, and about people who found their way home. Every "
    "morning he counted 42 sacks of grain and wrote the number in a book."
)

PROMPTS_LLAMA3 = [
    "The river ran",
    "At the café, a naïve tourist wrote 日本語 and smiled 🙂.",  # ~40 tokens, non-ASCII
    LONG_PROMPT,  # > 100 tokens: positions beyond original_max_position_embeddings (64)
]

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant who answers briefly."},
    {"role": "user", "content": "What does the miller do every morning? Réponds en une phrase."},
]

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def model_specs():
    return [
        dict(
            name="llama-gqa",
            max_position_embeddings=256,
            seed=1001,
            cls=LlamaForCausalLM,
            architecture="LlamaForCausalLM",
            dtype=torch.float32,
            dtype_name="float32",
            max_shard_size="300KB",  # ~0.6 MB of f32 weights -> several shards
            eos_token=EOT_TEXT,
            eos_ids=lambda t: t.convert_tokens_to_ids(EOT_TEXT),
            config=lambda v: LlamaConfig(
                vocab_size=v,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=160,
                num_hidden_layers=2,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                max_position_embeddings=256,
                tie_word_embeddings=False,
                attention_bias=False,
            ),
            prompts=PROMPTS_COMMON,
            classic_rope_keys=None,
        ),
        dict(
            name="qwen2-bias-tied",
            max_position_embeddings=256,
            seed=2002,
            cls=Qwen2ForCausalLM,
            architecture="Qwen2ForCausalLM",
            dtype=torch.bfloat16,
            dtype_name="bfloat16",
            max_shard_size="50GB",  # single model.safetensors
            eos_token=EOT_TEXT,
            eos_ids=lambda t: t.convert_tokens_to_ids(EOT_TEXT),
            config=lambda v: Qwen2Config(
                vocab_size=v,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                num_hidden_layers=2,
                tie_word_embeddings=True,
                use_sliding_window=False,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                max_position_embeddings=256,
            ),
            prompts=PROMPTS_COMMON,
            classic_rope_keys=None,
        ),
        dict(
            name="llama3-rope-scaling",
            max_position_embeddings=512,
            seed=3003,
            cls=LlamaForCausalLM,
            architecture="LlamaForCausalLM",
            dtype=torch.float16,
            dtype_name="float16",
            max_shard_size="50GB",
            eos_token=EOT_ID,
            # Like Llama-3.x-Instruct: two stop ids.
            eos_ids=lambda t: [t.convert_tokens_to_ids(EOT_TEXT), t.convert_tokens_to_ids(EOT_ID)],
            config=lambda v: LlamaConfig(
                vocab_size=v,
                hidden_size=128,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=32,
                intermediate_size=256,
                num_hidden_layers=2,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                rope_scaling=dict(LLAMA3_ROPE_SCALING),
                max_position_embeddings=512,
                tie_word_embeddings=False,
                attention_bias=False,
            ),
            prompts=PROMPTS_LLAMA3,
            classic_rope_keys=dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING)),
        ),
    ]


# Greedy references are only useful if an independent f32 implementation picks
# the same argmax: require a clear top1-top2 logit gap at every greedy step
# (f32 discrepancies between implementations are ~1e-5..1e-4 here).
MIN_GREEDY_GAP = 0.005

LINEAR_STD = 0.15
NORM_STD = 0.1
BIAS_STD = 0.1


@torch.no_grad()
def reinit_(model, seed, dtype):
    """Re-initialise every parameter from a seeded generator, then round to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters():  # shared (tied) params appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("bias"):
            val = BIAS_STD * noise
        elif "norm" in name:
            val = 1.0 + NORM_STD * noise
        else:
            val = LINEAR_STD * noise
        # Round to the storage dtype first; references are computed in f32 from
        # exactly these (rounded) values.
        p.copy_(val.to(dtype).to(torch.float32))


def f32_list(t):
    """float32 tensor -> nested python floats, shortest repr that round-trips in f32."""
    arr = t.detach().to(torch.float32).cpu().numpy()
    if arr.ndim == 1:
        return [float(str(np.float32(x))) for x in arr]
    return [f32_list_np(row) for row in arr]


def f32_list_np(arr):
    return [float(str(np.float32(x))) for x in arr]


@torch.no_grad()
def greedy(model, input_ids, n_new):
    """Plain argmax decoding with the KV cache, no EOS stopping. Returns ids and min top1-top2 gap."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    new_ids, gaps = [], []
    for _ in range(n_new):
        top2 = torch.topk(logits, 2)
        gaps.append(float(top2.values[0] - top2.values[1]))
        nxt = int(top2.indices[0])
        new_ids.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    return new_ids, min(gaps)


@torch.no_grad()
def greedy_nocache(model, input_ids, n_new):
    ids = list(input_ids)
    for _ in range(n_new):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(input_ids):]


def build_one(spec, out_root, report):
    name = spec["name"]
    out_dir = os.path.join(out_root, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    tok = build_tokenizer(spec["eos_token"], spec["max_position_embeddings"])
    vocab = len(tok)
    assert vocab == tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    bos_id = tok.convert_tokens_to_ids(BOS)
    eos_ids = spec["eos_ids"](tok)

    config = spec["config"](vocab)
    config.bos_token_id = bos_id
    config.eos_token_id = eos_ids
    config.pad_token_id = None
    torch.manual_seed(spec["seed"])
    model = spec["cls"](config).to(torch.float32).eval()
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reinit_(model, spec["seed"], spec["dtype"])
    rounded_sd = {k: v.clone() for k, v in model.state_dict().items()}

    # ---- save weights + config in the storage dtype
    model.to(spec["dtype"])
    model.save_pretrained(out_dir, max_shard_size=spec["max_shard_size"])
    del model

    if spec["classic_rope_keys"] is not None:
        # transformers 5 folds rope_theta/rope_scaling into `rope_parameters`.
        # Also write the classic top-level keys (as older/real checkpoints carry).
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            cj = json.load(f)
        for k, v in spec["classic_rope_keys"].items():
            cj[k] = v
        cj = dict(sorted(cj.items()))
        with open(path, "w") as f:
            json.dump(cj, f, indent=2)
            f.write("\n")

    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids).save_pretrained(out_dir)
    save_tokenizer(tok, out_dir)

    # ---- reload the folder exactly as a user would, in float32.
    # Tokenizer: load the generic tokenizer.json-backed class explicitly.
    # transformers 5's AutoTokenizer substitutes Qwen2Tokenizer for model_type
    # "qwen2" (qwen2 is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which
    # rebuilds the pipeline (NFC normalizer, Qwen regex, extra <|endoftext|>)
    # and would no longer match tokenizer.json -- the file llmctl reads.
    tok2 = PreTrainedTokenizerFast.from_pretrained(out_dir)
    raw_tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(model).__name__ == spec["architecture"], type(model).__name__
    sd = model.state_dict()
    for k, v in rounded_sd.items():
        assert torch.equal(sd[k], v), f"{name}: weight {k} changed through save/load"
    if spec["classic_rope_keys"] is not None:
        rp = model.config.rope_parameters
        for k, v in LLAMA3_ROPE_SCALING.items():
            assert rp[k] == v, (k, rp)
        assert rp["rope_theta"] == 500000.0, rp
    assert model.config.vocab_size == len(tok2) == vocab

    if spec["classic_rope_keys"] is not None:
        n_long = len(tok2(LONG_PROMPT)["input_ids"])
        assert n_long > 100, f"long prompt is only {n_long} tokens"

    cases = []
    for prompt in spec["prompts"]:
        enc = tok2(prompt, add_special_tokens=True)
        input_ids = list(enc["input_ids"])
        assert input_ids[0] == bos_id
        assert raw_tok.encode(prompt, add_special_tokens=True).ids == input_ids
        assert tok2.decode(input_ids[1:]) == prompt, "tokenizer round-trip failed"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([input_ids]), use_cache=False).logits[0]
        greedy_ids, min_gap = greedy(model, input_ids, 16)
        check = greedy_nocache(model, input_ids, 16)
        assert check == greedy_ids, f"{name}: cached vs uncached greedy differ"
        assert min_gap >= MIN_GREEDY_GAP, f"{name}: near-tie in greedy ({min_gap}) for {prompt!r}"
        greedy_text = tok2.decode(greedy_ids, skip_special_tokens=False)
        # Same string as the plain tokenizers decode (no HF-side clean-up).
        assert greedy_text == raw_tok.decode(greedy_ids, skip_special_tokens=False)
        cases.append(
            dict(
                prompt=prompt,
                input_ids=input_ids,
                logits=f32_list(logits),
                greedy_ids=greedy_ids,
                greedy_text=greedy_text,
            )
        )
        report.append(
            f"{name}: prompt {len(input_ids)} tokens, logits std {logits.std().item():.3f} "
            f"range [{logits.min().item():.2f}, {logits.max().item():.2f}], "
            f"min greedy top1-top2 gap {min_gap:.4f}"
        )

    rendered = tok2.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = list(tok2(rendered, add_special_tokens=False)["input_ids"])
    assert raw_tok.encode(rendered, add_special_tokens=False).ids == chat_ids

    ref = dict(
        generator=f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"tokenizers {tokenizers.__version__}",
        architecture=spec["architecture"],
        weights_dtype=spec["dtype_name"],
        cases=cases,
        chat=dict(
            messages=CHAT_MESSAGES,
            add_generation_prompt=True,
            rendered=rendered,
            input_ids=chat_ids,
        ),
    )
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")

    for fn in os.listdir(out_dir):  # save_pretrained writes safetensors as 0600
        os.chmod(os.path.join(out_dir, fn), 0o644)
    total = sum(os.path.getsize(os.path.join(out_dir, fn)) for fn in os.listdir(out_dir))
    report.append(f"{name}: vocab {vocab}, folder {total} bytes, files {sorted(os.listdir(out_dir))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.set_seed(0)

    os.makedirs(args.out, exist_ok=True)
    report = []
    for spec in model_specs():
        print(f"building {spec['name']} ...", file=sys.stderr)
        build_one(spec, args.out, report)
    for line in report:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
