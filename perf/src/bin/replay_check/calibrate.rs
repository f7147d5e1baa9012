//! The executor model measured on this machine, under the check's own conditions (the same
//! worker binary, model, flags and thread count the pool's executors get, on the cores they
//! will share), so that the simulation and the real run are compared with one executor, not
//! with one calibrated elsewhere. One worker is started alone and measured:
//!
//! - cold start: spawn to `/health` 200;
//! - prefill, attention and the per-request overhead: one request at a time with the slice's
//!   own prompt lengths and one output token; a least-squares fit of TTFT = overhead +
//!   p / prefill rate + p^2 / 2 x attention seconds per pair (a prompt of p tokens computes
//!   p^2 / 2 attention pairs; a CPU worker's prefill time grows visibly faster than p: 0.74 ms
//!   a token at 100 tokens, 2 ms at 2,000, on the 2-core CI machine with one thread);
//! - decode at each batch size of the shipped model: that many streams at once, prompts of
//!   the slice's mean length, 48 tokens each with `ignore_eos`; output tokens per second over
//!   the window in which every stream is decoding (after the last first token, before the
//!   first stream ends), less the attention the fit above accounts for (each decode token
//!   sees its context);
//! - the overhead outside the engine: the fit's intercept less one batch-1 step (the
//!   simulation charges every step at least that: the pass over the weights).
//!
//! What is not measured here (the running cap, KV capacity, the step's token budget) is
//! configuration and comes from the shipped model.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use llmctl_pool_controller::replay::executor::ExecutorModel;
use llmctl_pool_controller::replay::trace::TraceRequest;

use crate::{WORKER_ARGS, prompt, stream};

/// Output tokens per decode stream.
const DECODE_TOKENS: u32 = 48;
/// Requests in the prefill line.
const PREFILL_SAMPLES: usize = 32;

