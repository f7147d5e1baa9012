//! Turns one sequence's logits into its next token. Order: repetition penalty (Hugging Face
//! rule, over prompt and output), presence/frequency penalties (OpenAI rule, over output),
//! logit bias, suppression of end tokens before `min_tokens`; logprobs are reported from this
//! processed distribution; then greedy argmax, or temperature, top-k, top-p and min-p followed
//! by a draw from the sequence's own random stream, so a seeded request samples the same
//! tokens whatever else is in the batch.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use super::params::SamplingParams;
use crate::backend::{
    LogitEdit, argmax, edit_logits_on_host, max_value, softmax_draw, softmax_mass, softmax_weight,
    top_k,
};
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
    edit_logits_on_host(logits, logits.len(), &logit_edits(ctx, 0, logits.len()));
    let token = if p.is_greedy() {
        argmax(logits)
    } else {
        draw(logits, p, rng.uniform())
    };
    let logprobs = p.logprobs.map(|k| {
        let lse = log_sum_exp(logits);
        let top = top_k(logits, k).into_iter().map(|t| TokenLogprob {
            token: t,
            logprob: logits[t as usize] - lse,
        });
        (logits[token as usize] - lse, top.collect())
    });
    Sampled { token, logprobs }
}

/// What `ctx`'s penalties, bias and `min_tokens` do to its logits (row `row` of a step, a
/// `vocab` wide), one edit per token touched, in token order: the repetition penalty over
/// prompt and output (Hugging Face's rule: a positive logit divided by it, a negative one
/// multiplied), presence and frequency penalties over the output, `logit_bias`, and end
/// tokens forbidden before `min_tokens`. Empty when the request has none of them.
pub fn logit_edits(ctx: &SampleContext<'_>, row: u32, vocab: usize) -> Vec<LogitEdit> {
    let p = ctx.params;
    let mut edits = Edits {
        by_token: BTreeMap::new(),
        row,
        vocab,
    };
    if p.repetition_penalty != 1.0 {
        for &t in ctx.prompt.iter().chain(ctx.output) {
            if let Some(e) = edits.of(t) {
                e.scale_pos = 1.0 / p.repetition_penalty;
                e.scale_neg = p.repetition_penalty;
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in ctx.output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(e) = edits.of(t) {
                e.add -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
    for &(t, bias) in &p.logit_bias {
        if let Some(e) = edits.of(t) {
            e.add += bias;
        }
    }
    if ctx.output.len() < p.min_tokens {
        for &t in ctx.end_tokens {
            if let Some(e) = edits.of(t) {
                e.add = f32::NEG_INFINITY;
            }
        }
    }
    edits.by_token.into_values().collect()
}

/// One row's edits by token.
struct Edits {
    by_token: BTreeMap<u32, LogitEdit>,
    row: u32,
    vocab: usize,
}

impl Edits {
    /// The edit of token `t`, made on first use; none for ids outside the vocabulary.
    fn of(&mut self, t: u32) -> Option<&mut LogitEdit> {
        let row = self.row;
        ((t as usize) < self.vocab).then(|| {
            self.by_token
                .entry(t)
                .or_insert_with(|| LogitEdit::none(row, t))
        })
    }
}

/// Samples each row of a step: `logits` holds `contexts.len()` rows `vocab` wide, row `i`
/// sampled with `contexts[i]` from its sequence's random stream `rngs[i]`. Rows run in
/// parallel; each draws only from its own stream, so the tokens do not depend on the threads.
pub fn sample_rows(
    logits: &mut [f32],
    vocab: usize,
    contexts: &[SampleContext<'_>],
    rngs: &mut [Rng],
) -> Vec<Sampled> {
    logits
        .par_chunks_mut(vocab)
        .zip(contexts)
        .zip(rngs)
        .map(|((row, ctx), rng)| sample(row, ctx, rng))
        .collect()
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    max_value(logits) + softmax_mass(logits, 1.0).ln() as f32
}

/// Candidates ranked at first when no top-k bounds them: most nuclei of a language model's
/// distribution fit, and ranking them is cheap next to a whole vocabulary's sort.
const FIRST_CANDIDATES: usize = 1024;

/// A draw at `p`'s temperature with the uniform `u` from the tokens top-k, top-p and min-p
/// keep. Without any of the three the draw walks the vocabulary in token order
/// ([`softmax_draw`]), with nothing ranked; otherwise see [`draw_ranked`].
pub fn draw(logits: &[f32], p: &SamplingParams, u: f64) -> u32 {
    let n = logits.len();
    let k = if p.top_k == 0 { n } else { p.top_k.min(n) };
    if k == n && p.top_p >= 1.0 && p.min_p <= 0.0 {
        return softmax_draw(logits, p.temperature, u);
    }
    // Without a top-k the probabilities are over the whole vocabulary, and only as many
    // tokens are ranked as it takes to find where top-p or min-p cuts.
    let vocab_mass = (k == n).then(|| softmax_mass(logits, p.temperature));
    let mut ranked = k.min(FIRST_CANDIDATES);
    loop {
        let candidates = top_k(logits, ranked);
        let values: Vec<f32> = candidates.iter().map(|&t| logits[t as usize]).collect();
        if let Some(i) = draw_ranked(&values, p, vocab_mass, ranked == k, u) {
            return candidates[i];
        }
        ranked = (ranked * 4).min(k);
    }
}

/// A draw with the uniform `u` among ranked candidates, given by their logits (`values`, most
/// likely first): the index of the drawn one. Probabilities at `p`'s temperature are over the
/// candidates, or, with `vocab_mass` (the softmax mass of the whole vocabulary relative to its
/// best logit, `values[0]`), over the vocabulary. Top-p keeps the smallest prefix whose mass
/// reaches `top_p`, min-p the candidates at least `min_p` times as likely as the best; the kept
/// ones are drawn from most likely first. `None` when the cut may lie below the candidates
/// (`complete` false: more tokens rank below them).
pub fn draw_ranked(
    values: &[f32],
    p: &SamplingParams,
    vocab_mass: Option<f64>,
    complete: bool,
    u: f64,
) -> Option<usize> {
    let max = values[0];
    let mut probs: Vec<f64> = values
        .iter()
        .map(|&l| softmax_weight(l, max, p.temperature))
        .collect();
    let total = vocab_mass.unwrap_or_else(|| probs.iter().sum());
    probs.iter_mut().for_each(|q| *q /= total);
    let nucleus = (p.top_p < 1.0)
        .then(|| {
            let mut mass = 0.0;
            probs.iter().position(|q| {
                mass += q;
                mass >= p.top_p as f64
            })
        })
        .flatten()
        .map(|i| i + 1);
    let above_min_p = (p.min_p > 0.0).then(|| {
        let floor = probs[0] * p.min_p as f64;
        probs.iter().take_while(|&&q| q >= floor).count().max(1)
    });
    let cut_inside = nucleus.is_some() || above_min_p.is_some_and(|c| c < probs.len());
    if !complete && !cut_inside {
        return None;
    }
    let keep = [nucleus, above_min_p]
        .into_iter()
        .flatten()
        .fold(probs.len(), usize::min);
    let mass: f64 = probs[..keep].iter().sum();
    let mut target = u * mass;
    for (i, q) in probs[..keep].iter().enumerate() {
        if target < *q {
            return Some(i);
        }
        target -= q;
    }
    Some(keep - 1)
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
        let top5 = top_k(&logits, 5);
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

    #[test]
    fn an_untruncated_draw_follows_the_softmax() {
        let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5];
        let p = SamplingParams {
            temperature: 0.8,
            ..Default::default()
        };
        let n = 40_000;
        let mut counts = [0usize; 5];
        let mut rng = Rng::new(5);
        for _ in 0..n {
            counts[sample(&mut logits.to_vec(), &ctx(&p, &[]), &mut rng).token as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| (l as f64 / 0.8).exp()).sum();
        for (t, &c) in counts.iter().enumerate() {
            let q = (logits[t] as f64 / 0.8).exp() / z;
            let sigma = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (c as f64 - n as f64 * q).abs() < 5.0 * sigma,
                "token {t}: {c} draws of {n}, expected {:.0}",
                n as f64 * q
            );
        }
    }

    #[test]
    fn top_p_and_min_p_reach_past_the_first_ranked_candidates() {
        // 5000 equal logits: top_p 0.4999 keeps the 2500 best-ranked (ties rank by lower id),
        // more than the first candidates ranked; min_p 0.5 keeps every token.
        let logits = vec![0.0f32; 5000];
        for (p, kept) in [
            (
                SamplingParams {
                    temperature: 1.0,
                    top_p: 0.4999,
                    ..Default::default()
                },
                2500,
            ),
            (
                SamplingParams {
                    temperature: 1.0,
                    min_p: 0.5,
                    ..Default::default()
                },
                5000,
            ),
        ] {
            let mut rng = Rng::new(9);
            let drawn: Vec<u32> = (0..2000)
                .map(|_| sample(&mut logits.clone(), &ctx(&p, &[]), &mut rng).token)
                .collect();
            assert!(drawn.iter().all(|&t| (t as usize) < kept));
            let beyond = drawn
                .iter()
                .filter(|&&t| t as usize >= FIRST_CANDIDATES)
                .count();
            // Uniform over `kept`: about (kept - 1024) / kept of the draws.
            assert!(
                beyond > 2000 * (kept - FIRST_CANDIDATES) / kept / 2,
                "{beyond} of 2000 draws past the first {FIRST_CANDIDATES} of {kept}"
            );
        }
    }

    #[test]
    fn rows_sampled_together_equal_rows_sampled_one_by_one() {
        let vocab = 300;
        let mut rng = Rng::new(3);
        let logits: Vec<f32> = (0..8 * vocab).map(|_| rng.normal() as f32).collect();
        let params = [
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.7,
                top_p: 0.8,
                top_k: 40,
                ..Default::default()
            },
        ];
        let contexts: Vec<SampleContext<'_>> =
            (0..8).map(|i| ctx(&params[i % 2], &[1, 2])).collect();
        let seeds = || (0..8).map(Rng::new).collect::<Vec<_>>();
        let mut together_rngs = seeds();
        let together = sample_rows(&mut logits.clone(), vocab, &contexts, &mut together_rngs);
        let mut rngs = seeds();
        let one_by_one: Vec<Sampled> = logits
            .chunks(vocab)
            .zip(&contexts)
            .zip(&mut rngs)
            .map(|((row, c), r)| sample(&mut row.to_vec(), c, r))
            .collect();
        assert_eq!(together, one_by_one);
        // Each stream advanced as far as when sampled alone.
        for (mut a, mut b) in together_rngs.into_iter().zip(rngs) {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }
}
