//! The engine end to end on a real model folder written by `model init`: continuous batching,
//! chunked prefill, prefix caching, preemption by recompute, abort, `n > 1`, stop strings,
//! seeds and logprobs. Every test compares against a run that does not exercise the feature.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use llmctl_inference_worker::backend::cpu::CpuBackend;
use llmctl_inference_worker::engine::{
    Engine, EngineConfig, EngineError, FinishReason, SamplingParams, SeqOutput, TokenLogprob,
};
use llmctl_inference_worker::model::{
    self,
    init::{InitDtype, InitOptions, Preset},
};
use llmctl_inference_worker::tokenizer::IncrementalDecoder;

fn tiny_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            preset: Preset::Tiny,
            seed: 3,
            dtype: InitDtype::F32,
        };
        model::init::write_model(dir.path(), &opts).unwrap();
        dir
    })
    .path()
}

fn engine(config: EngineConfig) -> Engine<CpuBackend> {
    Engine::new(
        model::load(tiny_model(), CpuBackend::new()).unwrap(),
        config,
    )
}

fn blocks(n: usize) -> EngineConfig {
    EngineConfig {
        num_blocks: Some(n),
        ..Default::default()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Completion {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    logprobs: Vec<f32>,
    /// The top alternatives of each token, where asked.
    alternatives: Vec<Vec<TokenLogprob>>,
    cached_tokens: usize,
}

/// Runs the engine until every request is done; completions by (request, index).
fn drain(engine: &mut Engine<CpuBackend>) -> HashMap<(u64, usize), Completion> {
    let mut out: HashMap<(u64, usize), Completion> = HashMap::new();
    let mut steps = 0;
    while engine.has_unfinished() {
        steps += 1;
        assert!(steps < 10_000, "engine made no progress");
        for o in engine.step() {
            collect(&mut out, o);
        }
    }
    out
}

fn collect(out: &mut HashMap<(u64, usize), Completion>, o: SeqOutput) {
    let c = out.entry((o.request, o.index)).or_default();
    c.tokens.extend(o.token);
    c.text.push_str(&o.text);
    if let Some((lp, alternatives)) = o.logprobs {
        c.logprobs.push(lp);
        c.alternatives.push(alternatives);
    }
    c.finish = o.finish;
    c.cached_tokens = o.cached_tokens;
}

/// Deterministic pseudo-random prompt of `len` tokens from the ordinary vocabulary.
fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 400) as u32
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

fn sampled(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn model_init_is_deterministic_by_seed_and_loads() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let opts = |seed| InitOptions {
        preset: Preset::Tiny,
        seed,
        dtype: InitDtype::Bf16,
    };
    model::init::write_model(a.path(), &opts(7)).unwrap();
    model::init::write_model(b.path(), &opts(7)).unwrap();
    model::init::write_model(c.path(), &opts(8)).unwrap();
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let (x, y) = (
            std::fs::read(a.path().join(file)).unwrap(),
            std::fs::read(b.path().join(file)).unwrap(),
        );
        assert!(x == y, "{file} differs between two runs with the same seed");
    }
    let w = |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
    assert_ne!(w(&a), w(&c), "a different seed gives different weights");

    let loaded = model::load(a.path(), CpuBackend::new()).unwrap();
    let tok = &loaded.tokenizer;
    let text = "Hello, café 日本語 🚀 world";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(
        ids[0],
        loaded.model.config.bos_token_id.unwrap(),
        "BOS is prepended"
    );
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        text,
        "byte-level BPE round-trips any UTF-8"
    );
    assert!(ids.len() < text.len(), "merges were learned");
    let chat = tok
        .render_chat(
            &[serde_json::json!({"role": "user", "content": "hi"})],
            true,
        )
        .unwrap();
    assert_eq!(
        chat,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(
        loaded.model.config.eos_token_ids.len(),
        2,
        "generation_config eos list wins"
    );
}