pub async fn calibrate(
    llmctl: &Path,
    model_dir: &Path,
    threads: usize,
    shipped: &ExecutorModel,
    requests: &[TraceRequest],
) -> Result<ExecutorModel> {
    let launched = Instant::now();
    let mut child = Command::new(llmctl)
        .arg("worker")
        .arg("--model")
        .arg(model_dir)
        .args(WORKER_ARGS)
        .args(["--served-model-name", "small", "--port", "0"])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the calibration worker")?;
    let measured = async {
        let addr = llmctl_perf::listening_addr(&mut child)?;
        llmctl_perf::wait_healthy(&addr, Duration::from_secs(120)).await?;
        let cold_start = launched.elapsed();
        let fit = prefill_fit(&addr, requests).await?;
        let total: u64 = requests.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let mean_prompt =
            (total / requests.len().max(1) as u64).clamp(1, u64::from(u32::MAX)) as u32;
        // Context a decode token sees, on average over the measured window.
        let context = f64::from(mean_prompt + DECODE_TOKENS / 2);
        let mut decode = Vec::new();
        for &(batch, _) in &shipped.decode_tokens_per_s {
            let rate = decode_rate(&addr, batch, mean_prompt).await?;
            let step = f64::from(batch) / rate;
            let without_attention = step - f64::from(batch) * context * fit.attention;
            if without_attention <= 0.0 {
                bail!(
                    "batch {batch}: a {step:.4} s decode step is all attention by the prefill fit \
                     ({:e} s a pair); the fit is off",
                    fit.attention
                );
            }
            decode.push((batch, f64::from(batch) / without_attention));
        }
        // The fit's intercept holds the lone request's one engine step, which the simulation
        // charges as a batch-1 step (its floor): what is left is the time outside the engine.
        let outside = (fit.overhead - 1.0 / decode[0].1).max(0.0);
        Ok(ExecutorModel {
            cold_start,
            prefill_tokens_per_s: 1.0 / fit.per_token,
            decode_tokens_per_s: decode,
            first_token_overhead: Duration::from_secs_f64(outside),
            attention_secs_per_pair: fit.attention,
            ..shipped.clone()
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// TTFT of a lone request as a function of its prompt length `p`:
/// `overhead + per_token * p + attention * p^2 / 2`.
struct PrefillFit {
    overhead: f64,
    per_token: f64,
    attention: f64,
}

/// Fits [`PrefillFit`] by least squares to one-token requests sent one at a time, with prompt
/// lengths spread over the slice's own. Without visible curvature (a negative attention term),
/// the straight line.
async fn prefill_fit(addr: &str, requests: &[TraceRequest]) -> Result<PrefillFit> {
    let mut lengths: Vec<u32> = requests.iter().map(|r| r.prompt_tokens.max(1)).collect();
    lengths.sort_unstable();
    // Quantiles of the slice, so the fit weighs prompt lengths as the slice does.
    let picks: Vec<u32> = (0..PREFILL_SAMPLES)
        .map(|i| lengths[(i * 2 + 1) * lengths.len() / (2 * PREFILL_SAMPLES)])
        .collect();
    // One request first, unmeasured: the first step pays for warming caches.
    stream(addr.to_owned(), prompt(0, picks[0]), 1)
        .await
        .context("calibration request failed")?;
    let mut points = Vec::new();
    for (i, &p) in picks.iter().enumerate() {
        let times = stream(addr.to_owned(), prompt(i as u32 + 1, p), 1)
            .await
            .context("calibration request failed")?;
        points.push((f64::from(p), times[0]));
    }
    let quadratic = least_squares(&points, &[|_| 1.0, |p| p, |p| p * p / 2.0]);
    let fit = match quadratic {
        Some([overhead, per_token, attention]) if attention >= 0.0 && per_token > 0.0 => {
            PrefillFit {
                overhead,
                per_token,
                attention,
            }
        }
        _ => match least_squares(&points, &[|_| 1.0, |p| p]) {
            Some([overhead, per_token]) if per_token > 0.0 => PrefillFit {
                overhead,
                per_token,
                attention: 0.0,
            },
            _ => bail!(
                "prefill time did not grow with prompt length over the slice's prompts ({points:?})"
            ),
        },
    };
    Ok(PrefillFit {
        overhead: fit.overhead.max(0.0),
        ..fit
    })
}

/// Coefficients of `y = sum c_i f_i(x)` minimising the squared error over `points` (the normal
/// equations, by Gaussian elimination); `None` when they are singular.
fn least_squares<const N: usize>(
    points: &[(f64, f64)],
    terms: &[fn(f64) -> f64; N],
) -> Option<[f64; N]> {
    let mut a = [[0.0; N]; N];
    let mut b = [0.0; N];
    for &(x, y) in points {
        let f = terms.map(|t| t(x));
        for i in 0..N {
            b[i] += f[i] * y;
            for j in 0..N {
                a[i][j] += f[i] * f[j];
            }
        }
    }
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..N {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (x, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut c = [0.0; N];
    for row in (0..N).rev() {
        let tail: f64 = (row + 1..N).map(|k| a[row][k] * c[k]).sum();
        c[row] = (b[row] - tail) / a[row][row];
    }
    c.iter().all(|v| v.is_finite()).then_some(c)
}

/// Output tokens per second with `batch` streams decoding at once.
async fn decode_rate(addr: &str, batch: u32, prompt_len: u32) -> Result<f64> {
    let tasks: Vec<_> = (0..batch)
        .map(|i| {
            tokio::spawn(stream(
                addr.to_owned(),
                prompt(1000 + i, prompt_len),
                DECODE_TOKENS,
            ))
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await?.context("calibration stream failed")?);
    }
    let from = streams.iter().map(|s| s[0]).fold(0.0, f64::max);
    let to = streams
        .iter()
        .map(|s| s[s.len() - 1])
        .fold(f64::INFINITY, f64::min);
    let tokens = streams
        .iter()
        .flatten()
        .filter(|&&t| t > from && t <= to)
        .count();
    if to <= from || tokens == 0 {
        bail!("batch {batch}: no window in which all streams decoded");
    }
    Ok(tokens as f64 / (to - from))
}
