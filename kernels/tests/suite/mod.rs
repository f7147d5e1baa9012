//! Every kernel against its CPU reference on random inputs, in f32, bf16 and f16: written once,
//! run on a CUDA GPU by `gpu.rs` and on the CPU emulator of the CUDA driver by `emulated.rs`
//! (`kernel_tests!` makes the same tests for each).
//!
//! Tolerances (|got - want| <= atol + rtol * |want|), per storage type: inputs are rounded to
//! the type before both sides see them, the kernels accumulate in f32, and the output is rounded
//! once to the type, so the bound is about one output rounding plus f32 accumulation error:
//! f32 1e-4 / 1e-4 (attention 2e-4: two exponentials and a division per score), bf16 (8
//! significant bits, half an ulp is 2^-9 = 0.2%) 1.5e-2 / 1.5e-2, f16 (11 bits) 2e-3 / 2e-3.

#![allow(dead_code)]

use cudarc::driver::CudaSlice;
use llmctl_kernels::cuda::{
    DecodePlan, Dtype, GemvThen, Kernels, LogitEdit, PagedCache, RotaryKv, SOFTMAX_DRAW_MAX_VOCAB,
    Split,
};
use llmctl_kernels::kv_layout::KvLayout;
use llmctl_kernels::reference::{self, PagedKv, SeqAttention, TestRng};

#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f64,
    rtol: f64,
}

fn tol<T: Dtype>(attention: bool) -> Tol {
    match T::SUFFIX {
        "f32" if attention => Tol {
            atol: 2e-4,
            rtol: 2e-4,
        },
        "f32" => Tol {
            atol: 1e-4,
            rtol: 1e-4,
        },
        "bf16" => Tol {
            atol: 1.5e-2,
            rtol: 1.5e-2,
        },
        _ => Tol {
            atol: 2e-3,
            rtol: 2e-3,
        },
    }
}

/// Values as the kernel's storage type stores them.
fn rounded<T: Dtype>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

fn upload<T: Dtype>(k: &Kernels, x: &[f32]) -> CudaSlice<T> {
    let host: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    k.stream().clone_htod(&host).unwrap()
}

fn download<T: Dtype>(k: &Kernels, x: &CudaSlice<T>) -> Vec<f32> {
    k.stream()
        .clone_dtoh(x)
        .unwrap()
        .into_iter()
        .map(T::to_f32)
        .collect()
}

/// An output buffer filled with NaN, so an element the kernel fails to write cannot pass.
fn poisoned<T: Dtype>(k: &Kernels, n: usize) -> CudaSlice<T> {
    upload::<T>(k, &vec![f32::NAN; n])
}

fn assert_close(what: &str, got: &[f32], want: &[f64], t: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= t.atol + t.rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w} (error {err:.3e}, tolerance {t:?})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: {} values, worst error {worst:.2e}", got.len());
}

pub fn for_each_dtype(k: &Kernels, f: &mut dyn FnMut(&Kernels, &str)) {
    eprintln!("device: {} ({}, {} SMs)", k.device_name, k.arch, k.sm_count);
    for dtype in ["f32", "bf16", "f16"] {
        f(k, dtype);
    }
}

#[macro_export]
macro_rules! dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            "f32" => $f::<f32>($($arg),*),
            "bf16" => $f::<half::bf16>($($arg),*),
            _ => $f::<half::f16>($($arg),*),
        }
    };
}

pub fn norms<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(1);
    for (rows, hidden) in [(1, 64), (7, 1000), (33, 4096)] {
        let x = rounded::<T>(&rng.vec(rows * hidden));
        let w = rounded::<T>(&rng.vec(hidden));
        let (dx, dw) = (upload::<T>(k, &x), upload::<T>(k, &w));
        let mut out = poisoned::<T>(k, rows * hidden);
        k.rms_norm(&mut out, &dx, &dw, hidden, 1e-5).unwrap();
        let want = reference::rms_norm(&x, &w, hidden, 1e-5);
        assert_close(
            &format!("rms_norm {} {rows}x{hidden}", T::SUFFIX),
            &download(k, &out),
            &want,
            tol::<T>(false),
        );

        let delta = rounded::<T>(&rng.vec(rows * hidden));
        let mut residual = upload::<T>(k, &x);
        k.add_rms_norm(
            &mut out,
            &mut residual,
            &upload::<T>(k, &delta),
            &dw,
            hidden,
            1e-5,
        )
        .unwrap();
        let (want_res, want) =
            reference::add_rms_norm(&x, &delta, &w, hidden, 1e-5, |v| T::from_f32(v).to_f32());
        let res: Vec<f64> = want_res.iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("add_rms_norm residual {}", T::SUFFIX),
            &download(k, &residual),
            &res,
            Tol {
                atol: 0.0,
                rtol: 0.0,
            },
        );
        assert_close(
            &format!("add_rms_norm {} {rows}x{hidden}", T::SUFFIX),
            &download(k, &out),
            &want,
            tol::<T>(false),
        );
    }
}