#[test]
fn loading_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    model::init::write_model(
        dir.path(),
        &InitOptions {
            preset: Preset::Tiny,
            seed: 1,
            dtype: InitDtype::F16,
        },
    )
    .unwrap();
    let err = |dir: &Path| {
        model::load(dir, CpuBackend::new())
            .err()
            .expect("load must fail")
            .to_string()
    };

    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = err(dir.path());
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");

    model::init::write_model(
        dir.path(),
        &InitOptions {
            preset: Preset::Tiny,
            seed: 1,
            dtype: InitDtype::F16,
        },
    )
    .unwrap();
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        original.replace("\"intermediate_size\": 192", "\"intermediate_size\": 200"),
    )
    .unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("model.safetensors")
            && e.contains("mlp.gate_proj.weight")
            && e.contains("shape"),
        "{e}"
    );

    std::fs::write(
        &config_path,
        original.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("config.json")
            && e.contains("architectures")
            && e.contains("GPTNeoXForCausalLM"),
        "{e}"
    );

    std::fs::write(
        &config_path,
        original.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("model.layers.2.input_layernorm.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn greedy_output_is_the_same_alone_and_inside_a_batch_of_16() {
    let target = prompt(1, 37);
    let mut alone = engine(blocks(256));
    alone.add_request(0, target.clone(), greedy(24)).unwrap();
    let want = drain(&mut alone).remove(&(0, 0)).unwrap();
    assert_eq!(want.tokens.len(), 24);

    // 15 others of mixed lengths and lengths of output, joining while the target runs, and a
    // small token budget so prefills are chunked and mixed with decodes.
    let mut batched = engine(EngineConfig {
        num_blocks: Some(256),
        max_num_batched_tokens: 48,
        ..Default::default()
    });
    for i in 1..8 {
        batched
            .add_request(
                i,
                prompt(100 + i, 5 + 9 * i as usize),
                greedy(4 + 3 * i as usize),
            )
            .unwrap();
    }
    batched.add_request(0, target, greedy(24)).unwrap();
    let mut out = HashMap::new();
    for step in 0.. {
        if step == 3 {
            for i in 8..16 {
                batched
                    .add_request(i, prompt(100 + i, 3 + 5 * i as usize), sampled(20, i))
                    .unwrap();
            }
        }
        if !batched.has_unfinished() {
            break;
        }
        for o in batched.step() {
            collect(&mut out, o);
        }
    }
    assert_eq!(out.len(), 16);
    assert_eq!(out[&(0, 0)].tokens, want.tokens);
    assert_eq!(out[&(0, 0)].text, want.text);
}

#[test]
fn chunked_prefill_matches_a_single_prefill() {
    let p = prompt(9, 150);
    let mut whole = engine(blocks(64));
    whole
        .add_request(
            0,
            p.clone(),
            SamplingParams {
                logprobs: Some(3),
                ..greedy(8)
            },
        )
        .unwrap();
    let want = drain(&mut whole).remove(&(0, 0)).unwrap();
    let mut chunked = engine(EngineConfig {
        num_blocks: Some(64),
        max_num_batched_tokens: 16,
        ..Default::default()
    });
    chunked
        .add_request(
            0,
            p,
            SamplingParams {
                logprobs: Some(3),
                ..greedy(8)
            },
        )
        .unwrap();
    let got = drain(&mut chunked).remove(&(0, 0)).unwrap();
    assert_eq!(got.tokens, want.tokens);
    for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
        // Same math, different GEMM row counts: f32 reassociation only.
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn prefix_cache_hit_gives_the_same_logits_as_a_cold_run() {
    let p = prompt(5, 45);
    let params = SamplingParams {
        logprobs: Some(5),
        ..greedy(10)
    };
    let mut e = engine(blocks(64));
    e.add_request(0, p.clone(), params.clone()).unwrap();
    let cold = drain(&mut e).remove(&(0, 0)).unwrap();
    assert_eq!(cold.cached_tokens, 0);
    let hits_before = e.stats().cache.hit_tokens;

    e.add_request(1, p.clone(), params.clone()).unwrap();
    let warm = drain(&mut e).remove(&(1, 0)).unwrap();
    // 45 prompt tokens: the two full blocks before the last token are reused.
    assert_eq!(warm.cached_tokens, 32);
    assert_eq!(e.stats().cache.hit_tokens - hits_before, 32);
    assert_eq!(warm.tokens, cold.tokens);
    for (a, b) in warm.logprobs.iter().zip(&cold.logprobs) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }

    // A prompt that diverges inside the first block hits nothing.
    let mut other = p.clone();
    other[3] = (other[3] + 1) % 400;
    e.add_request(2, other, params).unwrap();
    assert_eq!(drain(&mut e)[&(2, 0)].cached_tokens, 0);
}

#[test]
fn preemption_and_recompute_give_identical_output() {
    let reqs: Vec<(u64, Vec<u32>, SamplingParams)> = (0..6)
        .map(|i| {
            let params = if i % 2 == 0 {
                greedy(60)
            } else {
                sampled(60, 77 + i)
            };
            (i, prompt(200 + i, 20 + 3 * i as usize), params)
        })
        .collect();
    let mut roomy = engine(blocks(256));
    for (id, p, params) in &reqs {
        roomy.add_request(*id, p.clone(), params.clone()).unwrap();
    }
    let want = drain(&mut roomy);
    assert_eq!(roomy.stats().preemptions, 0);

    // Each request needs 5-6 blocks at the end; 14 blocks cannot hold six of them at once.
    let mut tight = engine(EngineConfig {
        num_blocks: Some(14),
        enable_prefix_caching: false,
        ..Default::default()
    });
    for (id, p, params) in &reqs {
        tight.add_request(*id, p.clone(), params.clone()).unwrap();
    }
    let got = drain(&mut tight);
    assert!(
        tight.stats().preemptions > 0,
        "the test must actually preempt"
    );
    for (id, _, _) in &reqs {
        assert_eq!(
            got[&(*id, 0)].tokens,
            want[&(*id, 0)].tokens,
            "request {id}"
        );
        assert_eq!(got[&(*id, 0)].finish, Some(FinishReason::Length));
    }
    assert_eq!(
        tight.stats().blocks_used,
        0,
        "all blocks are back after the run"
    );
}

#[test]
fn abort_frees_blocks_at_once() {
    let mut e = engine(EngineConfig {
        num_blocks: Some(64),
        enable_prefix_caching: false,
        ..Default::default()
    });
    e.add_request(0, prompt(1, 40), greedy(100)).unwrap();
    e.add_request(1, prompt(2, 20), greedy(100)).unwrap();
    for _ in 0..3 {
        e.step();
    }
    let used = e.stats().blocks_used;
    assert_eq!(used, 3 + 2, "40 and 20 tokens plus a few generated");
    assert!(e.abort(0));
    assert_eq!(e.stats().blocks_used, 2);
    assert!(!e.abort(0), "a second abort finds nothing");
    assert_eq!(e.stats().running, 1);
    let out = drain(&mut e);
    assert!(
        !out.contains_key(&(0, 0)),
        "an aborted request produces nothing more"
    );
    assert_eq!(out[&(1, 0)].tokens.len(), 97);
}

#[test]
fn n_completions_share_the_prompt_blocks() {
    let mut e = engine(blocks(64));
    let params = SamplingParams {
        n: 4,
        ..sampled(12, 5)
    };
    e.add_request(0, prompt(3, 64), params.clone()).unwrap();
    let mut out = HashMap::new();
    let mut peak = 0;
    while e.has_unfinished() {
        for o in e.step() {
            collect(&mut out, o);
        }
        peak = peak.max(e.stats().blocks_used);
    }
    // Unshared, four sequences of 64 + 12 tokens hold 4 * 5 = 20 blocks. Shared: the leader's
    // 5, plus for each sibling its own copy of the last prompt block and one for its output.
    assert!(peak <= 5 + 3 * 2, "peak {peak} blocks");
    assert_eq!(out.len(), 4);
    let distinct: std::collections::HashSet<_> = out.values().map(|c| c.tokens.clone()).collect();
    assert_eq!(
        distinct.len(),
        4,
        "each completion has its own random stream"
    );

    // The same seed reproduces all four.
    e.add_request(1, prompt(3, 64), params).unwrap();
    let again = drain(&mut e);
    for i in 0..4 {
        assert_eq!(again[&(1, i)].tokens, out[&(0, i)].tokens);
    }
}

#[test]
fn seeded_sampling_is_independent_of_batch_composition() {
    let p = prompt(11, 30);
    let mut alone = engine(blocks(128));
    alone.add_request(0, p.clone(), sampled(30, 1234)).unwrap();
    let want = drain(&mut alone).remove(&(0, 0)).unwrap();

    let mut busy = engine(blocks(128));
    for i in 1..6 {
        busy.add_request(i, prompt(50 + i, 10 * i as usize), sampled(25, i))
            .unwrap();
    }
    busy.add_request(0, p.clone(), sampled(30, 1234)).unwrap();
    assert_eq!(drain(&mut busy)[&(0, 0)].tokens, want.tokens);

    let mut other_seed = engine(blocks(128));
    other_seed.add_request(0, p, sampled(30, 4321)).unwrap();
    assert_ne!(drain(&mut other_seed)[&(0, 0)].tokens, want.tokens);
}

#[test]
fn stop_strings_end_output_even_across_token_boundaries() {
    let p = prompt(21, 12);
    let mut e = engine(blocks(64));
    e.add_request(0, p.clone(), greedy(40)).unwrap();
    // Per-token text pieces (no stop strings: nothing is held back).
    let mut pieces: Vec<String> = Vec::new();
    while e.has_unfinished() {
        for o in e.step() {
            pieces.push(o.text);
        }
    }
    let full: String = pieces.concat();
    // A stop string made of the end of one token's text and the start of the next one's.
    let (k, stop) = (5..pieces.len() - 1)
        .find_map(|k| {
            let (a, b) = (&pieces[k], &pieces[k + 1]);
            let tail: String = a
                .chars()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let head: String = b.chars().take(2).collect();
            (!tail.is_empty() && !head.is_empty()).then(|| (k, tail + &head))
        })
        .expect("some adjacent tokens both have text");
    let cut = full.find(&stop).unwrap();
    assert!(cut <= pieces[..=k].concat().len());

    let params = SamplingParams {
        stop: vec![stop.clone(), "never-appears".into()],
        ..greedy(40)
    };
    e.add_request(1, p, params).unwrap();
    let mut streamed = Vec::new();
    let mut finish = None;
    while e.has_unfinished() {
        for o in e.step() {
            streamed.push(o.text);
            finish = o.finish;
        }
    }
    assert_eq!(finish, Some(FinishReason::Stop));
    assert_eq!(
        streamed.concat(),
        full[..cut],
        "output ends right before the stop string"
    );
    assert!(streamed.iter().all(|s| !s.contains(&stop)));
}

#[test]
fn eos_stops_unless_ignored_and_min_tokens_holds_it_off() {
    let mut e = engine(blocks(64));
    let p = prompt(4, 10);
    let eot = e.tokenizer().token_id("<|eot_id|>").unwrap();
    // A strong bias makes EOS the greedy choice at every step.
    let bias = vec![(eot, 100.0)];
    e.add_request(
        0,
        p.clone(),
        SamplingParams {
            logit_bias: bias.clone(),
            max_tokens: 10,
            ..SamplingParams::greedy()
        },
    )
    .unwrap();
    e.add_request(
        1,
        p.clone(),
        SamplingParams {
            logit_bias: bias.clone(),
            max_tokens: 10,
            min_tokens: 4,
            ..SamplingParams::greedy()
        },
    )
    .unwrap();
    e.add_request(
        2,
        p,
        SamplingParams {
            logit_bias: bias,
            max_tokens: 10,
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
    )
    .unwrap();
    let out = drain(&mut e);
    assert_eq!(
        (out[&(0, 0)].tokens.clone(), out[&(0, 0)].finish),
        (vec![eot], Some(FinishReason::Stop))
    );
    assert_eq!(out[&(1, 0)].tokens.len(), 5, "four tokens, then EOS");
    assert_eq!(out[&(1, 0)].finish, Some(FinishReason::Stop));
    assert_eq!(out[&(2, 0)].tokens, vec![eot; 10]);
    assert_eq!(out[&(2, 0)].finish, Some(FinishReason::Length));
    assert!(
        out[&(0, 0)].text.is_empty(),
        "special tokens are not in the text"
    );
}

#[test]
fn logprobs_are_normalised_and_ranked() {
    let mut e = engine(blocks(64));
    e.add_request(
        0,
        prompt(8, 20),
        SamplingParams {
            logprobs: Some(5),
            ..greedy(5)
        },
    )
    .unwrap();
    while e.has_unfinished() {
        for o in e.step() {
            let (lp, top) = o.logprobs.unwrap();
            assert_eq!(top.len(), 5);
            assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            assert_eq!(top[0].token, o.token.unwrap(), "greedy picks the top token");
            assert_eq!(lp, top[0].logprob);
            assert!(lp < 0.0 && top.iter().map(|t| t.logprob.exp()).sum::<f32>() <= 1.0 + 1e-5);
        }
    }
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let mut e = engine(blocks(64));
    let max = e.max_model_len();
    assert!(matches!(
        e.add_request(0, vec![], greedy(4)),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        e.add_request(0, vec![1, 100_000], greedy(4)),
        Err(EngineError::BadToken(100_000))
    ));
    assert!(matches!(
        e.add_request(0, prompt(1, max), greedy(4)),
        Err(EngineError::TooLong { .. })
    ));
    assert!(matches!(
        e.add_request(0, prompt(1, 10), greedy(2000)),
        Err(EngineError::TooLargeForCache { .. })
    ));
    let e2 = e.add_request(
        0,
        prompt(1, 10),
        SamplingParams {
            top_p: 2.0,
            ..greedy(4)
        },
    );
    assert!(matches!(e2, Err(EngineError::Param(ref p)) if p.param == "top_p"));
    e.add_request(0, prompt(1, 10), greedy(4)).unwrap();
    assert!(matches!(
        e.add_request(0, prompt(1, 10), greedy(4)),
        Err(EngineError::DuplicateId(0))
    ));
    assert!(!drain(&mut e).is_empty());
}

#[test]
fn incremental_detokenization_never_splits_a_character() {
    let loaded = model::load(tiny_model(), CpuBackend::new()).unwrap();
    let tok = &loaded.tokenizer;
    let text = "naïve 日本語 text with 🚀 and русский";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count() / 2);
    let mut decoder = IncrementalDecoder::new(&[], true);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(decoder.push(tok, id));
    }
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.iter().any(String::is_empty),
        "some tokens end inside a character and wait"
    );
    assert_eq!(pieces.concat(), text);
}

