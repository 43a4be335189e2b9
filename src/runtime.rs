//! The device runtime: ONNX graphs of a model bundle in tract, optimized once at load, with
//! symbolic batch and past lengths so that one plan serves every generation step.
//!
//! A graph layout turns pixel values into an [`ImageEncoding`], which opens decoder sessions
//! for generation. Two layouts are implemented here: Optimum's (encoder, decoder,
//! decoder-with-past) and the project's fast layout ([`FastRuntime`], written by
//! `vitgpt2-host export`), which the bundle prefers when it has both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, Array4, Axis, Ix3};
use tract_hir::infer::Factoid;
use tract_onnx::prelude::*;

use crate::bundle::{Bundle, GraphFiles};
use crate::error::{chain, Error, Result};
use crate::generate::DecoderSession;

/// Runs the encoder of one image and opens decoder sessions on its output.
pub trait Runtime: Send + Sync {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>>;
    /// What runs: layout and graph files.
    fn describe(&self) -> String;
}

/// One encoded image, ready for decoding.
pub trait ImageEncoding {
    /// A decoder session over `rows` hypotheses (1 for greedy, `num_beams` for beam search).
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>>;
}

/// How many threads tract's matrix products use; 1 keeps tract single-threaded.
pub fn set_threads(threads: usize) {
    use tract_linalg::multithread::{set_default_executor, Executor};
    if threads > 1 {
        set_default_executor(Executor::multithread(threads));
    } else {
        set_default_executor(Executor::SingleThread);
    }
}

/// Loads the runtime for the bundle's graph layout.
pub fn load(bundle: &Bundle) -> Result<Box<dyn Runtime>> {
    match &bundle.graphs {
        GraphFiles::Optimum { encoder, decoder, decoder_with_past, .. } => {
            Ok(Box::new(OptimumRuntime::load(bundle, encoder, decoder, decoder_with_past)?))
        }
        GraphFiles::Fast { encoder, decoder_step, .. } => Ok(Box::new(FastRuntime::load(bundle, encoder, decoder_step)?)),
    }
}