/// The fused small-batch projections (gemv.cu) against the separate references they fold
/// together, with the projection rounded to the storage type where the separate ops store it
/// (the normed input is not, in the kernel or here): odd and even widths,
/// a row length that leaves the unrolled chunk loop partly empty, 1 to 4 input rows.
pub fn gemv<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(9);
    let round = |v: f64| T::from_f32(v as f32).to_f32();
    for (rows, n, width) in [(1, 33, 264), (2, 64, 1000), (4, 130, 4096)] {
        let what = |op: &str| format!("{op} {} {rows}x{width} -> {n}", T::SUFFIX);
        let scale = 1.0 / (width as f32).sqrt();
        let w: Vec<f32> = rng.vec(n * width).iter().map(|v| v * scale).collect();
        let w = rounded::<T>(&w);
        let (x, norm) = (
            rounded::<T>(&rng.vec(rows * width)),
            rounded::<T>(&rng.vec(width)),
        );
        let residual = rounded::<T>(&rng.vec(rows * n));
        let (dw, dx, dnorm) = (
            upload::<T>(k, &w),
            upload::<T>(k, &x),
            upload::<T>(k, &norm),
        );

        // residual += x · wᵀ, the product rounded before the add as `linear` stores it.
        let mut d_res = upload::<T>(k, &residual);
        k.gemv_add(&mut d_res, &dx, &dw, width).unwrap();
        let want: Vec<f64> = reference::matmul_t(&x, &w, width)
            .iter()
            .zip(&residual)
            .map(|(&y, &r)| round(r as f64 + round(y) as f64) as f64)
            .collect();
        assert_close(
            &what("gemv_add"),
            &download(k, &d_res),
            &want,
            tol::<T>(false),
        );

        // rms_norm(x) · wᵀ (the normed input is not rounded to the storage type).
        let normed: Vec<f32> = reference::rms_norm(&x, &norm, width, 1e-5)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let product = reference::matmul_t(&normed, &w, width);
        let mut out = poisoned::<T>(k, rows * n);
        k.gemv_norm(&mut out, &dx, &dnorm, 1e-5, &dw, width, GemvThen::Store)
            .unwrap();
        assert_close(
            &what("gemv_norm"),
            &download(k, &out),
            &product,
            tol::<T>(false),
        );

        // The same through silu(gate) * up, gate and up rounded first.
        if n % 2 == 0 {
            let stored: Vec<f32> = product.iter().map(|&v| round(v)).collect();
            let want = reference::silu_mul(&stored, n / 2);
            let mut out = poisoned::<T>(k, rows * n / 2);
            k.gemv_norm(&mut out, &dx, &dnorm, 1e-5, &dw, width, GemvThen::SiluMul)
                .unwrap();
            assert_close(
                &what("gemv_norm_gated"),
                &download(k, &out),
                &want,
                tol::<T>(false),
            );
        }
    }
    gemv_rope::<T>(k, &mut rng);
    // Shapes the kernels cannot take are errors before any launch.
    let (x, w) = (
        upload::<T>(k, &[0.0; 5 * 64]),
        upload::<T>(k, &[0.0; 64 * 2]),
    );
    let mut res = upload::<T>(k, &[0.0; 5 * 2]);
    assert!(k.gemv_add(&mut res, &x, &w, 64).is_err(), "five rows");
    let mut res = upload::<T>(k, &[0.0; 2]);
    let x = upload::<T>(k, &[0.0; 60]);
    let w = upload::<T>(k, &[0.0; 120]);
    assert!(
        k.gemv_add(&mut res, &x, &w, 60).is_err() || T::SUFFIX == "f32",
        "60 is not whole 16-byte chunks of 16-bit values"
    );
}