#[test]
fn batch_respects_max_num_seqs_and_the_token_budget() {
    let mut e = engine(EngineConfig {
        num_blocks: Some(128),
        max_num_seqs: 3,
        max_num_batched_tokens: 40,
        ..Default::default()
    });
    for i in 0..7 {
        e.add_request(i, prompt(300 + i, 30), greedy(6)).unwrap();
    }
    let mut finished = 0;
    while e.has_unfinished() {
        let outputs = e.step();
        let stats = e.stats();
        assert!(stats.running <= 3, "running {}", stats.running);
        assert!(outputs.len() <= 3);
        finished += outputs.iter().filter(|o| o.finish.is_some()).count();
    }
    assert_eq!(finished, 7, "every request finishes");
    // 7 prompts of 30 tokens with a 40-token budget: prefills were chunked across steps.
    assert!(e.stats().steps >= (7 * 30) / 40);
}

/// An engine over `blocks(64)`, with tokens drawn where the logits are or by the host sampler.
fn sampling_engine(device_sampling: bool) -> Engine<CpuBackend> {
    engine(EngineConfig {
        device_sampling,
        ..blocks(64)
    })
}

/// Completions of the same requests drawn where the logits are (`device`) and by the host
/// sampler (`host`) are the same: tokens, finish, and logprobs with their alternatives, to the
/// bit (on the CPU backend both take the same sums).
fn assert_same_completions(
    device: &HashMap<(u64, usize), Completion>,
    host: &HashMap<(u64, usize), Completion>,
) {
    assert_eq!(device.len(), host.len());
    for (key, c) in device {
        assert!(!c.tokens.is_empty(), "{key:?}");
        assert_eq!(c.tokens, host[key].tokens, "{key:?}");
        assert_eq!(c.finish, host[key].finish, "{key:?}");
        assert_eq!(c.logprobs, host[key].logprobs, "{key:?}");
        assert_eq!(c.alternatives, host[key].alternatives, "{key:?}");
    }
}