/// One ONNX graph, optimized and ready to run, with its input and output names in order.
pub struct Graph {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

/// The shape and type a graph input must have.
pub struct InputSpec {
    pub name: String,
    pub dtype: DatumType,
    pub shape: Vec<TDim>,
}

impl Graph {
    /// Loads and validates an ONNX graph: it must have exactly the inputs `specs` (any order)
    /// and at least the outputs `outputs`. `specs` is built from the model's own symbol table.
    pub fn load(
        path: &Path,
        specs: impl FnOnce(&InferenceModel) -> Vec<InputSpec>,
        outputs: &[String],
    ) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::bundle(path, "missing file"));
        }
        let mut model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(path)
            .map_err(|e| Error::bundle(path, format!("not a readable ONNX model (truncated, or not ONNX at all?): {}", chain(&e))))?;
        let specs = specs(&model);
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(|e| Error::bundle(path, chain(&e)))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(|e| Error::bundle(path, chain(&e)))?
            .iter()
            .map(|o| model.outlet_label(*o).map(String::from).unwrap_or_else(|| model.node(o.node).name.clone()))
            .collect();
        let missing: Vec<&str> =
            specs.iter().map(|s| s.name.as_str()).filter(|n| !input_names.iter().any(|i| i == n)).collect();
        let unexpected: Vec<&str> =
            input_names.iter().map(|s| s.as_str()).filter(|n| !specs.iter().any(|s| s.name == *n)).collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(Error::bundle(
                path,
                format!(
                    "wrong inputs: missing {missing:?}, unexpected {unexpected:?} (the graph has {input_names:?}); is this the right graph of an Optimum image-to-text-with-past export?"
                ),
            ));
        }
        let missing_out: Vec<&str> =
            outputs.iter().map(|s| s.as_str()).filter(|n| !output_names.iter().any(|o| o == n)).collect();
        if !missing_out.is_empty() {
            return Err(Error::bundle(path, format!("wrong outputs: missing {missing_out:?} (the graph has {output_names:?})")));
        }
        for (ix, name) in input_names.iter().enumerate() {
            let spec = specs.iter().find(|s| &s.name == name).ok_or_else(|| Error::bundle(path, "input vanished"))?;
            let declared = model.input_fact(ix).map_err(|e| Error::bundle(path, chain(&e)))?.clone();
            check_declared_shape(path, name, &declared, &spec.shape)?;
            let fact = InferenceFact::dt_shape(spec.dtype, spec.shape.clone());
            model.set_input_fact(ix, fact).map_err(|e| Error::bundle(path, chain(&e)))?;
        }
        let mut typed = model
            .into_optimized()
            .map_err(|e| Error::bundle(path, format!("shapes or operators do not fit this model's config.json: {}", chain(&e))))?;
        fold_constant_packs(&mut typed).map_err(|e| Error::bundle(path, chain(&e)))?;
        let plan = typed.into_runnable().map_err(|e| Error::bundle(path, chain(&e)))?;
        Ok(Graph { path: path.to_path_buf(), plan, inputs: input_names, outputs: output_names })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the graph once with named inputs, timing every node: `(op, ms, nodes)` summed by
    /// op name (or per node, with its description, when `by_node`), slowest first
    /// (`vitgpt2-node bench --profile [--by-node]`).
    pub fn profile(&self, mut named: Vec<(&str, TValue)>, by_node: bool) -> Result<Vec<(String, f64, usize)>> {
        let mut inputs: TVec<TValue> = tvec!();
        for name in &self.inputs {
            let pos = named.iter().position(|(n, _)| n == name).ok_or_else(|| Error::runtime("profile", format!("no value for input `{name}`")))?;
            inputs.push(named.swap_remove(pos).1);
        }
        let mut by_op: std::collections::HashMap<String, (f64, usize)> = Default::default();
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&self.plan).map_err(|e| Error::runtime("profile", chain(&e)))?;
        state
            .run_plan_with_eval(inputs, |ctx, st, node, input| {
                let t = std::time::Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, st, node, input);
                let key = if by_node {
                    // Node name and tract's own description (for matmuls: shape and kernel).
                    format!("{} {} {}", node.op().name(), node.name, node.op().info().unwrap_or_default().join("; "))
                } else {
                    node.op().name().to_string()
                };
                let e = by_op.entry(key).or_default();
                e.0 += t.elapsed().as_secs_f64() * 1e3;
                e.1 += 1;
                r
            })
            .map_err(|e| Error::runtime("profile", chain(&e)))?;
        let mut v: Vec<(String, f64, usize)> = by_op.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        Ok(v)
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Runs the graph with named inputs; returns the outputs in the graph's order.
    pub fn run(&self, stage: &str, mut named: Vec<(&str, TValue)>) -> Result<TVec<TValue>> {
        let mut inputs: TVec<TValue> = tvec!();
        for name in &self.inputs {
            let pos = named
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| Error::runtime(stage, format!("no value for input `{name}`")))?;
            inputs.push(named.swap_remove(pos).1);
        }
        self.plan.run(inputs).map_err(|e| Error::runtime(stage, chain(&e)))
    }

    fn output_index(&self, name: &str) -> Result<usize> {
        self.outputs
            .iter()
            .position(|o| o == name)
            .ok_or_else(|| Error::bundle(&self.path, format!("no output `{name}`")))
    }
}

/// Packs every constant matrix operand once, at load.
///
/// tract's constant folding skips a node whose constant input is larger than 4 MiB and has
/// several consumers (so as not to duplicate big weights); a weight that also feeds a Gather
/// (the tied token embedding / LM head) therefore stayed unpacked and was repacked at every
/// call (38 MB for GPT-2's int8 LM head). This folds the remaining `OptMatMulPack` nodes with
/// constant inputs: same results, one packed copy in memory.
pub fn fold_constant_packs(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    let mut skip = std::collections::HashSet::new();
    loop {
        let mut target = None;
        for id in model.eval_order()? {
            let node = model.node(id);
            if node.op().name() == "OptMatMulPack"
                && !skip.contains(&id)
                && model.node_input_facts(id)?.iter().all(|f| f.konst.is_some())
            {
                target = Some(id);
                break;
            }
        }
        let Some(id) = target else { break };
        let inputs: TVec<TValue> =
            model.node_input_facts(id)?.iter().map(|f| f.konst.clone().unwrap().into_tvalue()).collect();
        let node = model.node(id);
        match node.op.eval_out_of_plan(inputs)? {
            Some(out) if out.len() == 1 => {
                let mut patch = TypedModelPatch::default();
                let exotic = model.outlet_fact(OutletId::new(id, 0))?.exotic_fact.clone();
                let konst = tract_onnx::tract_core::ops::konst::Const::new_with_opt_exotic_fact(out[0].clone().into_arc_tensor(), exotic)?;
                let wire = patch.wire_node(format!("{}.folded", node.name), konst, &[])?[0];
                patch.shunt_outside(model, id.into(), wire)?;
                patch.apply(model)?;
                model.compact()?;
                folded += 1;
                skip.clear();
            }
            _ => {
                skip.insert(id);
            }
        }
    }
    Ok(folded)
}