/// `gemv_norm` into `[q; k; v]` with rotary and the cache write folded in, against the norm,
/// the projection (rounded as `linear` stores it), `rotary_table` and `write_kv` references:
/// GQA 4 over 2 heads of 16, 1 to 4 rows, one row's slot negative (not cached).
fn gemv_rope<T: Dtype>(k: &Kernels, rng: &mut TestRng) {
    let round = |v: f64| T::from_f32(v as f32).to_f32();
    let (q_heads, kv_heads, head_dim, width) = (4, 2, 16, 96);
    let n = (q_heads + 2 * kv_heads) * head_dim;
    let kv_width = kv_heads * head_dim;
    for rows in 1..=4 {
        let scale = 1.0 / (width as f32).sqrt();
        let w = rounded::<T>(
            &rng.vec(n * width)
                .iter()
                .map(|v| v * scale)
                .collect::<Vec<_>>(),
        );
        let (x, norm) = (
            rounded::<T>(&rng.vec(rows * width)),
            rounded::<T>(&rng.vec(width)),
        );
        let angles: Vec<f32> = (0..rows * head_dim / 2).map(|i| i as f32 * 0.37).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let slots: Vec<i64> = [7, -1, 0, 12][..rows].to_vec();
        let cache_len = 16 * kv_width;
        let (k_init, v_init) = (
            rounded::<T>(&rng.vec(cache_len)),
            rounded::<T>(&rng.vec(cache_len)),
        );
        let (mut kc, mut vc) = (upload::<T>(k, &k_init), upload::<T>(k, &v_init));
        let (d_cos, d_sin) = (
            k.stream().clone_htod(&cos).unwrap(),
            k.stream().clone_htod(&sin).unwrap(),
        );
        let d_slots = k.stream().clone_htod(&slots).unwrap();
        let mut out = poisoned::<T>(k, rows * n);
        let rope = RotaryKv {
            cos: &d_cos,
            sin: &d_sin,
            num_q_heads: q_heads,
            num_kv_heads: kv_heads,
            head_dim,
            k_cache: &mut kc,
            v_cache: &mut vc,
            slots: &d_slots,
        };
        k.gemv_norm(
            &mut out,
            &upload::<T>(k, &x),
            &upload::<T>(k, &norm),
            1e-5,
            &upload::<T>(k, &w),
            width,
            GemvThen::Rotary(rope),
        )
        .unwrap();

        let normed: Vec<f32> = reference::rms_norm(&x, &norm, width, 1e-5)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let qkv: Vec<f32> = reference::matmul_t(&normed, &w, width)
            .into_iter()
            .map(round)
            .collect();
        let rotated = reference::rotary_table(&qkv, n, &cos, &sin, q_heads + kv_heads, head_dim);
        let what = format!("gemv_norm_rope {} {rows} rows", T::SUFFIX);
        assert_close(&what, &download(k, &out), &rotated, tol::<T>(false));
        let stored: Vec<f32> = rotated.iter().map(|&v| round(v)).collect();
        let (kq, vq) = (q_heads * head_dim, q_heads * head_dim + kv_width);
        let write = CacheWrite {
            k_rows: &stored[kq..],
            v_rows: &stored[vq..],
            stride: n,
            width: kv_width,
            slots: &slots,
            k_init: &k_init,
            v_init: &v_init,
        };
        let t = tol::<T>(false);
        assert_cache_write(&what, k, (&kc, &vc), write, (t, t));
    }
}

/// A cache write as the reference does it: the k and v rows (row stride `stride`, `width`
/// wide) to their slots over the caches' initial contents.
struct CacheWrite<'a> {
    k_rows: &'a [f32],
    v_rows: &'a [f32],
    stride: usize,
    width: usize,
    slots: &'a [i64],
    k_init: &'a [f32],
    v_init: &'a [f32],
}

/// The device caches against the reference's `write`, k and v each within its tolerance.
fn assert_cache_write<T: Dtype>(
    what: &str,
    k: &Kernels,
    (kc, vc): (&CudaSlice<T>, &CudaSlice<T>),
    write: CacheWrite<'_>,
    (k_tol, v_tol): (Tol, Tol),
) {
    let (mut want_k, mut want_v) = (write.k_init.to_vec(), write.v_init.to_vec());
    reference::write_kv(
        write.k_rows,
        write.v_rows,
        write.stride,
        write.width,
        write.slots,
        &mut want_k,
        &mut want_v,
    );
    let as64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    assert_close(
        &format!("{what} k"),
        &download(k, kc),
        &as64(&want_k),
        k_tol,
    );
    assert_close(
        &format!("{what} v"),
        &download(k, vc),
        &as64(&want_v),
        v_tol,
    );
}

