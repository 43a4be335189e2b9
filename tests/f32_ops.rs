//! The f32 operators swapped at load (`runtime::f32_ops`) against tract's own and the
//! definition (f64): attention `softmax(q·kᵀ)·v` with few and many query rows, broadcast batch
//! (one image's cross-attention keys against a beam's queries), odd row lengths; the GELU, the
//! layer norm and the axis moves that keep the last axis. Each case also
//! checks how many nodes were swapped, so a comparison cannot pass by comparing tract with itself.
#![cfg(feature = "host")]

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;
use vitgpt2::export::onnx::{Attr, Dim, GraphBuilder};
use vitgpt2::rng::SplitMix;
use vitgpt2::runtime::graph::{optimize_with, Int8Gemm};

struct Case {
    /// Query batch, key/value batch (1 or the same), heads, query rows, key rows, head size.
    b: usize,
    bk: usize,
    h: usize,
    m: usize,
    n: usize,
    d: usize,
    /// The query batch symbolic in the graph (as the decoder's beam), `b` at run time.
    sym: bool,
    /// The output as `[b, m, h, d]` (heads after rows, as ViT's attention before its output
    /// projection), so the last product writes its batches strided.
    heads_last: bool,
}

fn random(rng: &mut SplitMix, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale).collect()
}

