//! One ONNX graph in tract: loaded, checked against the inputs and outputs the bundle contract
//! expects, optimized once (symbolic batch and past lengths, so one plan serves every step) and
//! run by name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_hir::infer::Factoid;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use super::{f32_ops, int8, quantize};
use super::onnx_file::OnnxFile;
use super::raw_data::RawData;
use crate::error::{chain, Error, Result};

/// One ONNX graph, optimized and ready to run, with its input and output names in order.
pub struct Graph {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Int8 products substituted by [`int8`] (rten-gemm or `int8_gemv`).
    int8_products: usize,
}

/// Which kernels run the int8 products (`VITGPT2_INT8_GEMM=tract|rten`; default: both kernels of
/// [`int8::substitute`]; the comparison in README "Performance" is made by switching this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Gemm {
    /// [`int8::substitute`]: few-row products (decoder steps) on `int8_gemv`'s kernels where the
    /// CPU has AVX-512 VNNI or AVX2, the others on rten-gemm — or on `int8_gemv`'s i16 tiles
    /// where rten-gemm's kernel saturates (AVX2 without VNNI).
    Auto,
    /// rten-gemm for every product (as before the few-row kernel; for comparison).
    Rten,
    /// tract's own quantized matrix products.
    Tract,
}

impl Int8Gemm {
    pub fn from_env() -> Self {
        match std::env::var("VITGPT2_INT8_GEMM").as_deref() {
            Ok("tract") => Int8Gemm::Tract,
            Ok("rten") => Int8Gemm::Rten,
            _ => Int8Gemm::Auto,
        }
    }
}

/// tract's passes with the substitutions between them: typing, declutter, [`int8::substitute`]
/// (unless [`Int8Gemm::Tract`]), [`f32_ops::substitute`] (unless `VITGPT2_F32_OPS=tract`), then
/// tract's optimizer. Returns the model and how many products
/// were substituted.
pub fn optimize(model: InferenceModel, gemm: Int8Gemm) -> TractResult<(TypedModel, usize)> {
    optimize_with(model, gemm, f32_ops::enabled_from_env())
}

/// As [`optimize`], with [`f32_ops::substitute`] run or not (`swap_f32`; the tests compare both).
pub fn optimize_with(model: InferenceModel, gemm: Int8Gemm, swap_f32: bool) -> TractResult<(TypedModel, usize)> {
    let t0 = std::time::Instant::now();
    let mut typed = model.into_typed()?;
    let typed_at = std::time::Instant::now();
    typed.declutter()?;
    let t1 = std::time::Instant::now();
    let n = match gemm {
        Int8Gemm::Auto => int8::substitute(&mut typed, true)?,
        Int8Gemm::Rten => int8::substitute(&mut typed, false)?,
        Int8Gemm::Tract => 0,
    };
    let quantize = if gemm != Int8Gemm::Tract && int8::fold_enabled() { quantize::substitute(&mut typed)? } else { 0 };
    let f32_ops = if swap_f32 { f32_ops::substitute(&mut typed)? } else { 0 };
    let t2 = std::time::Instant::now();
    typed.optimize()?;
    let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
    tracing::debug!(f32_ops, quantize, typing_ms = ms(t0, typed_at), declutter_ms = ms(typed_at, t1), int8_ms = ms(t1, t2), optimize_ms = ms(t2, std::time::Instant::now()), "graph optimized");
    Ok((typed, n))
}

/// The shape and type a graph input must have.
pub struct InputSpec {
    pub name: String,
    pub dtype: DatumType,
    pub shape: Vec<TDim>,
}

impl InputSpec {
    pub fn new(name: impl Into<String>, dtype: DatumType, shape: Vec<TDim>) -> Self {
        InputSpec { name: name.into(), dtype, shape }
    }
}

/// The names of a parsed model's inputs, in order.
pub fn declared_inputs(m: &InferenceModel) -> Vec<String> {
    m.input_outlets().map(|o| o.iter().map(|o| m.node(o.node).name.clone()).collect()).unwrap_or_default()
}

/// Per-op (or per-node) times of one run: `(op or node description, ms, nodes)`, slowest first.
pub type OpTimes = Vec<(String, f64, usize)>;