/// Compares the dims an ONNX file declares for an input with what config.json implies.
fn check_declared_shape(path: &Path, name: &str, declared: &InferenceFact, expected: &[TDim]) -> Result<()> {
    let Some(dims) = declared.shape.concretize() else { return Ok(()) };
    if dims.is_empty() {
        // No shape information at all in the file.
        return Ok(());
    }
    let mismatch = dims.len() != expected.len()
        || dims.iter().zip(expected).any(|(d, e)| match (d.to_i64(), e.to_i64()) {
            (Ok(a), Ok(b)) => a != b,
            _ => false,
        });
    if mismatch {
        return Err(Error::bundle(
            path,
            format!(
                "input `{name}` has shape {dims:?} in the graph but config.json implies {expected:?}: graph and config.json do not belong together"
            ),
        ));
    }
    Ok(())
}

fn logits_last(stage: &str, t: &TValue) -> Result<Array2<f32>> {
    let view = t.to_plain_array_view::<f32>().map_err(|e| Error::runtime(stage, chain(&e)))?;
    let view = view.into_dimensionality::<Ix3>().map_err(|e| Error::runtime(stage, format!("logits: {e}")))?;
    let last = view.shape()[1] - 1;
    Ok(view.index_axis(Axis(1), last).to_owned())
}

fn ids_tensor(dtype: DatumType, tokens: &[u32]) -> Result<TValue> {
    let t = Tensor::from_shape(&[tokens.len(), 1], &tokens.iter().map(|&t| t as i64).collect::<Vec<_>>())
        .and_then(|t| t.cast_to_dt(dtype).map(|c| c.into_owned()))
        .map_err(|e| Error::runtime("decoder", chain(&e)))?;
    Ok(t.into_tvalue())
}

/// Gathers rows of a tensor along its first axis.
fn gather_rows(stage: &str, t: &TValue, rows: &[usize]) -> Result<TValue> {
    let view = t.to_plain_array_view::<f32>().map_err(|e| Error::runtime(stage, chain(&e)))?;
    Ok(view.select(Axis(0), rows).into_tensor().into_tvalue())
}

/// Optimum's `image-to-text-with-past` export: the decoder graphs take the encoder output and
/// recompute the cross-attention keys/values at every step; the self-attention cache is fed
/// back as `past_key_values.{i}.key/value`.
pub struct OptimumRuntime {
    encoder: Graph,
    decoder: Graph,
    decoder_with_past: Graph,
    ids_dtype: DatumType,
    n_layer: usize,
    vocab_size: usize,
}