/// `softmax(q·kᵀ)·v` as ONNX (MatMul, Transpose, Softmax(axis -1), MatMul); returns
/// (swapped nodes, output with the swap, output without, the definition).
fn run_case(c: &Case, seed: u64) -> (usize, Vec<f32>, Vec<f32>, Vec<f64>) {
    let mut rng = SplitMix::new(seed);
    let mut g = GraphBuilder::new("attention");
    let fixed = |v: &[usize]| v.iter().map(|&x| Dim::Fixed(x)).collect::<Vec<_>>();
    let mut q_dims = fixed(&[c.b, c.h, c.m, c.d]);
    if c.sym {
        q_dims[0] = Dim::Sym("B");
    }
    let q = g.input("q", DataType::Float, &q_dims);
    let k = g.input("k", DataType::Float, &fixed(&[c.bk, c.h, c.n, c.d]));
    let v = g.input("v", DataType::Float, &fixed(&[c.bk, c.h, c.n, c.d]));
    let kt = g.node("Transpose", &[&k], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]);
    let s = g.node("MatMul", &[&q, &kt], vec![]);
    let p = g.node("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
    let y = g.node("MatMul", &[&p, &v], vec![]);
    let (y, y_dims) = if c.heads_last {
        let t = g.node("Transpose", &[&y], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        (t, vec![q_dims[0].clone(), Dim::Fixed(c.m), Dim::Fixed(c.h), Dim::Fixed(c.d)])
    } else {
        (y, q_dims.clone())
    };
    g.output(&y, "y", DataType::Float, &y_dims);
    let proto = g.finish("f32 ops check", &[]);
    let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");

    // Scores of a few units, as in attention after the 1/√d scale.
    let (qv, kv, vv) = (random(&mut rng, c.b * c.h * c.m * c.d, 1.0), random(&mut rng, c.bk * c.h * c.n * c.d, 1.0), random(&mut rng, c.bk * c.h * c.n * c.d, 1.0));
    let values: TVec<TValue> = tvec![
        Tensor::from_shape(&[c.b, c.h, c.m, c.d], &qv).unwrap().into_tvalue(),
        Tensor::from_shape(&[c.bk, c.h, c.n, c.d], &kv).unwrap().into_tvalue(),
        Tensor::from_shape(&[c.bk, c.h, c.n, c.d], &vv).unwrap().into_tvalue(),
    ];
    let mut naive = vec![0f64; c.b * c.h * c.m * c.d];
    for bi in 0..c.b {
        let bk = if c.bk == 1 { 0 } else { bi };
        for hi in 0..c.h {
            let kvo = (bk * c.h + hi) * c.n * c.d;
            for mi in 0..c.m {
                let qo = ((bi * c.h + hi) * c.m + mi) * c.d;
                let yo = if c.heads_last { ((bi * c.m + mi) * c.h + hi) * c.d } else { qo };
                let s: Vec<f64> = (0..c.n).map(|j| (0..c.d).map(|l| qv[qo + l] as f64 * kv[kvo + j * c.d + l] as f64).sum()).collect();
                let max = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for l in 0..c.d {
                    naive[yo + l] = (0..c.n).map(|j| e[j] / sum * vv[kvo + j * c.d + l] as f64).sum();
                }
            }
        }
    }
    let run = |swap: bool| {
        let (typed, _) = optimize_with(model.clone(), Int8Gemm::Tract, swap).expect("optimizes");
        let swapped = typed.nodes().iter().filter(|n| matches!(&*n.op().name(), "RowSoftmax" | "FewRowMatMul" | "BatchedMatMul")).count();
        let out = typed.into_runnable().expect("runnable").run(values.clone()).expect("runs");
        (swapped, out[0].to_plain_array_view::<f32>().expect("f32 output").iter().copied().collect::<Vec<_>>())
    };
    let (swapped, ours) = run(true);
    let (none, tract) = run(false);
    assert_eq!(none, 0);
    (swapped, ours, tract, naive)
}

/// The tests that run graphs take turns: one of them sets the process's thread count.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn attention_on_the_swapped_ops_matches_tract_and_the_definition() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cases = [
        // A decoder step's cross-attention: 1 query row, 197 keys, keys of one image for a beam of 4.
        Case { b: 4, bk: 1, h: 3, m: 1, n: 197, d: 64, sym: false, heads_last: false },
        Case { b: 4, bk: 1, h: 3, m: 1, n: 197, d: 64, sym: true, heads_last: false },
        Case { b: 2, bk: 1, h: 1, m: 1, n: 9, d: 5, sym: true, heads_last: false },
        // Self-attention over the cache: batch on both sides, odd lengths.
        Case { b: 2, bk: 2, h: 2, m: 1, n: 1, d: 64, sym: false, heads_last: false },
        Case { b: 3, bk: 3, h: 1, m: 3, n: 31, d: 17, sym: false, heads_last: false },
        Case { b: 1, bk: 1, h: 2, m: 15, n: 5, d: 8, sym: false, heads_last: false },
        // The encoder's: many rows (BatchedMatMul), heads first or after the rows.
        Case { b: 1, bk: 1, h: 2, m: 197, n: 197, d: 64, sym: false, heads_last: false },
        Case { b: 1, bk: 1, h: 3, m: 197, n: 197, d: 64, sym: false, heads_last: true },
        Case { b: 1, bk: 1, h: 1, m: 16, n: 3, d: 7, sym: false, heads_last: false },
        // Many rows with a broadcast batch, a symbolic one, odd sizes.
        Case { b: 3, bk: 1, h: 2, m: 21, n: 13, d: 9, sym: false, heads_last: true },
        Case { b: 2, bk: 1, h: 5, m: 17, n: 2, d: 3, sym: true, heads_last: false },
    ];
    for (i, c) in cases.iter().enumerate() {
        let (swapped, ours, tract, naive) = run_case(c, 100 + i as u64);
        // Softmax and both products (FewRowMatMul under 16 query rows, else BatchedMatMul).
        let want = 3;
        assert_eq!(swapped, want, "case {i}: swapped nodes");
        // Outputs are convex combinations of values in [-1, 1]: absolute errors. Both f32 paths
        // stay within 1.3e-6 of the f64 definition on these cases (197 keys of 64 terms the
        // worst); 4e-6 leaves 3× for another CPU's kernels. A wrong row length, axis or
        // broadcast is off by ~1e-1.
        let err = |x: &[f32]| x.iter().zip(&naive).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        let (e_ours, e_tract) = (err(&ours), err(&tract));
        eprintln!("case {i}: max |ours − definition| = {e_ours:.2e}, |tract − definition| = {e_tract:.2e}");
        assert!(e_ours < 4e-6, "case {i}: swapped ops off the definition by {e_ours}");
        assert!(e_tract < 4e-6, "case {i}: tract off the definition by {e_tract}");
    }
}