pub fn elementwise<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(2);
    // Rotary on a fused qkv row (q: 8 heads, k: 2 heads, v after them), Llama-3-like frequencies.
    for head_dim in [64, 128] {
        let (nq, nkv, tokens) = (8, 2, 19);
        let stride = (nq + 2 * nkv) * head_dim;
        let qkv = rounded::<T>(&rng.vec(tokens * stride));
        let positions: Vec<i32> = (0..tokens as i32).map(|i| i * 977 % 70_000).collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut d_qkv = upload::<T>(k, &qkv);
        let (dp, df) = (
            k.stream().clone_htod(&positions).unwrap(),
            k.stream().clone_htod(&inv_freq).unwrap(),
        );
        k.rotary(&mut d_qkv, stride, &dp, &df, nq, nkv, head_dim)
            .unwrap();
        let want = reference::rotary(&qkv, stride, &positions, &inv_freq, nq + nkv, head_dim);
        assert_close(
            &format!("rotary {} d{head_dim}", T::SUFFIX),
            &download(k, &d_qkv),
            &want,
            tol::<T>(false),
        );
    }
    // The same rotation from per-token cos/sin tables, and the bias add.
    {
        let (heads, head_dim, tokens) = (6, 128, 9);
        let stride = heads * head_dim + 64;
        let qk = rounded::<T>(&rng.vec(tokens * stride));
        let angles: Vec<f32> = (0..tokens * head_dim / 2)
            .map(|i| i as f32 * 0.37)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let mut d = upload::<T>(k, &qk);
        let (dc, ds) = (
            k.stream().clone_htod(&cos).unwrap(),
            k.stream().clone_htod(&sin).unwrap(),
        );
        k.rotary_table(&mut d, stride, &dc, &ds, heads, head_dim)
            .unwrap();
        let want = reference::rotary_table(&qk, stride, &cos, &sin, heads, head_dim);
        assert_close(
            &format!("rotary_table {}", T::SUFFIX),
            &download(k, &d),
            &want,
            tol::<T>(false),
        );
        let (rows, cols) = (5, 700);
        let x = rounded::<T>(&rng.vec(rows * cols));
        let bias = rounded::<T>(&rng.vec(cols));
        let mut dx = upload::<T>(k, &x);
        k.add_bias(&mut dx, &upload::<T>(k, &bias)).unwrap();
        assert_close(
            &format!("add_bias {}", T::SUFFIX),
            &download(k, &dx),
            &reference::add_bias(&x, &bias),
            tol::<T>(false),
        );
    }
    // SiLU-and-mul, including a width that is not a multiple of the block.
    for (rows, inter) in [(3, 300), (16, 11008)] {
        let gu = rounded::<T>(
            &rng.vec(rows * 2 * inter)
                .iter()
                .map(|v| v * 6.0)
                .collect::<Vec<_>>(),
        );
        let mut out = poisoned::<T>(k, rows * inter);
        k.silu_mul(&mut out, &upload::<T>(k, &gu), inter).unwrap();
        assert_close(
            &format!("silu_mul {} {rows}x{inter}", T::SUFFIX),
            &download(k, &out),
            &reference::silu_mul(&gu, inter),
            tol::<T>(false),
        );
    }
    // Embedding gather, with an out-of-vocabulary id.
    let (vocab, hidden) = (1000, 96);
    let table = rounded::<T>(&rng.vec(vocab * hidden));
    let ids: Vec<u32> = vec![0, 999, 5, 5, 1000, 17];
    let mut out = poisoned::<T>(k, ids.len() * hidden);
    k.embed(
        &mut out,
        &upload::<T>(k, &table),
        &k.stream().clone_htod(&ids).unwrap(),
        hidden,
    )
    .unwrap();
    let want: Vec<f64> = reference::embed(&table, &ids, hidden)
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert_close(
        &format!("embed {}", T::SUFFIX),
        &download(k, &out),
        &want,
        Tol {
            atol: 0.0,
            rtol: 0.0,
        },
    );
}