impl Graph {
    /// Loads and validates an ONNX graph: it must have exactly the inputs `specs` (any order)
    /// and at least the outputs `outputs`. `specs` is built from the model's own symbol table
    /// (and may look at which inputs the graph declares).
    /// Takes the file so that its protobuf is freed as soon as tract has parsed it.
    pub fn load(file: OnnxFile, specs: impl FnOnce(&InferenceModel) -> Vec<InputSpec>, outputs: &[String]) -> Result<Self> {
        Self::from_proto(&file.path, file.proto, file.raw.as_ref(), specs, outputs)
    }

    /// As [`Self::load`] for a protobuf derived from the file at `path` (external data is read
    /// relative to its folder; errors name it), its deferred initializers read through `raw`.
    fn from_proto(
        path: &Path,
        mut proto: ModelProto,
        raw: Option<&RawData>,
        specs: impl FnOnce(&InferenceModel) -> Vec<InputSpec>,
        outputs: &[String],
    ) -> Result<Self> {
        let dir = path.parent().and_then(|d| d.to_str());
        let t0 = std::time::Instant::now();
        let unreadable = |e: TractError| Error::bundle(path, format!("not a readable ONNX model (truncated, or not ONNX at all?): {}", chain(&e)));
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let weights = take_initializers(&onnx, &mut proto, raw, dir).map_err(unreadable)?;
        let parsed = onnx.parse(&proto, dir).map_err(unreadable)?;
        drop(proto);
        let mut model = parsed.model;
        let unresolved = attach_initializers(&mut model, parsed.unresolved_inputs, weights).map_err(unreadable)?;
        if !unresolved.is_empty() {
            return Err(Error::bundle(path, format!("the graph uses values it never defines: {unresolved:?}")));
        }
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
        let t1 = std::time::Instant::now();
        let (mut typed, int8_products) = optimize(model, Int8Gemm::from_env()).map_err(|e| {
            let msg = chain(&e);
            match failing_op(&msg) {
                // tract registers the operator but not this form of it.
                Some(op) => Error::Unsupported { path: path.to_path_buf(), msg: format!("uses operator {op} in a form this node cannot run ({msg})") },
                None => Error::bundle(path, format!("shapes or operators do not fit this model's config.json: {msg}")),
            }
        })?;
        if int8_products > 0 {
            tracing::debug!(graph = %path.display(), int8_products, kernels = int8::kernels(), "int8 products substituted");
        }
        let t2 = std::time::Instant::now();
        fold_constant_packs(&mut typed).map_err(|e| Error::bundle(path, chain(&e)))?;
        let plan = typed.into_runnable().map_err(|e| Error::bundle(path, chain(&e)))?;
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        tracing::debug!(graph = %path.display(), parse_ms = ms(t0, t1), passes_ms = ms(t1, t2), plan_ms = ms(t2, std::time::Instant::now()), "graph loaded");
        // Before the next graph loads (or while it loads on the other thread, see `fast`).
        super::release_freed_heap();
        Ok(Graph { path: path.to_path_buf(), plan, inputs: input_names, outputs: output_names, int8_products })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many of the graph's int8 products [`int8`] substituted (rten-gemm or `int8_gemv`).
    pub fn int8_products(&self) -> usize {
        self.int8_products
    }

    /// Whether the graph takes an input called `name`.
    pub fn has_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|i| i == name)
    }

    /// Runs the graph once with named inputs, timing every node: `(op, ms, nodes)` summed by
    /// op name (or per node, with its description, when `by_node`), slowest first
    /// (`vitgpt2-node bench --profile [--by-node]`).
    pub fn profile(&self, named: Vec<(&str, TValue)>, by_node: bool) -> Result<OpTimes> {
        let inputs = self.ordered("profile", named)?;
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
    pub fn run(&self, stage: &str, named: Vec<(&str, TValue)>) -> Result<TVec<TValue>> {
        let inputs = self.ordered(stage, named)?;
        self.plan.run(inputs).map_err(|e| Error::runtime(stage, chain(&e)))
    }

    /// Named values in the graph's input order.
    fn ordered(&self, stage: &str, mut named: Vec<(&str, TValue)>) -> Result<TVec<TValue>> {
        let mut inputs: TVec<TValue> = tvec!();
        for name in &self.inputs {
            let pos = named
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| Error::runtime(stage, format!("no value for input `{name}`")))?;
            inputs.push(named.swap_remove(pos).1);
        }
        Ok(inputs)
    }

    /// Errors when the last dimension of output `name` is known and is not `expected`
    /// (`what` words the message: "logits have N {what} M").
    pub fn check_last_dim(&self, name: &str, expected: usize, what: &str) -> Result<()> {
        let idx = self.output_index(name)?;
        let fact = self.plan.model().output_fact(idx).map_err(|e| Error::bundle(&self.path, chain(&e)))?;
        if let Some(Ok(v)) = fact.shape.iter().last().map(|d| d.to_i64()) {
            if v as usize != expected {
                return Err(Error::bundle(&self.path, format!("{name} have {v} {what} {expected}")));
            }
        }
        Ok(())
    }

    /// The position of output `name` in what [`Self::run`] returns.
    pub fn output_index(&self, name: &str) -> Result<usize> {
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

/// Replaces node `id`'s first output by `op` wired to `inputs` (outlets of `model`); the node
/// itself goes at the next `compact`. The one way the load-time substitutions (`int8`,
/// `f32_ops`) rewrite a graph.
pub(crate) fn swap_node(model: &mut TypedModel, id: usize, op: impl Into<Box<dyn TypedOp>>, inputs: &[OutletId]) -> TractResult<()> {
    let name = model.node(id).name.clone();
    let mut patch = TypedModelPatch::new(format!("{name} swapped at load"));
    let wires: TVec<OutletId> = inputs.iter().map(|i| patch.tap_model(model, *i)).collect::<TractResult<_>>()?;
    let out = patch.wire_node(&name, op, &wires)?;
    patch.shunt_outside(model, OutletId::new(id, 0), out[0])?;
    patch.apply(model)
}

/// The graph's initializers (weights) as tensors, taken out of `proto`, each one's protobuf bytes
/// freed as soon as its tensor is made: tract's own parse holds every weight twice (protobuf and
/// tensor) until it returns, the highest point of a caption's memory (the decoder's 137 MB of
/// int8 weights, twice, beside the loaded encoder). Initializers that ONNX before IR 4 also
/// lists as graph inputs (defaults) leave that list: tract makes them constants too. Those whose
/// bytes stayed in the file are read straight into their tensors (`raw`).
fn take_initializers(onnx: &tract_onnx::Onnx, proto: &mut ModelProto, raw: Option<&RawData>, dir: Option<&str>) -> TractResult<Vec<(String, Tensor)>> {
    let Some(graph) = proto.graph.as_mut() else { return Ok(vec![]) };
    let initializers = std::mem::take(&mut graph.initializer);
    let names: std::collections::HashSet<&str> = initializers.iter().map(|t| t.name.as_str()).collect();
    graph.input.retain(|i| !names.contains(i.name.as_str()));
    drop(names);
    let mut out = Vec::with_capacity(initializers.len());
    let mut from_file = 0;
    for mut t in initializers {
        let direct = raw.map(|r| r.read_tensor(&mut t)).transpose().map_err(|e| e.context(format!("initializer {}", t.name)))?.flatten();
        from_file += direct.is_some() as usize;
        let tensor = match direct {
            Some(tensor) => tensor,
            None => tract_onnx::tensor::load_tensor(&*onnx.provider, &t, dir).map_err(|e| e.context(format!("initializer {}", t.name)))?,
        };
        out.push((t.name, tensor));
    }
    tracing::debug!(initializers = out.len(), from_file, "weights read");
    Ok(out)
}

/// Wires the weights [`take_initializers`] took into `model` as constants, in place of the source
/// nodes tract's parse made for the names it could not resolve; returns the names still
/// unresolved (values the graph never defines).
fn attach_initializers(model: &mut InferenceModel, unresolved: Vec<String>, weights: Vec<(String, Tensor)>) -> TractResult<Vec<String>> {
    let mut weights: std::collections::HashMap<String, Tensor> = weights.into_iter().collect();
    let mut left = vec![];
    for name in unresolved {
        let Some(tensor) = weights.remove(&name) else {
            left.push(name);
            continue;
        };
        let source = model.node_by_name(&name)?.id;
        model.node_mut(source).name = format!("{name}.unresolved");
        let konst = model.add_const(name, tensor)?;
        for inlet in model.node(source).outputs[0].successors.clone() {
            model.add_edge(konst, inlet)?;
        }
        model.inputs.retain(|o| o.node != source);
    }
    Ok(left)
}

/// The operator of tract's "Translating node #N \"name\" Op ToTypedTranslator" error, if that is
/// what failed.
fn failing_op(msg: &str) -> Option<String> {
    let rest = &msg[msg.find("Translating node #")?..];
    let after_name = rest.splitn(3, '"').nth(2)?;
    let op = after_name.split_whitespace().next()?;
    rest.contains("ToTypedTranslator").then(|| op.to_string())
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