#[test]
fn many_rows_give_the_same_bits_on_two_threads() {
    // ViT-B/16's attention. With 2 threads the heads go through rayon's pool (and rten-gemm may
    // split a head's columns), with 1 one after the other: a product's sums must not depend on
    // which, or on how the work was scheduled.
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = Case { b: 1, bk: 1, h: 12, m: 197, n: 197, d: 64, sym: false, heads_last: true };
    vitgpt2::runtime::set_threads(1);
    let (swapped, one, _, _) = run_case(&c, 7);
    vitgpt2::runtime::set_threads(2);
    let (_, two, _, _) = run_case(&c, 7);
    vitgpt2::runtime::set_threads(1);
    assert_eq!(swapped, 3);
    assert!(one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()), "2 threads changed the results");
}

#[test]
fn softmax_rows_of_every_length_match_the_definition() {
    let mut rng = SplitMix::new(3);
    for len in 1..=70 {
        let x = random(&mut rng, len, 8.0);
        let mut y = x.clone();
        vitgpt2::runtime::f32_ops::softmax_row(&mut y);
        let max = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (a, b) in y.iter().zip(&x) {
            let want = (*b as f64 - max).exp() / sum;
            // rten-vecmath documents ≤ 3 ulp; 1e-6 relative (≈ 8 ulp) leaves room for the sum.
            assert!((*a as f64 - want).abs() <= 1e-6 * want + 1e-12, "len {len}: {a} vs {want}");
        }
    }
}

/// `model` optimized with or without the f32 swaps (tract's own int8) and run on `input`: its
/// ops' names and its f32 outputs.
fn run_graph(model: &InferenceModel, input: &TVec<TValue>, swap: bool) -> (Vec<String>, Vec<Vec<f32>>) {
    let (typed, _) = optimize_with(model.clone(), Int8Gemm::Tract, swap).expect("optimizes");
    let names: Vec<String> = typed.nodes().iter().map(|n| n.op().name().to_string()).collect();
    let out = typed.into_runnable().expect("runnable").run(input.clone()).expect("runs");
    (names, out.iter().map(|t| t.to_plain_array_view::<f32>().expect("f32 output").iter().copied().collect()).collect())
}

#[test]
fn gelu_on_the_swapped_op_gives_tracts_bits_on_one_and_two_threads() {
    // ViT's MLP activation as the exporters write it: x/2 · (1 + erf(x/√2)), which tract's
    // declutter fuses into GeluExact and f32_ops swaps for GeluExactRows (rows halved on the
    // helper thread with 2 threads). Same erf kernel and order: the same bits as tract's.
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (m, n) = (197, 3072);
    let mut g = GraphBuilder::new("gelu");
    let x = g.input("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(n)]);
    let inv_sqrt2 = g.init_f32("inv_sqrt2", &[], &[2f32.sqrt().recip()]);
    let one = g.init_f32("one", &[], &[1.0]);
    let half = g.init_f32("half", &[], &[0.5]);
    let scaled = g.node("Mul", &[&x, &inv_sqrt2], vec![]);
    let erf = g.node("Erf", &[&scaled], vec![]);
    let one_plus = g.node("Add", &[&erf, &one], vec![]);
    let half_x = g.node("Mul", &[&x, &half], vec![]);
    let y = g.node("Mul", &[&half_x, &one_plus], vec![]);
    g.output(&y, "y", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(n)]);
    let proto = g.finish("gelu check", &[]);
    let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");
    let mut rng = SplitMix::new(11);
    // Wide enough for erf's tails and exact zeros' neighbourhood.
    let xv = random(&mut rng, m * n, 6.0);
    let input: TVec<TValue> = tvec![Tensor::from_shape(&[1, m, n], &xv).unwrap().into_tvalue()];
    let run = |swap: bool| {
        let (names, mut out) = run_graph(&model, &input, swap);
        (names, out.swap_remove(0))
    };
    vitgpt2::runtime::set_threads(1);
    let (names, tract) = run(false);
    assert!(names.iter().any(|n| n.contains("GeluExact")) && !names.iter().any(|n| n == "GeluExactRows"), "tract's graph: {names:?}");
    let (names, ours) = run(true);
    assert!(names.iter().any(|n| n == "GeluExactRows"), "not swapped: {names:?}");
    vitgpt2::runtime::set_threads(2);
    let (_, ours_two) = run(true);
    vitgpt2::runtime::set_threads(1);
    for (what, got) in [("1 thread", &ours), ("2 threads", &ours_two)] {
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != tract[i].to_bits()) {
            panic!("{what}: element {i} (x = {}): {} against tract's {}", xv[i], got[i], tract[i]);
        }
    }
    // And the definition, to f32 rounding of erf.
    for (&x, &y) in xv.iter().zip(&ours).step_by(97) {
        let want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
        assert!((y as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "gelu({x}) = {y}, want {want}");
    }
}