pub fn sampling<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(3);
    let (rows, vocab, topk) = (5, 32_000, 40);
    let mut logits = rounded::<T>(
        &rng.vec(rows * vocab)
            .iter()
            .map(|v| v * 10.0)
            .collect::<Vec<_>>(),
    );
    // Ties and a NaN: the lower id wins, NaN ranks last. Row 1's two far-ahead values leave
    // fewer than k within top_k's widest band, and row 4 is flat (every value ties), so both
    // take top_k's fallback; the others its banded path.
    logits[vocab + 10] = 50.0;
    logits[vocab + 20] = 50.0;
    logits[2 * vocab] = f32::NAN;
    logits[4 * vocab..].fill(1.5);
    let d = upload::<T>(k, &logits);
    let mut am = k.stream().alloc_zeros::<i32>(rows).unwrap();
    k.argmax(&d, vocab, &mut am).unwrap();
    assert_eq!(
        k.stream().clone_dtoh(&am).unwrap(),
        reference::argmax(&logits, vocab),
        "argmax {}",
        T::SUFFIX
    );
    let mut values = k.stream().alloc_zeros::<f32>(rows * topk).unwrap();
    let mut ids = k.stream().alloc_zeros::<i32>(rows * topk).unwrap();
    k.top_k(&d, vocab, topk, &mut values, &mut ids).unwrap();
    let (want_v, want_i) = reference::top_k(&logits, vocab, topk);
    assert_eq!(
        k.stream().clone_dtoh(&ids).unwrap(),
        want_i,
        "top_k ids {}",
        T::SUFFIX
    );
    assert_eq!(
        k.stream().clone_dtoh(&values).unwrap(),
        want_v,
        "top_k values {}",
        T::SUFFIX
    );

    // softmax_draw: temperature 0 is the argmax; otherwise the drawn token is where u times
    // the row's softmax mass falls in its running sum (within rounding: 1e-5 of the total),
    // for u from 0 to just below 1, on the rows above (ties, a NaN, a partial last tile).
    for (temperature, us) in [
        (0.0f32, [0.5f64; 5]),
        (1.0, [0.0, 0.25, 0.5, 0.75, 0.999_999]),
        (0.5, [0.9, 0.1, 0.3, 0.000_01, 0.6]),
        (3.0, [0.42, 0.97, 0.01, 0.5, 0.2]),
    ] {
        let t = k.stream().clone_htod(&[temperature; 5]).unwrap();
        let u = k.stream().clone_htod(&us).unwrap();
        let mut drawn = k.stream().alloc_zeros::<i32>(rows).unwrap();
        k.softmax_draw(&d, vocab, &t, &u, &mut drawn).unwrap();
        let drawn = k.stream().clone_dtoh(&drawn).unwrap();
        if temperature == 0.0 {
            assert_eq!(
                drawn,
                reference::argmax(&logits, vocab),
                "softmax_draw at 0"
            );
            continue;
        }
        for (r, (row, (&tok, &u))) in logits.chunks(vocab).zip(drawn.iter().zip(&us)).enumerate() {
            let cum = reference::softmax_cumulative(row, temperature);
            let total = *cum.last().unwrap();
            let tok = tok as usize;
            let before = if tok == 0 { 0.0 } else { cum[tok - 1] };
            let slack = 1e-5 * total;
            assert!(
                cum[tok] > before && before - slack <= u * total && u * total <= cum[tok] + slack,
                "softmax_draw {} row {r} at t {temperature}, u {u}: token {tok} spans [{before}, {}] of {total}",
                T::SUFFIX,
                cum[tok]
            );
        }
    }
    // softmax_mass: each row's total of the running sums above, within rounding.
    let t = k.stream().clone_htod(&[0.7f32; 5]).unwrap();
    let mut mass = k.stream().alloc_zeros::<f32>(rows).unwrap();
    k.softmax_mass(&d, vocab, &t, &mut mass).unwrap();
    for (r, (row, &got)) in logits
        .chunks(vocab)
        .zip(&k.stream().clone_dtoh(&mass).unwrap())
        .enumerate()
    {
        let want = *reference::softmax_cumulative(row, 0.7).last().unwrap();
        assert!(
            (got as f64 - want).abs() <= 1e-5 * want,
            "softmax_mass {} row {r}: {got} vs {want}",
            T::SUFFIX
        );
    }
    // edit_logits: scaled by sign, shifted, forbidden; edits past the rows or the vocabulary
    // are skipped. Compared with LogitEdit::apply, rounded to the storage type (within the
    // dtype's tolerance: a GPU may fuse the scale and shift into one rounding).
    let edits = [
        LogitEdit {
            row: 0,
            token: 3,
            scale_pos: 0.5,
            scale_neg: 2.0,
            add: -0.25,
        },
        LogitEdit {
            row: 2,
            token: 100,
            scale_pos: 0.8,
            scale_neg: 1.25,
            add: 0.0,
        },
        LogitEdit {
            add: 3.0,
            ..LogitEdit::none(4, 31_999)
        },
        LogitEdit {
            add: f32::NEG_INFINITY,
            ..LogitEdit::none(3, 0)
        },
        LogitEdit {
            add: 1.0,
            ..LogitEdit::none(rows as u32, 0)
        },
        LogitEdit {
            add: 1.0,
            ..LogitEdit::none(0, vocab as u32)
        },
    ];
    let mut edited = upload::<T>(k, &logits);
    k.edit_logits(&mut edited, vocab, &k.stream().clone_htod(&edits).unwrap())
        .unwrap();
    let mut want = logits.clone();
    for e in &edits[..4] {
        let at = e.row as usize * vocab + e.token as usize;
        want[at] = rounded::<T>(&[e.apply(logits[at])])[0];
    }
    let got = download(k, &edited);
    let t = tol::<T>(false);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let close = (g - w).abs() as f64 <= t.atol + t.rtol * w.abs() as f64;
        assert!(
            g == w || close || (g.is_nan() && w.is_nan()),
            "edit_logits {} at {i}: {g} vs {w}",
            T::SUFFIX
        );
    }
    // Shapes: a row count other than the temperatures', a vocabulary past the kernel's tiles.
    let t = k.stream().clone_htod(&[1.0f32; 4]).unwrap();
    let u = k.stream().clone_htod(&[0.5f64; 5]).unwrap();
    let mut drawn = k.stream().alloc_zeros::<i32>(rows).unwrap();
    assert!(k.softmax_draw(&d, vocab, &t, &u, &mut drawn).is_err());
    let t = k.stream().clone_htod(&[1.0f32; 5]).unwrap();
    assert!(
        k.softmax_draw(&d, SOFTMAX_DRAW_MAX_VOCAB + 1, &t, &u, &mut drawn)
            .is_err()
    );
}