impl OptimumRuntime {
    pub fn load(bundle: &Bundle, encoder: &Path, decoder: &Path, decoder_with_past: &Path) -> Result<Self> {
        let cfg = &bundle.config;
        let (h, w) = (bundle.preprocess.size.height, bundle.preprocess.size.width);
        let enc_seq = cfg.encoder.seq_len();
        let enc_dim = cfg.encoder.hidden_size;
        let (n_layer, heads, head_dim) = (cfg.decoder.n_layer, cfg.decoder.n_head, cfg.decoder.head_dim());
        if (h, w) != (cfg.encoder.image_size, cfg.encoder.image_size) {
            return Err(Error::bundle(
                bundle.dir.join("preprocessor_config.json"),
                format!("size {h}x{w} differs from the encoder's image_size {} in config.json", cfg.encoder.image_size),
            ));
        }
        let encoder = Graph::load(
            encoder,
            |_| vec![InputSpec { name: "pixel_values".into(), dtype: f32::datum_type(), shape: tvec![1, 3, h, w].into_iter().map(TDim::from).collect() }],
            &["last_hidden_state".to_string()],
        )?;
        let presents: Vec<String> =
            (0..n_layer).flat_map(|i| [format!("present.{i}.key"), format!("present.{i}.value")]).collect();
        let mut dec_outputs = vec!["logits".to_string()];
        dec_outputs.extend(presents.iter().cloned());
        let ids_dtype = i64::datum_type();
        let base_specs = |m: &InferenceModel, with_past: bool| {
            let b = TDim::from(m.sym("B"));
            let mut v = vec![
                InputSpec { name: "input_ids".into(), dtype: ids_dtype, shape: vec![b.clone(), 1.into()] },
                InputSpec {
                    name: "encoder_hidden_states".into(),
                    dtype: f32::datum_type(),
                    shape: vec![b.clone(), enc_seq.into(), enc_dim.into()],
                },
            ];
            if with_past {
                let p = TDim::from(m.sym("P"));
                for i in 0..n_layer {
                    for kv in ["key", "value"] {
                        v.push(InputSpec {
                            name: format!("past_key_values.{i}.{kv}"),
                            dtype: f32::datum_type(),
                            shape: vec![b.clone(), heads.into(), p.clone(), head_dim.into()],
                        });
                    }
                }
            }
            v
        };
        let decoder = Graph::load(decoder, |m| base_specs(m, false), &dec_outputs)?;
        let decoder_with_past = Graph::load(decoder_with_past, |m| base_specs(m, true), &dec_outputs)?;
        let rt = OptimumRuntime { encoder, decoder, decoder_with_past, ids_dtype, n_layer, vocab_size: cfg.decoder.vocab_size };
        rt.check_vocab()?;
        Ok(rt)
    }