/// erf by its Maclaurin series (Abramowitz & Stegun 7.1.5), ±1 beyond |x| = 6; at |x| ≤ 4.3
/// (used here) its cancellation costs ~7 of f64's digits, ~1e-9, far inside the test's 1e-5.
fn erf_f64(x: f64) -> f64 {
    if x.abs() > 6.0 {
        return x.signum();
    }
    // Series Σ (−1)^n x^(2n+1) / (n! (2n+1)), enough terms for |x| ≤ 6 in f64.
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 * sum.abs().max(1e-300) && n < 400.0 {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn layer_norms_on_the_swapped_op_match_tract_and_the_definition() {
    // ONNX LayerNormalization over ViT's [1, 197, 768] residual stream, with a scale and bias
    // (a trained model) and with 1 and 0 (tract drops them: the chain ends at its RmsNorm).
    // Rows include a large offset (mean 40, spread 1), where the centring cancels most digits.
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (m, k) = (197, 768);
    let eps = 1e-12f32;
    let mut rng = SplitMix::new(23);
    let mut xv = random(&mut rng, m * k, 3.0);
    for v in &mut xv[5 * k..6 * k] {
        *v = 40.0 + *v / 3.0;
    }
    let trained = (random(&mut rng, k, 1.0).iter().map(|g| 1.0 + g).collect::<Vec<f32>>(), random(&mut rng, k, 0.5));
    let neutral = (vec![1f32; k], vec![0f32; k]);
    for (what, (gamma, beta)) in [("scale and bias", &trained), ("scale 1, bias 0", &neutral)] {
        let mut g = GraphBuilder::new("layer_norm");
        let x = g.input("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(k)]);
        let gm = g.init_f32("gamma", &[k], gamma);
        let bt = g.init_f32("beta", &[k], beta);
        let y = g.node("LayerNormalization", &[&x, &gm, &bt], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))]);
        g.output(&y, "y", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(k)]);
        let proto = g.finish("layer norm check", &[]);
        let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");
        let input: TVec<TValue> = tvec![Tensor::from_shape(&[1, m, k], &xv).unwrap().into_tvalue()];
        let run = |swap: bool| {
            let (names, mut out) = run_graph(&model, &input, swap);
            (names, out.swap_remove(0))
        };
        vitgpt2::runtime::set_threads(1);
        let (names, tract) = run(false);
        assert!(names.iter().any(|n| n == "RmsNorm") && !names.iter().any(|n| n == "LayerNormRows"), "{what}: tract's graph: {names:?}");
        let (names, ours) = run(true);
        // The whole chain replaced: no sum, centring, scale or bias left beside it.
        assert_eq!(names.iter().filter(|n| *n == "LayerNormRows").count(), 1, "{what}: not swapped: {names:?}");
        assert!(!names.iter().any(|n| n.contains("Reduce") || n.contains("RmsNorm") || n.contains("Add") || n.contains("Mul") || n.contains("Sub")), "{what}: left over: {names:?}");
        vitgpt2::runtime::set_threads(2);
        let (_, ours_two) = run(true);
        vitgpt2::runtime::set_threads(1);
        assert!(ours.iter().zip(&ours_two).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: 2 threads changed the results");
        // Against the definition in f64: y = (x − μ)/√(σ² + ε)·γ + β. Both tract's and ours are
        // f32 computations of it; each element within 5e-7·(|γ| + |β| + 1) (≈ 4 ulp of a
        // normalized value near 1: the sums of 768 terms, the offset row's cancellation; both
        // measured at 0.6 of it), and ours no further from tract's than twice that.
        let (mut worst_ours, mut worst_tract) = (0f64, 0f64);
        for r in 0..m {
            let row: Vec<f64> = xv[r * k..(r + 1) * k].iter().map(|&v| v as f64).collect();
            let mu = row.iter().sum::<f64>() / k as f64;
            let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / k as f64;
            for c in 0..k {
                let want = (row[c] - mu) / (var + eps as f64).sqrt() * gamma[c] as f64 + beta[c] as f64;
                let tol = 5e-7 * (gamma[c].abs() + beta[c].abs()) as f64 + 5e-7;
                let (o, t) = (ours[r * k + c] as f64, tract[r * k + c] as f64);
                worst_ours = worst_ours.max((o - want).abs() / tol);
                worst_tract = worst_tract.max((t - want).abs() / tol);
                assert!((o - want).abs() <= tol, "{what}: row {r} col {c}: ours {o}, want {want}");
                assert!((o - t).abs() <= 2.0 * tol, "{what}: row {r} col {c}: ours {o}, tract's {t}");
            }
        }
        eprintln!("{what}: worst error / tolerance: ours {worst_ours:.3}, tract's {worst_tract:.3}");
    }
}