/// A random paged cache with `contexts.len()` sequences, blocks handed out in scrambled order.
struct Batch {
    layout: KvLayout,
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<Vec<u32>>,
    max_blocks: usize,
}

fn batch<T: Dtype>(
    rng: &mut TestRng,
    contexts: &[usize],
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Batch {
    let blocks: usize = contexts
        .iter()
        .map(|c| c.div_ceil(block_size))
        .sum::<usize>()
        + 3;
    let layout = KvLayout {
        num_blocks: blocks,
        block_size,
        num_kv_heads: kv_heads,
        head_dim,
    };
    let mut order: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut next = order.into_iter();
    let tables: Vec<Vec<u32>> = contexts
        .iter()
        .map(|c| {
            (0..c.div_ceil(block_size))
                .map(|_| next.next().unwrap())
                .collect()
        })
        .collect();
    let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(1).max(1);
    Batch {
        layout,
        k: rounded::<T>(&rng.vec(layout.elements())),
        v: rounded::<T>(&rng.vec(layout.elements())),
        tables,
        max_blocks,
    }
}

struct Uploaded<T> {
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    tables: CudaSlice<i32>,
    lens: CudaSlice<i32>,
}

fn upload_batch<T: Dtype>(k: &Kernels, b: &Batch, contexts: &[usize]) -> Uploaded<T> {
    let mut flat = vec![0i32; contexts.len() * b.max_blocks];
    for (s, t) in b.tables.iter().enumerate() {
        for (i, &block) in t.iter().enumerate() {
            flat[s * b.max_blocks + i] = block as i32;
        }
    }
    let lens: Vec<i32> = contexts.iter().map(|&c| c as i32).collect();
    Uploaded {
        k: upload::<T>(k, &b.k),
        v: upload::<T>(k, &b.v),
        tables: k.stream().clone_htod(&flat).unwrap(),
        lens: k.stream().clone_htod(&lens).unwrap(),
    }
}

pub fn decode<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(4);
    let contexts = [1usize, 17, 100, 513, 1100];
    for head_dim in [16, 32, 64, 80, 96, 128, 256] {
        for block_size in [16, 32] {
            for (q_heads, kv_heads) in [(4, 4), (8, 2), (16, 2), (16, 1)] {
                let b = batch::<T>(&mut rng, &contexts, kv_heads, head_dim, block_size);
                let u = upload_batch::<T>(k, &b, &contexts);
                let q = rounded::<T>(&rng.vec(contexts.len() * q_heads * head_dim));
                let dq = upload::<T>(k, &q);
                let cache = PagedCache {
                    k: &u.k,
                    v: &u.v,
                    block_tables: &u.tables,
                    max_blocks: b.max_blocks,
                    context_lens: &u.lens,
                    block_size,
                    num_kv_heads: kv_heads,
                    head_dim,
                };
                let seqs: Vec<SeqAttention> = contexts
                    .iter()
                    .enumerate()
                    .map(|(s, &c)| SeqAttention {
                        q_start: s,
                        q_len: 1,
                        context_len: c,
                        block_table: b.tables[s].clone(),
                    })
                    .collect();
                let scale = 1.0 / (head_dim as f32).sqrt();
                let want = reference::paged_attention(
                    &q,
                    q_heads * head_dim,
                    PagedKv {
                        k: &b.k,
                        v: &b.v,
                        layout: b.layout,
                    },
                    q_heads,
                    &seqs,
                    scale,
                );
                // Once, more partitions than a warp has lanes (the merge's weights loop twice).
                let many = head_dim == 128 && block_size == 16 && kv_heads == 2 && q_heads == 8;
                let splits = [Split::Partitions(1), Split::Partitions(4), Split::Auto]
                    .into_iter()
                    .chain(many.then_some(Split::Partitions(100)));
                for split in splits {
                    let mut out = poisoned::<T>(k, contexts.len() * q_heads * head_dim);
                    let parts = k
                        .decode_attention(
                            &mut out,
                            &dq.slice(..),
                            q_heads * head_dim,
                            &cache,
                            q_heads,
                            1100,
                            scale,
                            split,
                        )
                        .unwrap();
                    assert_close(
                        &format!(
                            "decode {} d{head_dim} bs{block_size} gqa {q_heads}/{kv_heads} {parts} partitions",
                            T::SUFFIX
                        ),
                        &download(k, &out),
                        &want,
                        tol::<T>(true),
                    );
                }
            }
        }
    }
}