#[test]
fn greedy_steps_take_the_backends_argmax_and_match_the_sampler() {
    // Drawn where the logits are, every row's token is the backend's argmax and its logprobs
    // come from the backend's candidates and softmax mass (ids and a few values, not logits,
    // leave the backend); the host sampler sees whole rows. Both must give the same tokens and
    // logprobs, `min_tokens` (which forbids end tokens for a while) included.
    let run = |device_sampling: bool| {
        let mut e = sampling_engine(device_sampling);
        for (id, prompt) in [vec![5u32, 9, 17, 33], vec![2, 4], vec![7, 7, 7, 1, 3, 8]]
            .into_iter()
            .enumerate()
        {
            let params = SamplingParams {
                max_tokens: 12,
                min_tokens: if id == 1 { 6 } else { 0 },
                logprobs: [None, Some(0), Some(5)][id],
                ..SamplingParams::greedy()
            };
            e.add_request(id as u64, prompt, params).unwrap();
        }
        drain(&mut e)
    };
    let device = run(true);
    assert_eq!(device.len(), 3);
    assert!(device[&(0, 0)].logprobs.is_empty());
    assert_eq!(device[&(2, 0)].alternatives[0].len(), 5);
    assert_same_completions(&device, &run(false));
}

#[test]
fn seeded_draws_where_the_logits_are_match_the_host_sampler() {
    // Drawn where the logits are, every row's token comes from the backend (its penalties,
    // bias and min_tokens applied there, then a softmax draw, the argmax, or a top-k's or
    // top-p's candidates), and so do the logprobs of the rows that ask for them (the sampled
    // token's own logit fetched when it is not among the candidates); the host sampler sees
    // whole rows. The same seeds must give the same tokens and logprobs.
    let run = |device_sampling: bool| {
        let mut e = sampling_engine(device_sampling);
        let params = [
            SamplingParams {
                temperature: 0.8,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.2,
                top_k: 20,
                top_p: 0.9,
                min_p: 0.01,
                ..Default::default()
            },
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 1.0,
                top_k: 5,
                ..Default::default()
            },
            // Top-p and min-p without a top-k: cuts among the device's first candidates
            // (top_p 0.05 and min_p 0.8 of this flat random model keep a few tokens) and one
            // below them (top_p 0.9 keeps hundreds), which brings the whole row over.
            SamplingParams {
                temperature: 0.9,
                top_p: 0.05,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.8,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                ..Default::default()
            },
            // A top-k of 1 is greedy whatever the temperature.
            SamplingParams {
                temperature: 0.7,
                top_k: 1,
                ..Default::default()
            },
            // Penalties, bias and min_tokens edit the logits where they are, before each
            // kind of draw.
            SamplingParams {
                repetition_penalty: 1.5,
                frequency_penalty: 0.5,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.9,
                presence_penalty: 0.8,
                logit_bias: vec![(5, 3.0), (9, -100.0)],
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 10,
                repetition_penalty: 1.2,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.3,
                frequency_penalty: 0.4,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_tokens: 6,
                stop_token_ids: vec![7, 11, 13],
                ..Default::default()
            },
        ];
        for (id, p) in params.into_iter().enumerate() {
            let p = SamplingParams {
                max_tokens: 16,
                ignore_eos: true,
                seed: Some(100 + id as u64),
                logprobs: [None, Some(0), Some(3), Some(20)][id % 4],
                ..p
            };
            e.add_request(id as u64, prompt(id as u64 + 3, 5 + id), p)
                .unwrap();
        }
        drain(&mut e)
    };
    let device = run(true);
    assert_eq!(device.len(), 13);
    // Some sampled tokens lay outside their row's candidates: their logits were fetched.
    let outside = device
        .values()
        .flat_map(|c| c.logprobs.iter().zip(&c.alternatives))
        .filter(|(lp, top)| top.len() == 3 && **lp < top[2].logprob)
        .count();
    assert!(outside > 0);
    assert_same_completions(&device, &run(false));
}