#[test]
fn a_residual_sum_folds_into_the_layer_norm_after_it() {
    // x = a + b, the residual connection before each of ViT's layer norms, read by the layer norm
    // and by the next residual connection (here a graph output): one LayerNormRows with two
    // inputs and two outputs. The sum is tract's bits (an f32 add is exact to the rounding
    // either way); the normalized value as in the test above.
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (m, k) = (197, 768);
    let mut rng = SplitMix::new(29);
    let (av, bv) = (random(&mut rng, m * k, 3.0), random(&mut rng, m * k, 1.0));
    let gamma: Vec<f32> = random(&mut rng, k, 1.0).iter().map(|g| 1.0 + g).collect();
    let beta = random(&mut rng, k, 0.5);
    let dims = [Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(k)];
    let mut g = GraphBuilder::new("residual_layer_norm");
    let a = g.input("a", DataType::Float, &dims);
    let b = g.input("b", DataType::Float, &dims);
    let gm = g.init_f32("gamma", &[k], &gamma);
    let bt = g.init_f32("beta", &[k], &beta);
    let x = g.node("Add", &[&a, &b], vec![]);
    let y = g.node("LayerNormalization", &[&x, &gm, &bt], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-12))]);
    g.output(&x, "x", DataType::Float, &dims);
    g.output(&y, "y", DataType::Float, &dims);
    let proto = g.finish("residual layer norm check", &[]);
    let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");
    let input: TVec<TValue> = tvec![Tensor::from_shape(&[1, m, k], &av).unwrap().into_tvalue(), Tensor::from_shape(&[1, m, k], &bv).unwrap().into_tvalue()];
    let run = |swap: bool| {
        let (names, mut out) = run_graph(&model, &input, swap);
        let y = out.swap_remove(1);
        (names, out.swap_remove(0), y)
    };
    vitgpt2::runtime::set_threads(1);
    let (_, x_tract, y_tract) = run(false);
    let (names, x_ours, y_ours) = run(true);
    assert_eq!(names.iter().filter(|n| *n == "LayerNormRows").count(), 1, "not swapped: {names:?}");
    assert!(!names.iter().any(|n| n.contains("Add") || n.contains("Reduce") || n.contains("RmsNorm")), "left over: {names:?}");
    vitgpt2::runtime::set_threads(2);
    let (_, x_two, y_two) = run(true);
    vitgpt2::runtime::set_threads(1);
    let same = |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(p, q)| p.to_bits() == q.to_bits());
    assert!(same(&x_ours, &x_tract) && same(&x_two, &x_tract), "the sum differs from tract's");
    assert!(same(&y_ours, &y_two), "2 threads changed the normalized values");
    for r in 0..m {
        let row: Vec<f64> = x_tract[r * k..(r + 1) * k].iter().map(|&v| v as f64).collect();
        let mu = row.iter().sum::<f64>() / k as f64;
        let sd = (row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / k as f64 + 1e-12).sqrt();
        for c in 0..k {
            let want = (row[c] - mu) / sd * gamma[c] as f64 + beta[c] as f64;
            let tol = 5e-7 * (gamma[c].abs() + beta[c].abs()) as f64 + 5e-7;
            let (o, t) = (y_ours[r * k + c] as f64, y_tract[r * k + c] as f64);
            assert!((o - want).abs() <= tol && (o - t).abs() <= 2.0 * tol, "row {r} col {c}: ours {o}, tract's {t}, want {want}");
        }
    }
}