/// A split asks for at most as many partitions as the merge weighs (attention.cu's
/// MERGE_MAX_PARTS), whatever the caller asks.
pub fn decode_plan_caps_partitions(k: &Kernels) {
    let (k_cache, v_cache) = (
        k.stream().alloc_zeros::<f32>(16 * 128).unwrap(),
        k.stream().alloc_zeros::<f32>(16 * 128).unwrap(),
    );
    let tables = k.stream().alloc_zeros::<i32>(1).unwrap();
    let lens = k.stream().alloc_zeros::<i32>(1).unwrap();
    let cache = PagedCache {
        k: &k_cache,
        v: &v_cache,
        block_tables: &tables,
        max_blocks: 1,
        context_lens: &lens,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 128,
    };
    let plan = k.decode_plan(1, 4, &cache, 1 << 20, Split::Partitions(10_000));
    assert_eq!(plan.partitions, 512);
    assert_eq!(plan.partition_size, (1 << 20) / 512);
    let auto = k.decode_plan(1, 4, &cache, 1 << 20, Split::Auto);
    assert!((2..=512).contains(&auto.partitions), "{auto:?}");

    // A plan is checked against the launch that uses it: one made for a single sequence does
    // not fit two (the split would write past its scratch), nor one edited past the cap.
    let (tables2, lens2) = (
        k.stream().alloc_zeros::<i32>(2).unwrap(),
        k.stream().alloc_zeros::<i32>(2).unwrap(),
    );
    let two = PagedCache {
        block_tables: &tables2,
        context_lens: &lens2,
        ..cache
    };
    let q = k.stream().alloc_zeros::<f32>(2 * 4 * 128).unwrap();
    let mut out = k.stream().alloc_zeros::<f32>(2 * 4 * 128).unwrap();
    let mut launch = |plan: &DecodePlan| {
        let mut part_out = k.stream().alloc_zeros::<f32>(plan.scratch_len).unwrap();
        let mut part_ml = k.stream().alloc_zeros::<f32>(plan.ml_len).unwrap();
        k.decode_attention_planned(
            &mut out,
            &q.slice(..),
            4 * 128,
            &two,
            4,
            1.0,
            plan,
            &mut part_out,
            &mut part_ml,
        )
    };
    assert!(launch(&k.decode_plan(1, 4, &cache, 64, Split::Partitions(4))).is_err());
    let mut fits = k.decode_plan(2, 4, &two, 64, Split::Partitions(4));
    launch(&fits).unwrap();
    fits.partitions = 600;
    assert!(launch(&fits).is_err());
}

pub fn prefill<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(5);
    // (new query rows, context): plain prompts, prompts after a cached prefix, single rows,
    // and a long one spanning several CTAs and key tiles.
    let shapes = [(5usize, 5usize), (3, 40), (17, 17), (1, 33), (70, 130)];
    let contexts: Vec<usize> = shapes.iter().map(|s| s.1).collect();
    for head_dim in [16, 32, 64, 80, 96, 128, 256] {
        // GQA groups of 1, 4, 8 and 3 (a group that does not divide the tensor-core kernel's
        // 64 (token, head) rows, so a token's heads straddle warps and tiles).
        for (q_heads, kv_heads, block_size) in [(4, 4, 16), (8, 2, 32), (16, 2, 16), (6, 2, 32)] {
            let b = batch::<T>(&mut rng, &contexts, kv_heads, head_dim, block_size);
            let u = upload_batch::<T>(k, &b, &contexts);
            let rows: usize = shapes.iter().map(|s| s.0).sum();
            // q rows inside a fused qkv activation: stride wider than the q heads.
            let stride = (q_heads + 2 * kv_heads) * head_dim;
            let q = rounded::<T>(&rng.vec(rows * stride));
            let mut cu = vec![0i32];
            let mut seqs = Vec::new();
            for (s, &(q_len, ctx)) in shapes.iter().enumerate() {
                seqs.push(SeqAttention {
                    q_start: *cu.last().unwrap() as usize,
                    q_len,
                    context_len: ctx,
                    block_table: b.tables[s].clone(),
                });
                cu.push(cu.last().unwrap() + q_len as i32);
            }
            let cache = PagedCache {
                k: &u.k,
                v: &u.v,
                block_tables: &u.tables,
                max_blocks: b.max_blocks,
                context_lens: &u.lens,
                block_size,
                num_kv_heads: kv_heads,
                head_dim,
            };
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut out = poisoned::<T>(k, rows * q_heads * head_dim);
            let dq = upload::<T>(k, &q);
            k.prefill_attention(
                &mut out,
                &dq.slice(..),
                stride,
                &cache,
                &k.stream().clone_htod(&cu).unwrap(),
                q_heads,
                70,
                scale,
            )
            .unwrap();
            let want = reference::paged_attention(
                &q,
                stride,
                PagedKv {
                    k: &b.k,
                    v: &b.v,
                    layout: b.layout,
                },
                q_heads,
                &seqs,
                scale,
            );
            assert_close(
                &format!(
                    "prefill {} d{head_dim} bs{block_size} gqa {q_heads}/{kv_heads}",
                    T::SUFFIX
                ),
                &download(k, &out),
                &want,
                tol::<T>(true),
            );
        }
    }
}

