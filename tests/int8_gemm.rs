//! The int8 products on rten-gemm (`runtime::int8`) give exactly tract's own `MatMulInteger`
//! results: random shapes with odd edge sizes, i8 and u8 operands, no, constant, per-column and
//! dynamic (`DynamicQuantizeLinear`-style, a graph input) zero points. Each case also checks
//! that the product was substituted, so the comparison cannot pass by comparing tract with itself.
#![cfg(feature = "host")]

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;
use vitgpt2::export::onnx::{Dim, GraphBuilder};
use vitgpt2::rng::SplitMix;
use vitgpt2::runtime::graph::{optimize, Int8Gemm};

#[derive(Clone, Copy, Debug)]
enum Zero {
    None,
    Const,
    /// Left: a graph input; right: one per column.
    Varying,
}

struct Case {
    m: usize,
    k: usize,
    n: usize,
    a_signed: bool,
    b_signed: bool,
    zero: Zero,
    /// Right operand within [−64, 64] (as i8; u8 within [64, 192]), a quarter of it at ±64:
    /// the narrow-weight kernels' one-pass path on AVX2 (`GemvWeights::narrow`), at its extremes.
    narrow: bool,
}

fn random_bytes(rng: &mut SplitMix, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Runs `MatMulInteger(a [1, m, k], b [k, n] const, zero points)` through tract with and without
/// the substitution (`gemm`); returns (substituted, the substitute's i32 output, tract's, the
/// definition's).
fn run_case(c: &Case, seed: u64, gemm: Int8Gemm) -> (usize, Vec<i32>, Vec<i32>, Vec<i64>) {
    let mut rng = SplitMix::new(seed);
    let a_dt = if c.a_signed { DataType::Int8 } else { DataType::Uint8 };
    let mut g = GraphBuilder::new("mmi");
    let a = g.input("a", a_dt, &[Dim::Fixed(1), Dim::Fixed(c.m), Dim::Fixed(c.k)]);
    let mut b_bytes = random_bytes(&mut rng, c.k * c.n);
    if c.narrow {
        let shift = if c.b_signed { 0 } else { 128 };
        for v in b_bytes.iter_mut() {
            let r = rng.next_u64();
            let narrow = match r % 8 {
                0 => 64,
                1 => -64,
                _ => (r >> 8) as i64 % 129 - 64,
            };
            *v = (narrow + shift) as u8;
        }
    }
    let b = if c.b_signed {
        g.init_i8("b", &[c.k, c.n], &b_bytes.iter().map(|&v| v as i8).collect::<Vec<_>>())
    } else {
        g.init_u8("b", &[c.k, c.n], &b_bytes)
    };
    let zp = |g: &mut GraphBuilder, name: &str, signed: bool, dims: &[usize], vals: &[u8]| {
        if signed {
            g.init_i8(name, dims, &vals.iter().map(|&v| v as i8).collect::<Vec<_>>())
        } else {
            g.init_u8(name, dims, vals)
        }
    };
    let mut inputs = vec![a.clone(), b];
    // Zero points as raw bytes (the left one drawn below when it is an input).
    let (mut za, mut zb) = (None::<u8>, vec![0u8]);
    match c.zero {
        Zero::None => {}
        Zero::Const => {
            za = Some(rng.next_u64() as u8);
            zb = vec![rng.next_u64() as u8];
            inputs.push(zp(&mut g, "a0", c.a_signed, &[], &[za.unwrap()]));
            inputs.push(zp(&mut g, "b0", c.b_signed, &[], &zb));
        }
        Zero::Varying => {
            inputs.push(g.input("a0", a_dt, &[]));
            zb = random_bytes(&mut rng, c.n);
            inputs.push(zp(&mut g, "b0", c.b_signed, &[c.n], &zb));
        }
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let y = g.node("MatMulInteger", &refs, vec![]);
    g.output(&y, "y", DataType::Int32, &[Dim::Fixed(1), Dim::Fixed(c.m), Dim::Fixed(c.n)]);
    let proto = g.finish("int8 gemm check", &[]);
    let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");

    let a_bytes = random_bytes(&mut rng, c.m * c.k);
    let a_tensor = if c.a_signed {
        Tensor::from_shape(&[1, c.m, c.k], &a_bytes.iter().map(|&v| v as i8).collect::<Vec<_>>()).unwrap()
    } else {
        Tensor::from_shape(&[1, c.m, c.k], &a_bytes).unwrap()
    };
    let mut values: TVec<TValue> = tvec![a_tensor.into_tvalue()];
    if let Zero::Varying = c.zero {
        let z = rng.next_u64() as u8;
        za = Some(z);
        let t = if c.a_signed { tensor0(z as i8) } else { tensor0(z) };
        values.push(t.into_tvalue());
    }
    // The definition, in i64: Σ_k (a − a0)(b − b0[n]).
    let val = |byte: u8, signed: bool| if signed { byte as i8 as i64 } else { byte as i64 };
    let a0 = za.map_or(0, |z| val(z, c.a_signed));
    let mut naive = vec![0i64; c.m * c.n];
    for i in 0..c.m {
        for j in 0..c.n {
            let b0 = val(zb[if zb.len() == 1 { 0 } else { j }], c.b_signed);
            naive[i * c.n + j] = (0..c.k).map(|l| (val(a_bytes[i * c.k + l], c.a_signed) - a0) * (val(b_bytes[l * c.n + j], c.b_signed) - b0)).sum();
        }
    }
    let run = |gemm: Int8Gemm| {
        let (typed, n) = optimize(model.clone(), gemm).expect("optimizes");
        let out = typed.into_runnable().expect("runnable").run(values.clone()).expect("runs");
        let v = out[0].to_plain_array_view::<i32>().expect("i32 output").iter().copied().collect::<Vec<_>>();
        (n, v)
    };
    let (substituted, rten) = run(gemm);
    let (none, tract) = run(Int8Gemm::Tract);
    assert_eq!(none, 0);
    (substituted, rten, tract, naive)
}

#[test]
fn int8_products_equal_tracts_matmul_integer() {
    // On x86-64 AVX2 without VNNI the name says "7-bit split": rten-gemm's saturating kernel
    // takes each product in two exact parts (see runtime::int8).
    let kernel = vitgpt2::runtime::int8::kernel();
    eprintln!("rten-gemm kernel: {kernel}");
    // Rows < 16 run on the few-row kernel (AVX-512 VNNI or AVX2) where the CPU has it (Auto), in groups
    // of 4 rows and 64 columns (so 5, 9 and 15 rows, 65 and 257 columns: partial groups).
    let few_row = vitgpt2::runtime::int8_gemv::available();
    eprintln!("few-row kernel: {}", if few_row { vitgpt2::runtime::int8_gemv::kernel_name() } else { "none on this CPU (rten-gemm for all)" });
    // Rows ≥ 16 run on int8_gemv's i16 tiles where rten-gemm's kernel saturates (AVX2 without VNNI).
    let tiles = vitgpt2::runtime::int8::tiles_available();
    // Or, where the CPU has AMX-INT8, on its tiles where K is a multiple of 64 and N of 32.
    let amx = vitgpt2::runtime::amx::available();
    let many_row_ours = |k: usize, n: usize| tiles || (amx && vitgpt2::runtime::amx::AmxWeights::fits(k, n));
    eprintln!("many-row kernel: {}", if tiles { "avx2 tiles (i16; u8 for narrow weights)" } else if amx { "amx-int8 (K % 64 = 0, N % 32 = 0; rten-gemm otherwise)" } else { kernel });
    let shapes = [(1, 1, 1), (1, 64, 33), (3, 5, 7), (17, 77, 130), (197, 768, 65), (2, 300, 3), (4, 17, 257), (65, 3, 2), (31, 2, 40), (5, 768, 130), (9, 31, 64), (15, 3072, 65), (1, 768, 1000), (197, 768, 96), (16, 64, 32), (33, 128, 64)];
    let mut seed = 7;
    let mut checked = 0;
    for &(m, k, n) in &shapes {
        for (a_signed, b_signed, narrow) in [(true, true, false), (false, true, false), (false, false, false), (true, false, false), (true, true, true), (false, false, true)] {
            for zero in [Zero::None, Zero::Const, Zero::Varying] {
                seed += 1;
                let c = Case { m, k, n, a_signed, b_signed, zero, narrow };
                // Auto, then rten-gemm alone where Auto is not rten-gemm.
                let ours = if m < 16 { few_row } else { many_row_ours(k, n) };
                let gemms: &[Int8Gemm] = if ours { &[Int8Gemm::Auto, Int8Gemm::Rten] } else { &[Int8Gemm::Auto] };
                for &gemm in gemms {
                    let (substituted, rten, tract, naive) = run_case(&c, seed, gemm);
                    let what = format!("{gemm:?} m={m} k={k} n={n} a {} b {}{} zero points {zero:?}", if a_signed { "i8" } else { "u8" }, if b_signed { "i8" } else { "u8" }, if narrow { " narrow" } else { "" });
                    assert_eq!(substituted, 1, "{what}: the product was not substituted");
                    assert_eq!(rten.len(), m * n, "{what}");
                    if let Some(i) = (0..rten.len()).find(|&i| rten[i] != tract[i] || rten[i] as i64 != naive[i]) {
                        panic!("{what}: element {i}: substitute {}, tract {}, by definition {}", rten[i], tract[i], naive[i]);
                    }
                    checked += 1;
                }
            }
        }
    }
    let twice = shapes.iter().filter(|s| if s.0 < 16 { few_row } else { many_row_ours(s.1, s.2) }).count();
    assert_eq!(checked, (shapes.len() + twice) * 18);

    // Two threads: the pool shared with tract and rten-gemm's parallel blocks or the tiles' row
    // halves (rows ≥ 16); fewer rows halve their columns with the helper thread (`helper_thread`):
    // one row on the few-row kernel, 3–15 on AVX2's tiles (2 rows, or 2–4 with VNNI, stay whole);
    // with AMX, 197 × 768 × 64, 37 × 3072 × 96, 63 × 128 × 96 and 65 × 768 × 64 on its tiles in
    // row halves on the helper thread (96 + 101, 16 + 21, 32 + 31, 32 + 33 rows), 20 × 768 × 64
    // in column halves.
    vitgpt2::runtime::set_threads(2);
    for &(m, k, n) in &[(197, 768, 65), (64, 300, 257), (1, 768, 1400), (1, 300, 65), (1, 40, 64), (4, 1024, 1100), (3, 50, 64), (5, 40, 65), (37, 3072, 70), (197, 768, 64), (37, 3072, 96), (63, 128, 96), (65, 768, 64), (20, 768, 64)] {
        for (zero, narrow, a_signed) in [(Zero::None, false, false), (Zero::Varying, false, false), (Zero::None, true, true), (Zero::Varying, true, false)] {
            seed += 1;
            let (substituted, rten, tract, naive) = run_case(&Case { m, k, n, a_signed, b_signed: true, zero, narrow }, seed, Int8Gemm::Auto);
            assert_eq!(substituted, 1);
            assert!(rten == tract && rten.iter().zip(&naive).all(|(a, b)| *a as i64 == *b), "2 threads, m={m} k={k} n={n} {zero:?} narrow {narrow}");
        }
    }
    vitgpt2::runtime::set_threads(1);
}

/// Runs a graph through tract with the substitution (`Auto`) and without; returns how many
/// products were substituted and whether both outputs are equal.
fn substituted_and_equal(proto: tract_onnx::pb::ModelProto, values: TVec<TValue>) -> (usize, bool) {
    let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract parses the graph");
    let run = |gemm: Int8Gemm| {
        let (typed, n) = optimize(model.clone(), gemm).expect("optimizes");
        let out = typed.into_runnable().expect("runnable").run(values.clone()).expect("runs");
        (n, out[0].clone().into_tensor())
    };
    let (n, ours) = run(Int8Gemm::Auto);
    let (_, tract) = run(Int8Gemm::Tract);
    (n, ours == tract)
}

/// Products the substitute cannot compute as it is built (a right operand that is not a
/// constant, a batch of right matrices, one left zero point per row) stay tract's, and give
/// tract's results.
#[test]
fn products_outside_the_substitutes_reach_stay_tracts() {
    let mut rng = SplitMix::new(99);
    let (m, k, n) = (3, 20, 9);
    let i8s = |rng: &mut SplitMix, len: usize| random_bytes(rng, len).into_iter().map(|v| v as i8).collect::<Vec<_>>();

    // The right operand is a graph input.
    let mut g = GraphBuilder::new("mmi");
    let a = g.input("a", DataType::Int8, &[Dim::Fixed(m), Dim::Fixed(k)]);
    let b = g.input("b", DataType::Int8, &[Dim::Fixed(k), Dim::Fixed(n)]);
    let y = g.node("MatMulInteger", &[&a, &b], vec![]);
    g.output(&y, "y", DataType::Int32, &[Dim::Fixed(m), Dim::Fixed(n)]);
    let values = tvec![Tensor::from_shape(&[m, k], &i8s(&mut rng, m * k)).unwrap().into_tvalue(), Tensor::from_shape(&[k, n], &i8s(&mut rng, k * n)).unwrap().into_tvalue()];
    assert_eq!(substituted_and_equal(g.finish("b input", &[]), values), (0, true), "right operand not constant");

    // A batch of two constant right matrices.
    let mut g = GraphBuilder::new("mmi");
    let a = g.input("a", DataType::Int8, &[Dim::Fixed(2), Dim::Fixed(m), Dim::Fixed(k)]);
    let b = g.init_i8("b", &[2, k, n], &i8s(&mut rng, 2 * k * n));
    let y = g.node("MatMulInteger", &[&a, &b], vec![]);
    g.output(&y, "y", DataType::Int32, &[Dim::Fixed(2), Dim::Fixed(m), Dim::Fixed(n)]);
    let values = tvec![Tensor::from_shape(&[2, m, k], &i8s(&mut rng, 2 * m * k)).unwrap().into_tvalue()];
    assert_eq!(substituted_and_equal(g.finish("batched b", &[]), values), (0, true), "batched right operand");

    // One left zero point per row (ONNX allows a 1-D a_zero_point of length M).
    let mut g = GraphBuilder::new("mmi");
    let a = g.input("a", DataType::Int8, &[Dim::Fixed(m), Dim::Fixed(k)]);
    let b = g.init_i8("b", &[k, n], &i8s(&mut rng, k * n));
    let a0 = g.init_i8("a0", &[m], &[1, -5, 7]);
    let y = g.node("MatMulInteger", &[&a, &b, &a0], vec![]);
    g.output(&y, "y", DataType::Int32, &[Dim::Fixed(m), Dim::Fixed(n)]);
    let values = tvec![Tensor::from_shape(&[m, k], &i8s(&mut rng, m * k)).unwrap().into_tvalue()];
    let (substituted, equal) = substituted_and_equal(g.finish("per-row a0", &[]), values);
    assert!(equal, "per-row left zero points: results differ from tract's");
    assert_eq!(substituted, 0, "per-row left zero points");
}

/// The dequantization after a product — `Cast` to f32, `× s` (row scales `[.., 1]`), `× ws`
/// (constant column scales) as the fast layout's int8 linears end — is folded into the op, its
/// results bit-identical to tract running the three ops; a chain that does not fit (the column
/// scales not constant) stays as it is.
#[test]
fn dequantization_folds_into_the_product_bit_exactly() {
    use vitgpt2::runtime::int8::Int8MatMul;
    let mut rng = SplitMix::new(4242);
    let unit = |rng: &mut SplitMix| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    for &(m, k, n, const_ws) in &[(1, 768, 70, true), (4, 33, 65, true), (197, 300, 130, true), (197, 768, 64, true), (5, 40, 9, false)] {
        let mut g = GraphBuilder::new("dq");
        let a = g.input("a", DataType::Int8, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(k)]);
        let s = g.input("s", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(1)]);
        let b = g.init_i8("b", &[k, n], &random_bytes(&mut rng, k * n).into_iter().map(|v| v as i8).collect::<Vec<_>>());
        let ws_vals: Vec<f32> = (0..n).map(|_| (unit(&mut rng) + 0.01) * 1e-2).collect();
        let ws = if const_ws { g.init_f32("ws", &[n], &ws_vals) } else { g.input("ws", DataType::Float, &[Dim::Fixed(n)]) };
        let acc = g.node("MatMulInteger", &[&a, &b], vec![]);
        let accf = g.node("Cast", &[&acc], vec![("to", vitgpt2::export::onnx::Attr::Int(DataType::Float as i64))]);
        let y = g.node("Mul", &[&accf, &s], vec![]);
        let y = g.node("Mul", &[&y, &ws], vec![]);
        g.output(&y, "y", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(n)]);
        let model = tract_onnx::onnx().model_for_proto_model(&g.finish("dequantize", &[])).expect("tract parses the graph");
        let a_vals: Vec<i8> = random_bytes(&mut rng, m * k).into_iter().map(|v| v as i8).collect();
        // Row scales over several decades, as max|x|/127 of real activations are.
        let s_vals: Vec<f32> = (0..m).map(|i| (unit(&mut rng) + 0.01) * 10f32.powi(i as i32 % 5 - 3)).collect();
        let mut values: TVec<TValue> = tvec![Tensor::from_shape(&[1, m, k], &a_vals).unwrap().into_tvalue(), Tensor::from_shape(&[1, m, 1], &s_vals).unwrap().into_tvalue()];
        if !const_ws {
            values.push(Tensor::from_shape(&[n], &ws_vals).unwrap().into_tvalue());
        }
        let run = |gemm: Int8Gemm| {
            let (typed, _) = optimize(model.clone(), gemm).expect("optimizes");
            let folded = typed.nodes().iter().filter(|nd| nd.op_as::<Int8MatMul>().is_some_and(|mm| mm.dequantizes())).count();
            let casts = typed.nodes().iter().filter(|nd| nd.op().name() == "Cast").count();
            let out = typed.into_runnable().expect("runnable").run(values.clone()).expect("runs");
            (folded, casts, out[0].to_plain_array_view::<f32>().expect("f32 output").iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        let (folded, casts, ours) = run(Int8Gemm::Auto);
        // Two threads: on AVX2 the tiles dequantize each thread's rows (197: 99 + 98) there, and
        // rten-gemm's or AMX's halves theirs on the helper thread (197 × 768 × 64 on AMX).
        vitgpt2::runtime::set_threads(2);
        let (_, _, ours_2) = run(Int8Gemm::Auto);
        vitgpt2::runtime::set_threads(1);
        let (_, _, tract) = run(Int8Gemm::Tract);
        let what = format!("m={m} k={k} n={n} constant column scales {const_ws}");
        assert!(ours == ours_2, "{what}: 2 threads differ from 1");
        assert_eq!(folded, usize::from(const_ws), "{what}: folded products");
        if const_ws {
            assert_eq!(casts, 0, "{what}: the Cast stayed");
        }
        if let Some(i) = (0..ours.len()).find(|&i| ours[i] != tract[i]) {
            panic!("{what}: element {i}: {} with the fold, {} in tract", f32::from_bits(ours[i]), f32::from_bits(tract[i]));
        }
    }
}

/// The exporter's own int8 linears (`export::fast::Net::linear`: per-row quantization, product,
/// dequantization, bias), two of them on one input as the query and key projections are: with
/// the folds, one `QuantizeRows` and two f32-out products; bit-identical to tract's ops on rows
/// of every kind (ordinary, zero, below the clamp, huge, one element much larger than the rest).
/// At 8 bits and with `--reduce-range`'s 7 (on AVX2 without VNNI: the i16 and the narrow u8
/// tiles).
#[test]
fn the_exporters_int8_linears_fold_bit_exactly() {
    use vitgpt2::export::fast::WeightForm;
    // A decoder step's few rows, and the encoder's many (K and N whole AMX tiles: its blocks
    // there, rten-gemm's rows elsewhere); 2 threads for the parts' split (AMX: row halves for
    // 197 rows, column halves for 20).
    for (m, k, n, threads) in [(7, 72, 40, 1), (197, 128, 64, 1), (197, 128, 64, 2), (20, 128, 64, 2)] {
        for form in [WeightForm::INT8, WeightForm::Int8 { reduce_range: true }] {
            vitgpt2::runtime::set_threads(threads);
            linears_fold_bit_exactly(form, m, k, n);
        }
    }
    vitgpt2::runtime::set_threads(1);
}

fn linears_fold_bit_exactly(form: vitgpt2::export::fast::WeightForm, m: usize, k: usize, n: usize) {
    use vitgpt2::export::fast::Net;
    use vitgpt2::runtime::int8::Int8MatMul;
    let mut rng = SplitMix::new(777);
    let mut unit = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    let weights = vitgpt2::export::Weights::default();
    let mut net = Net::new("linears", form, &weights);
    let x = net.g.input("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(k)]);
    let (w1, w2): (Vec<f32>, Vec<f32>) = ((0..k * n).map(|_| unit() * 0.1).collect(), (0..k * n).map(|_| unit() * 0.1).collect());
    let b: Vec<f32> = (0..n).map(|_| unit()).collect();
    let y1 = net.linear(&x, "q", &w1, k, n, &b);
    let y2 = net.linear(&x, "k", &w2, k, n, &b);
    // ViT's FC1: the exact GELU after the linear, x/2 · (1 + erf(x/√2)), folded in too.
    let (inv_sqrt2, one, half) = (net.g.init_f32("inv_sqrt2", &[], &[2f32.sqrt().recip()]), net.g.init_f32("one", &[], &[1.0]), net.g.init_f32("half", &[], &[0.5]));
    let scaled = net.g.node("Mul", &[&y1, &inv_sqrt2], vec![]);
    let erf = net.g.node("Erf", &[&scaled], vec![]);
    let one_plus = net.g.node("Add", &[&erf, &one], vec![]);
    let half_y1 = net.g.node("Mul", &[&y1, &half], vec![]);
    let gelu = net.g.node("Mul", &[&half_y1, &one_plus], vec![]);
    let y = net.g.node("Add", &[&gelu, &y2], vec![]);
    net.g.output(&y, "y", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(m), Dim::Fixed(n)]);
    let model = tract_onnx::onnx().model_for_proto_model(&net.g.finish("int8 linears", &[])).expect("tract parses the graph");
    let mut xs: Vec<f32> = (0..m * k).map(|_| unit() * 3.0).collect();
    xs[k..2 * k].iter_mut().for_each(|v| *v = 0.0);
    xs[2 * k..3 * k].iter_mut().for_each(|v| *v *= 1e-20);
    xs[3 * k..4 * k].iter_mut().for_each(|v| *v *= 1e6);
    xs[4 * k + 5] = 4e3;
    // Ties: max|x| = 127 makes the scale exactly 1, so x.5 must round half to even.
    let ties = [127.0, 2.5, 0.5, -3.5, 1.5, -0.5, 126.5, -126.5];
    xs[5 * k..5 * k + ties.len()].copy_from_slice(&ties);
    // Values where x · (1/scale) and x / scale round to different integers: the product's form
    // matters, and the op must keep the graph's (a multiply by the reciprocal).
    let (max, magic) = (100.3f32, 12_582_912f32);
    let scale = max * (1.0 / 127.0f32);
    let (inv, round) = (1.0 / scale, |r: f32| (r + magic) - magic);
    let mut found = vec![max];
    for j in 0..100 {
        // A few ulps either side of each half-integer multiple of the scale.
        let centre = (j as f32 + 0.5) * scale;
        let bits = centre.to_bits();
        for x in (bits - 8..=bits + 8).map(f32::from_bits) {
            if found.len() < k && round(x * inv) != round(x / scale) {
                found.push(x);
            }
        }
    }
    assert!(found.len() > 5, "no values where x·(1/s) and x/s round apart (found {})", found.len() - 1);
    xs[6 * k..6 * k + found.len()].copy_from_slice(&found);
    let values: TVec<TValue> = tvec![Tensor::from_shape(&[1, m, k], &xs).unwrap().into_tvalue()];
    let run = |gemm: Int8Gemm| {
        let (typed, _) = optimize(model.clone(), gemm).expect("optimizes");
        let quantize = typed.nodes().iter().filter(|nd| nd.op().name() == "QuantizeRows").count();
        let folded = typed.nodes().iter().filter(|nd| nd.op_as::<Int8MatMul>().is_some_and(|mm| mm.dequantizes())).count();
        let adds = typed.nodes().iter().filter(|nd| nd.op().name().contains("Add") || nd.op().name().contains("Gelu") || nd.op().name().contains("Erf")).count();
        let out = typed.into_runnable().expect("runnable").run(values.clone()).expect("runs");
        (quantize, folded, adds, out[0].to_plain_array_view::<f32>().expect("f32 output").iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    };
    let (quantize, folded, adds, ours) = run(Int8Gemm::Auto);
    let (_, _, _, tract) = run(Int8Gemm::Tract);
    // The biases and the GELU folded too: only gelu(y1) + y2 is left (no GELU, no other add).
    assert_eq!((quantize, folded, adds), (1, 2, 1), "{form:?}, {m} × {k} × {n}: QuantizeRows ops, f32-out products, adds and GELUs");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != tract[i]) {
        panic!("{form:?}, {m} × {k} × {n}: element {i}: {} folded, {} in tract", f32::from_bits(ours[i]), f32::from_bits(tract[i]));
    }
}