#[test]
fn axis_moves_on_the_swapped_op_give_tracts_values_on_one_and_two_threads() {
    // ONNX Transposes that keep the last axis (the encoder's cross-attention keys/values into
    // heads, [1, 197, 12, 64] by [0, 2, 1, 3], and others of ranks 3 and 4, a last axis of 1):
    // tract turns them into axis moves, which f32_ops swaps for MoveAxisRows (with 2 threads
    // the input's rows halved on the helper). A copy: every value where the definition puts it.
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = SplitMix::new(5);
    for (shape, perm) in [(vec![1, 197, 12, 64], vec![0, 2, 1, 3]), (vec![3, 5, 4, 7], vec![2, 0, 1, 3]), (vec![17, 5, 3], vec![1, 0, 2]), (vec![2, 33, 4, 1], vec![0, 2, 1, 3])] {
        let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
        let mut g = GraphBuilder::new("transpose");
        let dims = |v: &[usize]| v.iter().map(|&x| Dim::Fixed(x)).collect::<Vec<_>>();
        let x = g.input("x", DataType::Float, &dims(&shape));
        let y = g.node("Transpose", &[&x], vec![("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))]);
        g.output(&y, "y", DataType::Float, &dims(&out_shape));
        let proto = g.finish("transpose check", &[]);
        let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");
        let xv = random(&mut rng, shape.iter().product(), 4.0);
        let input: TVec<TValue> = tvec![Tensor::from_shape(&shape, &xv).unwrap().into_tvalue()];
        // The definition: y[i] = x[i permuted back].
        let strides: Vec<usize> = (0..shape.len()).map(|a| shape[a + 1..].iter().product()).collect();
        let want: Vec<f32> = (0..xv.len())
            .map(|mut i| {
                let mut at = 0;
                for o in (0..out_shape.len()).rev() {
                    at += (i % out_shape[o]) * strides[perm[o]];
                    i /= out_shape[o];
                }
                xv[at]
            })
            .collect();
        vitgpt2::runtime::set_threads(1);
        let (names, tract) = run_graph(&model, &input, false);
        assert!(!names.iter().any(|n| n == "MoveAxisRows"), "tract's graph: {names:?}");
        let (names, ours) = run_graph(&model, &input, true);
        assert!(names.iter().any(|n| n == "MoveAxisRows"), "{shape:?} by {perm:?}: not swapped: {names:?}");
        vitgpt2::runtime::set_threads(2);
        let (_, ours_two) = run_graph(&model, &input, true);
        vitgpt2::runtime::set_threads(1);
        for (what, got) in [("tract", &tract[0]), ("1 thread", &ours[0]), ("2 threads", &ours_two[0])] {
            assert!(got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {shape:?} by {perm:?}");
        }
    }
}

#[test]
fn an_axis_move_of_an_empty_tensor_gives_an_empty_tensor() {
    // tract folds a graph with an empty input to a constant, so the op runs here in a model of
    // its own: an empty leading axis (nothing to count rows from) and an empty last one.
    use vitgpt2::runtime::f32_ops::MoveAxisRows;
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for threads in [1, 2] {
        vitgpt2::runtime::set_threads(threads);
        for (shape, from, to, want) in [([2, 0, 4], 1, 0, [0, 2, 4]), ([0, 3, 4], 0, 1, [3, 0, 4]), ([3, 5, 0], 0, 1, [5, 3, 0])] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(shape)).expect("source");
            let op = MoveAxisRows::new(from, to, 3).expect("keeps the last axis");
            let y = model.wire_node("move", op, &[x]).expect("wires");
            model.select_output_outlets(&y).expect("output");
            let x = Tensor::from_shape(&shape, &[] as &[f32]).unwrap();
            let out = model.into_runnable().expect("runnable").run(tvec![x.into_tvalue()]).expect("runs");
            assert_eq!(out[0].shape(), &want, "{shape:?}, {from} → {to}, {threads} threads");
        }
    }
    vitgpt2::runtime::set_threads(1);
}