pub fn cache_write<T: Dtype>(k: &Kernels) {
    let mut rng = TestRng::new(6);
    let (kv_heads, head_dim, q_heads) = (2, 64, 8);
    let width = kv_heads * head_dim;
    let stride = (q_heads + 2 * kv_heads) * head_dim;
    let tokens = 9;
    let qkv = rounded::<T>(&rng.vec(tokens * stride));
    let slots: Vec<i64> = vec![5, 0, -1, 31, 16, 17, -1, 2, 40];
    let cache_len = 48 * width;
    let k_init = rounded::<T>(&rng.vec(cache_len));
    let v_init = rounded::<T>(&rng.vec(cache_len));
    let (mut kc, mut vc) = (upload::<T>(k, &k_init), upload::<T>(k, &v_init));
    let d_qkv = upload::<T>(k, &qkv);
    let (kq, vq) = (q_heads * head_dim, q_heads * head_dim + width);
    k.write_kv(
        &d_qkv.slice(kq..),
        &d_qkv.slice(vq..),
        stride,
        width,
        &mut kc,
        &mut vc,
        &k.stream().clone_htod(&slots).unwrap(),
    )
    .unwrap();
    let exact = Tol {
        atol: 0.0,
        rtol: 0.0,
    };
    let write = CacheWrite {
        k_rows: &qkv[kq..],
        v_rows: &qkv[vq..],
        stride,
        width,
        slots: &slots,
        k_init: &k_init,
        v_init: &v_init,
    };
    let what = format!("write_kv {}", T::SUFFIX);
    assert_cache_write(&what, k, (&kc, &vc), write, (exact, exact));

    // Rotary and the cache write fused: the q and k heads rotate in place, v stays, and the
    // caches get the rotated k (as stored in T) and v.
    let angles: Vec<f32> = (0..tokens * head_dim / 2)
        .map(|i| i as f32 * 0.29)
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let (mut kc, mut vc) = (upload::<T>(k, &k_init), upload::<T>(k, &v_init));
    let mut d_qkv = upload::<T>(k, &qkv);
    k.rotary_write_kv(
        &mut d_qkv,
        stride,
        &k.stream().clone_htod(&cos).unwrap(),
        &k.stream().clone_htod(&sin).unwrap(),
        q_heads,
        kv_heads,
        head_dim,
        &mut kc,
        &mut vc,
        &k.stream().clone_htod(&slots).unwrap(),
    )
    .unwrap();
    let rotated = reference::rotary_table(&qkv, stride, &cos, &sin, q_heads + kv_heads, head_dim);
    let what = format!("rotary_write_kv {}", T::SUFFIX);
    assert_close(&what, &download(k, &d_qkv), &rotated, tol::<T>(false));
    let stored = rounded::<T>(&rotated.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let write = CacheWrite {
        k_rows: &stored[kq..],
        v_rows: &qkv[vq..],
        stride,
        width,
        slots: &slots,
        k_init: &k_init,
        v_init: &v_init,
    };
    assert_cache_write(&what, k, (&kc, &vc), write, (tol::<T>(false), exact));
}

/// The kernel tests, each `#[ignore = $why]`, on the `Kernels` that `$kernels` opens.
#[macro_export]
macro_rules! kernel_tests {
    ($why:literal, $kernels:expr) => {
        use suite::*;

        #[test]
        #[ignore = $why]
        fn norms_match_the_reference() {
            for_each_dtype(&$kernels, &mut |k, dtype| dispatch!(dtype, norms, k));
        }

        #[test]
        #[ignore = $why]
        fn rotary_silu_and_embedding_match_the_reference() {
            for_each_dtype(&$kernels, &mut |k, dtype| dispatch!(dtype, elementwise, k));
        }

        #[test]
        #[ignore = $why]
        fn fused_small_batch_projections_match_the_reference() {
            for_each_dtype(&$kernels, &mut |k, dtype| dispatch!(dtype, gemv, k));
        }

        #[test]
        #[ignore = $why]
        fn sampling_kernels_match_the_reference() {
            for_each_dtype(&$kernels, &mut |k, dtype| dispatch!(dtype, sampling, k));
        }

        #[test]
        #[ignore = $why]
        fn cache_write_scatters_by_slot_and_skips_negative_slots() {
            for_each_dtype(&$kernels, &mut |k, dtype| dispatch!(dtype, cache_write, k));
        }

        #[test]
        #[ignore = $why]
        fn decode_attention_split_and_unsplit_match_the_reference() {
            let k = $kernels;
            decode_plan_caps_partitions(&k);
            for_each_dtype(&k, &mut |k, dtype| dispatch!(dtype, decode, k));
        }

        #[test]
        #[ignore = $why]
        fn prefill_attention_matches_the_reference() {
            for_each_dtype(&$kernels, &mut |k, dtype| dispatch!(dtype, prefill, k));
        }
    };
}
