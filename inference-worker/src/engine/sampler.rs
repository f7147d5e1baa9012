//! Turns one sequence's logits into its next token. Order: repetition penalty (Hugging Face
//! rule, over prompt and output), presence/frequency penalties (OpenAI rule, over output),
//! logit bias, suppression of end tokens before `min_tokens`; logprobs are reported from this
//! processed distribution; then greedy argmax, or temperature, top-k, top-p and min-p followed
//! by a draw from the sequence's own random stream, so a seeded request samples the same
//! tokens whatever else is in the batch.

use std::collections::HashMap;

use super::params::SamplingParams;
use crate::rng::Rng;

/// A token and its log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The sampled token, with logprobs when the request asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` and the top alternatives (most likely first).
    pub logprobs: Option<(f32, Vec<TokenLogprob>)>,
}

/// What the sampler needs to know about a sequence.
pub struct SampleContext<'a> {
    pub params: &'a SamplingParams,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    /// Token ids that end the sequence (EOS unless ignored, plus stop ids).
    pub end_tokens: &'a [u32],
}

pub fn sample(logits: &mut [f32], ctx: &SampleContext<'_>, rng: &mut Rng) -> Sampled {
    let p = ctx.params;
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in ctx.prompt.iter().chain(ctx.output) {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                let l = &mut logits[t];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in ctx.output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
    for &(t, bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += bias;
        }
    }
    if ctx.output.len() < p.min_tokens {
        for &t in ctx.end_tokens {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    let token = if p.is_greedy() {
        argmax(logits)
    } else {
        draw(logits, p, rng)
    };
    let logprobs = p.logprobs.map(|k| {
        let lse = log_sum_exp(logits);
        let top = top_k_indices(logits, k).into_iter().map(|t| TokenLogprob {
            token: t,
            logprob: logits[t as usize] - lse,
        });
        (logits[token as usize] - lse, top.collect())
    });
    Sampled { token, logprobs }
}

pub use crate::backend::argmax;

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest logits' indices, largest first (ties by lower index).
fn top_k_indices(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_logit);
        idx.truncate(k);
    }
    idx.sort_by(by_logit);
    idx
}

fn draw(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    let k = if p.top_k == 0 {
        logits.len()
    } else {
        p.top_k.min(logits.len())
    };
    let candidates = top_k_indices(logits, k);
    let max = logits[candidates[0] as usize];
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|&t| (((logits[t as usize] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    // Nucleus: the smallest prefix (most likely first) whose mass reaches top_p.
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut mass = 0.0;
        for (i, q) in probs.iter().enumerate() {
            mass += q;
            if mass >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
    }
    let mass: f64 = probs[..keep].iter().sum();
    let mut u = rng.uniform() * mass;
    for (i, q) in probs[..keep].iter().enumerate() {
        if u < *q {
            return candidates[i];
        }
        u -= q;
    }
    candidates[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(params: &'a SamplingParams, output: &'a [u32]) -> SampleContext<'a> {
        SampleContext {
            params,
            prompt: &[],
            output,
            end_tokens: &[3],
        }
    }

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let params = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let mut logits = vec![0.0, 2.0, 1.0, -1.0];
        let s = sample(&mut logits, &ctx(&params, &[]), &mut Rng::new(0));
        assert_eq!(s.token, 1);
        let (lp, top) = s.logprobs.unwrap();
        let z: f64 = [0.0f64, 2.0, 1.0, -1.0].iter().map(|x| x.exp()).sum();
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn penalties_bias_and_min_tokens_change_the_choice() {
        let base = vec![0.0, 2.0, 1.9, 5.0];
        let greedy = SamplingParams::greedy();
        // Token 3 ends the sequence: suppressed before min_tokens.
        let p = SamplingParams {
            min_tokens: 2,
            max_tokens: 4,
            ..greedy.clone()
        };
        assert_eq!(
            sample(&mut base.clone(), &ctx(&p, &[1]), &mut Rng::new(0)).token,
            1
        );
        // Frequency penalty over output pushes token 1 below token 2.
        let p = SamplingParams {
            frequency_penalty: 0.2,
            logit_bias: vec![(3, -100.0)],
            ..greedy.clone()
        };
        assert_eq!(
            sample(&mut base.clone(), &ctx(&p, &[1]), &mut Rng::new(0)).token,
            2
        );
        // Repetition penalty divides a positive logit.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            logit_bias: vec![(3, -100.0)],
            ..greedy
        };
        assert_eq!(
            sample(&mut base.clone(), &ctx(&p, &[1]), &mut Rng::new(0)).token,
            2
        );
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k_and_top_p() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            ..Default::default()
        };
        let top5 = top_k_indices(&logits, 5);
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..200)
                .map(|_| sample(&mut logits.clone(), &ctx(&p, &[]), &mut rng).token)
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        assert!(
            a.iter().all(|t| top5.contains(t)),
            "top_k=5 keeps only the 5 best"
        );
        assert!(
            top5.iter().filter(|t| a.contains(t)).count() >= 3,
            "sampling is not greedy"
        );
        // A tiny top_p keeps only the best token.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            ..Default::default()
        };
        let mut rng = Rng::new(1);
        assert!(
            (0..50).all(|_| sample(&mut logits.clone(), &ctx(&p, &[]), &mut rng).token == top5[0])
        );
        // min_p = 1 keeps only the best token too.
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 1.0,
            ..Default::default()
        };
        assert!(
            (0..50).all(|_| sample(&mut logits.clone(), &ctx(&p, &[]), &mut rng).token == top5[0])
        );
    }
}