    /// The logits width must be the config's vocab size.
    fn check_vocab(&self) -> Result<()> {
        let idx = self.decoder.output_index("logits")?;
        let fact = self.decoder.plan.model().output_fact(idx).map_err(|e| Error::bundle(self.decoder.path(), chain(&e)))?;
        if let Some(last) = fact.shape.iter().last() {
            if let Ok(v) = last.to_i64() {
                if v as usize != self.vocab_size {
                    return Err(Error::bundle(
                        self.decoder.path(),
                        format!("logits have {v} entries but config.json says vocab_size = {}", self.vocab_size),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Runtime for OptimumRuntime {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>> {
        let out = self.encoder.run("encoder", vec![("pixel_values", pixel_values.into_tensor().into_tvalue())])?;
        let idx = self.encoder.output_index("last_hidden_state")?;
        let hidden = out[idx].clone();
        Ok(Box::new(OptimumEncoding { rt: self, hidden }))
    }

    fn describe(&self) -> String {
        format!(
            "optimum layout: {}, {}, {}",
            self.encoder.path().display(),
            self.decoder.path().display(),
            self.decoder_with_past.path().display()
        )
    }
}

struct OptimumEncoding<'a> {
    rt: &'a OptimumRuntime,
    /// `[1, seq, dim]`
    hidden: TValue,
}

impl ImageEncoding for OptimumEncoding<'_> {
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>> {
        let hidden = if rows == 1 {
            self.hidden.clone()
        } else {
            gather_rows("decoder", &self.hidden, &vec![0; rows])?
        };
        Ok(Box::new(OptimumSession { rt: self.rt, hidden, past: None }))
    }
}

struct OptimumSession<'a> {
    rt: &'a OptimumRuntime,
    hidden: TValue,
    /// `past_key_values.{i}.key/value`, layer by layer, key before value.
    past: Option<Vec<TValue>>,
}

impl DecoderSession for OptimumSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>> {
        let rt = self.rt;
        let ids = ids_tensor(rt.ids_dtype, tokens)?;
        let mut inputs: Vec<(&str, TValue)> = vec![("input_ids", ids), ("encoder_hidden_states", self.hidden.clone())];
        let names: Vec<String> =
            (0..rt.n_layer).flat_map(|i| [format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")]).collect();
        let graph = match self.past.take() {
            None => &rt.decoder,
            Some(past) => {
                for (n, t) in names.iter().zip(past) {
                    inputs.push((n.as_str(), t));
                }
                &rt.decoder_with_past
            }
        };
        let out = graph.run("decoder", inputs)?;
        let logits = logits_last("decoder", &out[graph.output_index("logits")?])?;
        let mut past = Vec::with_capacity(2 * rt.n_layer);
        for i in 0..rt.n_layer {
            for kv in ["key", "value"] {
                past.push(out[graph.output_index(&format!("present.{i}.{kv}"))?].clone());
            }
        }
        self.past = Some(past);
        Ok(logits)
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        if let Some(past) = &self.past {
            let reordered = past.iter().map(|t| gather_rows("decoder", t, rows)).collect::<Result<Vec<_>>>()?;
            self.past = Some(reordered);
        }
        Ok(())
    }
}

/// The project's fast layout (`vitgpt2-host export`): the encoder graph also emits every
/// decoder layer's cross-attention keys/values (`cross.{i}.key/value`, batch 1), computed once
/// per image; one decoder-step graph takes `input_ids`, `position_ids`, the self-attention
/// cache `past.{i}.key/value` (length P symbolic, 0 at the first step) and the cross
/// keys/values, and returns `logits [B, vocab]` and `present.{i}.key/value`.
pub struct FastRuntime {
    encoder: Graph,
    decoder_step: Graph,
    n_layer: usize,
    heads: usize,
    head_dim: usize,
    vocab_size: usize,
}

impl FastRuntime {
    pub fn load(bundle: &Bundle, encoder: &Path, decoder_step: &Path) -> Result<Self> {
        let cfg = &bundle.config;
        let (h, w) = (bundle.preprocess.size.height, bundle.preprocess.size.width);
        let enc_seq = cfg.encoder.seq_len();
        let (n_layer, heads, head_dim) = (cfg.decoder.n_layer, cfg.decoder.n_head, cfg.decoder.head_dim());
        if (h, w) != (cfg.encoder.image_size, cfg.encoder.image_size) {
            return Err(Error::bundle(
                bundle.dir.join("preprocessor_config.json"),
                format!("size {h}x{w} differs from the encoder's image_size {} in config.json", cfg.encoder.image_size),
            ));
        }
        let kv_names = |prefix: &str| -> Vec<String> {
            (0..n_layer).flat_map(|i| [format!("{prefix}.{i}.key"), format!("{prefix}.{i}.value")]).collect()
        };
        let mut enc_outputs = vec!["last_hidden_state".to_string()];
        enc_outputs.extend(kv_names("cross"));
        let encoder = Graph::load(
            encoder,
            |_| vec![InputSpec { name: "pixel_values".into(), dtype: f32::datum_type(), shape: tvec![1, 3, h, w].into_iter().map(TDim::from).collect() }],
            &enc_outputs,
        )?;
        let mut dec_outputs = vec!["logits".to_string()];
        dec_outputs.extend(kv_names("present"));
        let specs = |m: &InferenceModel| {
            let b = TDim::from(m.sym("B"));
            let p = TDim::from(m.sym("P"));
            let mut v = vec![
                InputSpec { name: "input_ids".into(), dtype: i64::datum_type(), shape: vec![b.clone(), 1.into()] },
                InputSpec { name: "position_ids".into(), dtype: i64::datum_type(), shape: vec![b.clone(), 1.into()] },
            ];
            for name in kv_names("past") {
                v.push(InputSpec {
                    name,
                    dtype: f32::datum_type(),
                    shape: vec![b.clone(), heads.into(), p.clone(), head_dim.into()],
                });
            }
            for name in kv_names("cross") {
                v.push(InputSpec {
                    name,
                    dtype: f32::datum_type(),
                    shape: vec![1.into(), heads.into(), enc_seq.into(), head_dim.into()],
                });
            }
            v
        };
        let decoder_step = Graph::load(decoder_step, specs, &dec_outputs)?;
        let rt = FastRuntime { encoder, decoder_step, n_layer, heads, head_dim, vocab_size: cfg.decoder.vocab_size };
        let idx = rt.decoder_step.output_index("logits")?;
        let fact = rt.decoder_step.plan.model().output_fact(idx).map_err(|e| Error::bundle(rt.decoder_step.path(), chain(&e)))?;
        if let Some(Ok(v)) = fact.shape.iter().last().map(|d| d.to_i64()) {
            if v as usize != rt.vocab_size {
                return Err(Error::bundle(
                    rt.decoder_step.path(),
                    format!("logits have {v} entries but config.json says vocab_size = {}", rt.vocab_size),
                ));
            }
        }
        Ok(rt)
    }
}

impl FastRuntime {
    /// The encoder and decoder-step graphs (for profiling).
    pub fn graphs(&self) -> (&Graph, &Graph) {
        (&self.encoder, &self.decoder_step)
    }

    /// Shape of one layer's self-attention cache for `rows` hypotheses and `past` positions.
    pub fn past_shape(&self, rows: usize, past: usize) -> [usize; 4] {
        [rows, self.heads, past, self.head_dim]
    }

    pub fn n_layer(&self) -> usize {
        self.n_layer
    }
}

impl Runtime for FastRuntime {
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>> {
        let out = self.encoder.run("encoder", vec![("pixel_values", pixel_values.into_tensor().into_tvalue())])?;
        let mut cross = Vec::with_capacity(2 * self.n_layer);
        for i in 0..self.n_layer {
            for kv in ["key", "value"] {
                cross.push(out[self.encoder.output_index(&format!("cross.{i}.{kv}"))?].clone());
            }
        }
        Ok(Box::new(FastEncoding { rt: self, cross }))
    }

    fn describe(&self) -> String {
        format!("fast layout: {}, {}", self.encoder.path().display(), self.decoder_step.path().display())
    }
}

struct FastEncoding<'a> {
    rt: &'a FastRuntime,
    /// `cross.{i}.key/value`, `[1, heads, enc_seq, head_dim]`, layer by layer, key before value.
    cross: Vec<TValue>,
}

impl ImageEncoding for FastEncoding<'_> {
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>> {
        let rt = self.rt;
        let empty = Tensor::zero::<f32>(&[rows, rt.heads, 0, rt.head_dim])
            .map_err(|e| Error::runtime("decoder", chain(&e)))?
            .into_tvalue();
        Ok(Box::new(FastSession { rt, cross: &self.cross, past: vec![empty; 2 * rt.n_layer], position: 0 }))
    }
}

struct FastSession<'a> {
    rt: &'a FastRuntime,
    cross: &'a [TValue],
    /// `past.{i}.key/value`, layer by layer, key before value.
    past: Vec<TValue>,
    /// Positions already decoded (the same for every row).
    position: usize,
}

impl DecoderSession for FastSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Array2<f32>> {
        let rt = self.rt;
        let ids = ids_tensor(i64::datum_type(), tokens)?;
        let pos = Tensor::from_shape(&[tokens.len(), 1], &vec![self.position as i64; tokens.len()])
            .map_err(|e| Error::runtime("decoder", chain(&e)))?
            .into_tvalue();
        let names: Vec<(String, String)> = (0..rt.n_layer)
            .flat_map(|i| {
                [
                    (format!("past.{i}.key"), format!("cross.{i}.key")),
                    (format!("past.{i}.value"), format!("cross.{i}.value")),
                ]
            })
            .collect();
        let mut inputs: Vec<(&str, TValue)> = vec![("input_ids", ids), ("position_ids", pos)];
        let past = std::mem::take(&mut self.past);
        for ((p, c), (past, cross)) in names.iter().zip(past.into_iter().zip(self.cross.iter())) {
            inputs.push((p.as_str(), past));
            inputs.push((c.as_str(), cross.clone()));
        }
        let g = &rt.decoder_step;
        let out = g.run("decoder", inputs)?;
        let view = out[g.output_index("logits")?].to_plain_array_view::<f32>().map_err(|e| Error::runtime("decoder", chain(&e)))?;
        let logits = view.into_dimensionality::<ndarray::Ix2>().map_err(|e| Error::runtime("decoder", format!("logits: {e}")))?.to_owned();
        let mut past = Vec::with_capacity(2 * rt.n_layer);
        for i in 0..rt.n_layer {
            for kv in ["key", "value"] {
                past.push(out[g.output_index(&format!("present.{i}.{kv}"))?].clone());
            }
        }
        self.past = past;
        self.position += 1;
        Ok(logits)
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().enumerate().all(|(i, &r)| i == r) && rows.len() == self.past.first().map(|t| t.shape()[0]).unwrap_or(0) {
            return Ok(());
        }
        self.past = self.past.iter().map(|t| gather_rows("decoder", t, rows)).collect::<Result<Vec<_>>>()?;
        Ok(())
    }
}
