//! The CUDA backend against the CPU backend on the Hugging Face fixtures: the same prompts
//! through the same paged forward (a scrambled block table, chunked over two steps so both the
//! prefill and the decode attention kernels run), logits compared at every position, and greedy
//! continuations through the engine compared with transformers' own. Needs a CUDA GPU: ignored
//! by default, run with `cargo test -p llmctl-inference-worker --test cuda -- --ignored` or by
//! `perf/gpu/run.sh`.
//!
//! Tolerances: in f32 the two backends differ only in summation order (cuBLAS blocking, the
//! kernels' reductions): |gpu - cpu| <= 1e-3 + 1e-3·|cpu|. In bf16 every weight and activation
//! is rounded to 8 significant bits (half an ulp is 0.2%), and the error compounds over the
//! layers: |gpu - cpu| <= 0.1 + 0.05·|cpu|, which a real mistake (a wrong rotary pair, a missing
//! bias, a softmax slip) still exceeds by far on these random models.

use std::path::{Path, PathBuf};

use cudarc::cublas::{CudaBlas, Gemm};
use llmctl_inference_worker::backend::cpu::CpuBackend;
use llmctl_inference_worker::backend::cuda::{CudaBackend, GpuDtype};
use llmctl_inference_worker::backend::{Backend, KvLayout, SeqSlice, StepBatch};
use llmctl_inference_worker::engine::{Engine, EngineConfig, SamplingParams};
use llmctl_inference_worker::model::{self, LoadedModel};

/// The fixtures beside this crate; a binary carried to another machine finds them relative to
/// the repository root it runs in.
fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if built.exists() {
        built.to_path_buf()
    } else {
        PathBuf::from("inference-worker")
    };
    root.join("tests/fixtures/hf").join(name)
}

fn prompts(dir: &Path) -> Vec<(Vec<u32>, Vec<u32>)> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = |k: &str| {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            };
            (ids("input_ids"), ids("greedy_ids"))
        })
        .collect()
}

/// Logits at every position of `ids`: the prompt minus its last token in one step, then the
/// last token as a decode step, through a non-contiguous block table.
fn logits<B: Backend>(loaded: &LoadedModel<B>, ids: &[u32]) -> Vec<f32> {
    let m = &loaded.model;
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
    let mut out = Vec::new();
    for (from, to) in [(0, n - 1), (n - 1, n)] {
        if from == to {
            continue;
        }
        let batch = StepBatch {
            tokens: ids[from..to].to_vec(),
            positions: (from as u32..to as u32).collect(),
            slot_mapping: (from..to).map(|p| layout.slot(&table, p) as i64).collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: to - from,
                context_len: to,
                block_table: table.clone(),
            }],
            logits_rows: (0..to - from).collect(),
        };
        out.extend(m.forward(&mut cache, &batch));
    }
    out
}

fn greedy<B: Backend>(loaded: LoadedModel<B>, cases: &[(Vec<u32>, Vec<u32>)]) -> Vec<Vec<u32>> {
    let mut engine = Engine::new(
        loaded,
        EngineConfig {
            num_blocks: Some(64),
            ..Default::default()
        },
    );
    for (i, (input, want)) in cases.iter().enumerate() {
        let params = SamplingParams {
            max_tokens: want.len(),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        engine.add_request(i as u64, input.clone(), params).unwrap();
    }
    let mut got = vec![Vec::new(); cases.len()];
    while engine.has_unfinished() {
        for out in engine.step() {
            got[out.request as usize].extend(out.token);
        }
    }
    got
}

fn check<T: GpuDtype>(name: &str, atol: f32, rtol: f32)
where
    CudaBlas: Gemm<T>,
{
    let dir = fixture(name);
    let cases = prompts(&dir);
    let cpu = model::load(&dir, CpuBackend::new()).unwrap();
    let gpu = model::load(&dir, CudaBackend::<T>::new(0).unwrap()).unwrap();
    for (ids, _) in &cases {
        let (want, got) = (logits(&cpu, ids), logits(&gpu, ids));
        assert_eq!(want.len(), got.len());
        let mut worst = 0.0f32;
        for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
            assert!(
                (g - w).abs() <= atol + rtol * w.abs(),
                "{name} {}: logit {i}: gpu {g} vs cpu {w}",
                T::SUFFIX
            );
            worst = worst.max((g - w).abs());
        }
        eprintln!(
            "{name} {}: {} logits, worst |gpu - cpu| {worst:.2e}",
            T::SUFFIX,
            got.len()
        );
    }
    // Greedy continuations are compared where no rounding can flip a near-tie of these random
    // models: in f32.
    if T::SUFFIX == "f32" {
        let got = greedy(gpu, &cases);
        for ((_, want), got) in cases.iter().zip(got) {
            assert_eq!(&got, want, "{name}: greedy continuation");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_the_cpu_backend_and_transformers() {
    for name in ["llama-gqa", "qwen2-bias-tied", "llama3-rope-scaling"] {
        check::<f32>(name, 1e-3, 1e-3);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_matches_the_cpu_backend_within_rounding() {
    for name in ["llama-gqa", "qwen2-bias-tied", "llama3-rope-scaling"] {
        check::<half::bf16>(name, 0.1, 0.05);
    }
}
