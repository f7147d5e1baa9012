//! Our loader, tokenizer, chat template and CPU forward pass against Hugging Face
//! `transformers`, an implementation we did not write. The fixtures (random models and their
//! reference logits and greedy continuations) are made by `perf/hf_reference/make_fixtures.py`.

use std::path::{Path, PathBuf};

use llmctl_inference_worker::backend::Backend;
use llmctl_inference_worker::backend::cpu::CpuBackend;
use llmctl_inference_worker::backend::{KvLayout, SeqSlice, StepBatch};
use llmctl_inference_worker::engine::{Engine, EngineConfig, SamplingParams};
use llmctl_inference_worker::model;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
    chat: Chat,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    rendered: String,
    input_ids: Vec<u32>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn reference(dir: &Path) -> Reference {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

/// Both sides compute in f32 from the same (rounded) weights; they differ only in summation
/// order (GEMM blocking, softmax and norm reductions), which over these depths and widths moves
/// logits by about 1e-6 relative. The bound leaves an order of magnitude of margin while any real
/// error (a wrong rotary pair, a missing bias, a scaling slip) moves logits by 1e-2 or more.
fn tolerance(reference: f32) -> f32 {
    2e-4 + 2e-5 * reference.abs()
}

fn check_logits(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let loaded = model::load(&dir, CpuBackend::new()).unwrap();
    let m = &loaded.model;
    let vocab = m.config.vocab_size;
    for case in &r.cases {
        let ids = loaded.tokenizer.encode(&case.prompt, true).unwrap();
        assert_eq!(
            ids, case.input_ids,
            "{name}: tokenization of {:?}",
            case.prompt
        );

        // One forward over the whole prompt, through a block table that is not contiguous.
        let n = ids.len();
        let block_size = 16;
        let blocks = n.div_ceil(block_size);
        let layout = KvLayout {
            num_blocks: 2 * blocks + 1,
            block_size,
            num_kv_heads: m.config.num_kv_heads,
            head_dim: m.config.head_dim,
        };
        let mut cache = m.backend.alloc_kv_cache(m.config.num_layers, layout);
        let table: Vec<u32> = (0..blocks as u32)
            .map(|b| 2 * (blocks as u32 - b))
            .collect();
        let batch = StepBatch {
            tokens: ids.clone(),
            positions: (0..n as u32).collect(),
            slot_mapping: (0..n).map(|p| layout.slot(&table, p) as i64).collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: n,
                context_len: n,
                block_table: table.clone(),
            }],
            logits_rows: (0..n).collect(),
        };
        let logits = m.forward(&mut cache, &batch);
        let mut worst = 0.0f32;
        for (pos, want) in case.logits.iter().enumerate() {
            assert_eq!(want.len(), vocab);
            for (tok, (&got, &want)) in logits[pos * vocab..(pos + 1) * vocab]
                .iter()
                .zip(want)
                .enumerate()
            {
                assert!(
                    (got - want).abs() <= tolerance(want),
                    "{name} {:?} pos {pos} token {tok}: {got} vs {want}",
                    case.prompt
                );
                worst = worst.max((got - want).abs());
            }
        }
        eprintln!(
            "{name}: {:?}: {n} positions, max |logit diff| {worst:.2e}",
            case.prompt
        );
    }
}

fn check_greedy(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let loaded = model::load(&dir, CpuBackend::new()).unwrap();
    let mut engine = Engine::new(
        loaded,
        EngineConfig {
            num_blocks: Some(64),
            ..Default::default()
        },
    );
    for (i, case) in r.cases.iter().enumerate() {
        let params = SamplingParams {
            max_tokens: case.greedy_ids.len(),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        engine
            .add_request(i as u64, case.input_ids.clone(), params)
            .unwrap();
    }
    let mut got = vec![Vec::new(); r.cases.len()];
    while engine.has_unfinished() {
        for out in engine.step() {
            got[out.request as usize].extend(out.token);
        }
    }
    for (case, got) in r.cases.iter().zip(got) {
        assert_eq!(
            got, case.greedy_ids,
            "{name}: greedy continuation of {:?}",
            case.prompt
        );
    }
}

fn check_chat(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let tokenizer = model::load(&dir, CpuBackend::new()).unwrap().tokenizer;
    let rendered = tokenizer
        .render_chat(&r.chat.messages, r.chat.add_generation_prompt)
        .unwrap();
    assert_eq!(rendered, r.chat.rendered, "{name}: chat template");
    assert_eq!(
        tokenizer.encode(&rendered, false).unwrap(),
        r.chat.input_ids,
        "{name}: chat tokens"
    );
}

#[test]
fn llama_gqa_sharded_f32_matches_transformers() {
    check_logits("llama-gqa");
    check_greedy("llama-gqa");
    check_chat("llama-gqa");
}

#[test]
fn qwen2_bias_tied_bf16_matches_transformers() {
    check_logits("qwen2-bias-tied");
    check_greedy("qwen2-bias-tied");
    check_chat("qwen2-bias-tied");
}

#[test]
fn llama3_rope_scaling_f16_matches_transformers() {
    check_logits("llama3-rope-scaling");
    check_greedy("llama3-rope-scaling");
    check_chat("llama3-rope-scaling");
}
