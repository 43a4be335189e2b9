//! An ONNX file as the node reads it, before tract: the protobuf, its external data checked, its
//! operators checked against what tract runs, Optimum's merged decoder specialized per branch of
//! its `If`, fp16 weights widened to f32. Every failure is one line naming the file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::pb::{type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

use super::raw_data::{FileBuf, RawData};
use crate::bundle::contract::tensor;
use crate::error::{Error, Result};

/// A parsed ONNX file. The top-level initializers' long `raw_data` may still be in the file
/// (markers, see [`raw_data`](super::raw_data)): read them with `raw`, or [`fill_all`](Self::fill_all).
pub struct OnnxFile {
    pub path: PathBuf,
    pub proto: ModelProto,
    pub raw: Option<RawData>,
}

impl OnnxFile {
    /// Reads and decodes `path`. Errors: missing, unreadable, or not an ONNX protobuf.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::bundle(path, "missing file"));
        }
        let cannot = |e: std::io::Error| Error::bundle(path, format!("cannot read: {e}"));
        let file = std::fs::File::open(path).map_err(cannot)?;
        let raw = RawData::new(&file).map_err(cannot)?;
        let mut input = FileBuf::new(file, raw.as_ref().map(RawData::tag)).map_err(cannot)?;
        let decoded = ModelProto::decode(&mut input);
        if let Some(e) = input.error {
            return Err(cannot(e));
        }
        let mut proto = decoded.map_err(|e| Error::bundle(path, format!("not a readable ONNX model (truncated, or not ONNX at all?): {e}")))?;
        if proto.graph.is_none() {
            return Err(Error::bundle(path, "not a readable ONNX model (truncated, or not ONNX at all?): no graph"));
        }
        if let Some(raw) = &raw {
            raw.fill_nested(&mut proto).map_err(cannot)?;
        }
        Ok(OnnxFile { path: path.to_path_buf(), proto, raw })
    }

    /// Reads `path` and makes it ready for tract: external data checked, fp16 widened to f32.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = Self::read(path)?;
        f.check_external_data()?;
        if f.has_fp16() {
            let n = f.widen_fp16()?;
            tracing::info!(graph = %path.display(), tensors = n, "fp16 graph widened to f32");
        }
        Ok(f)
    }

    /// Reads every initializer still in the file into the protobuf (for code that edits their
    /// bytes, or wants the protobuf as it is on disk).
    pub fn fill_all(&mut self) -> Result<()> {
        self.fill_initializers(|_| true)
    }

    /// Reads the initializers that `which` picks back into the protobuf.
    fn fill_initializers(&mut self, which: impl Fn(&TensorProto) -> bool) -> Result<()> {
        let (Some(raw), Some(g)) = (&self.raw, self.proto.graph.as_mut()) else { return Ok(()) };
        g.initializer
            .iter_mut()
            .filter(|t| which(t))
            .try_for_each(|t| raw.fill(&mut t.raw_data))
            .map_err(|e| Error::bundle(&self.path, format!("cannot read: {e}")))
    }

    /// The folder external data locations are relative to.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn graph(&self) -> &GraphProto {
        // `read` refuses a model without a graph.
        self.proto.graph.as_ref().expect("checked in OnnxFile::read")
    }

    /// Checks that every tensor kept outside the graph (`*.onnx_data`, `*.onnx.data`, any
    /// `location`) is there and long enough. Errors name the data file and what is wrong.
    pub fn check_external_data(&self) -> Result<()> {
        let mut sizes: HashMap<PathBuf, u64> = HashMap::new();
        for t in all_tensors(self.graph()) {
            if t.data_location != Some(DataLocation::External as i32) {
                continue;
            }
            let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
            let Some(location) = entry("location") else {
                return Err(Error::bundle(&self.path, format!("tensor {} is external but names no location", t.name)));
            };
            let file = self.dir().join(location);
            let size = match sizes.get(&file) {
                Some(s) => *s,
                None => {
                    let s = std::fs::metadata(&file)
                        .map_err(|_| {
                            Error::bundle(
                                &file,
                                format!(
                                    "missing: {} keeps its weights in this file (external data); copy it next to the graph",
                                    self.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                                ),
                            )
                        })?
                        .len();
                    sizes.insert(file.clone(), s);
                    s
                }
            };
            let offset: u64 = entry("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
            let length: u64 = match entry("length").and_then(|v| v.parse().ok()) {
                Some(l) => l,
                None => element_size(t.data_type).unwrap_or(1) * t.dims.iter().product::<i64>().max(0) as u64,
            };
            if offset + length > size {
                return Err(Error::bundle(
                    &file,
                    format!(
                        "too short ({size} bytes) for tensor {} (bytes {offset}..{}): the data file is truncated or belongs to another graph",
                        t.name,
                        offset + length
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Operators of the graph (and its subgraphs) that tract does not implement, as
    /// `domain:op` (or `op` for the default domain), sorted.
    pub fn unsupported_ops(&self) -> Vec<String> {
        let onnx = tract_onnx::onnx();
        let mut out = HashSet::new();
        visit_nodes(self.graph(), &mut |n| {
            if !onnx.op_register.0.contains_key(&n.op_type) {
                out.insert(if n.domain.is_empty() || n.domain == "ai.onnx" { n.op_type.clone() } else { format!("{}:{}", n.domain, n.op_type) });
            }
        });
        let mut v: Vec<String> = out.into_iter().collect();
        v.sort();
        v
    }

    /// Whether the graph holds float16 tensors or casts to float16.
    pub fn has_fp16(&self) -> bool {
        let mut found = all_tensors(self.graph()).any(|t| t.data_type == DataType::Float16 as i32);
        visit_nodes(self.graph(), &mut |n| {
            found |= n.op_type == "Cast" && n.attribute.iter().any(|a| a.name == "to" && a.i == DataType::Float16 as i64);
        });
        found
    }

    /// The graph with float16 everywhere widened to float32: weights (read from external data
    /// where needed), `Cast` targets, constants and declared types. The arithmetic then runs in
    /// f32 on the fp16-rounded weights (tract's f16 kernels are slow on CPUs without native
    /// half-precision products). Returns how many tensors were widened.
    pub fn widen_fp16(&mut self) -> Result<usize> {
        // Only the fp16 weights come back into the protobuf; the rest still go straight to tensors.
        self.fill_initializers(|t| t.data_type == DataType::Float16 as i32)?;
        let dir = self.dir().to_path_buf();
        let path = self.path.clone();
        let graph = self.proto.graph.as_mut().ok_or_else(|| Error::bundle(&path, "no graph"))?;
        let mut n = 0;
        widen_graph(graph, &dir, &path, &mut n)?;
        Ok(n)
    }

    /// Optimum's merged decoder made a plain graph: the top-level `If` on its `use_cache_branch`
    /// input replaced, in place, by its cache branch (the decoder with a past), the input removed
    /// and what no longer feeds an output pruned. Given an empty past at the first step, that
    /// branch computes what the no-cache branch computes (the past is concatenated with nothing),
    /// so one plan serves every step — half the memory and load time of one plan per branch;
    /// tokens equal onnxruntime's, which runs the no-cache branch first (tests/interop.rs).
    /// Returns false when there is no such `If` (a merged decoder written without one takes its
    /// inputs as they are).
    pub fn specialize_use_cache(&mut self) -> Result<bool> {
        let path = self.path.clone();
        let g = self.proto.graph.as_mut().ok_or_else(|| Error::bundle(&path, "no graph"))?;
        let if_ix = {
            let producers: HashMap<&str, &NodeProto> =
                g.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
            match g.node.iter().position(|n| n.op_type == "If" && cond_is_input(&n.input[0], &producers, tensor::USE_CACHE_BRANCH)) {
                Some(i) => i,
                None => return Ok(false),
            }
        };
        let mut if_node = g.node.remove(if_ix);
        let branch = if_node
            .attribute
            .iter_mut()
            .find(|a| a.name == "then_branch")
            .and_then(|a| a.g.take())
            .ok_or_else(|| Error::bundle(&path, "the If on use_cache_branch has no then_branch"))?;
        if branch.output.len() != if_node.output.len() {
            return Err(Error::bundle(&path, format!("the If's cache branch has {} outputs, the If {}", branch.output.len(), if_node.output.len())));
        }
        // The branch's own names must not clash with the outer graph's.
        let outer: HashSet<&str> = g
            .input
            .iter()
            .map(|i| i.name.as_str())
            .chain(g.initializer.iter().map(|t| t.name.as_str()))
            .chain(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)))
            .collect();
        if let Some(clash) = branch.node.iter().flat_map(|n| n.output.iter()).find(|o| outer.contains(o.as_str())) {
            return Err(Error::bundle(&path, format!("cannot inline the If's cache branch: its tensor `{clash}` shadows an outer one")));
        }
        let tail = g.node.split_off(if_ix);
        g.node.extend(branch.node);
        // The branch's outputs become the If's (Optimum names them the same; otherwise alias).
        for (b, o) in branch.output.iter().zip(&if_node.output) {
            if b.name != *o {
                g.node.push(NodeProto { input: vec![b.name.clone()], output: vec![o.clone()], op_type: "Identity".into(), name: format!("{o}.from_branch"), ..Default::default() });
            }
        }
        g.node.extend(tail);
        g.initializer.extend(branch.initializer);
        prune(g);
        g.input.retain(|i| i.name != tensor::USE_CACHE_BRANCH);
        Ok(true)
    }
}

/// Whether `name` is graph input `input`, possibly through Identity/Cast/Reshape/Squeeze nodes.
fn cond_is_input(name: &str, producers: &HashMap<&str, &NodeProto>, input: &str) -> bool {
    let mut name = name;
    for _ in 0..8 {
        if name == input {
            return true;
        }
        match producers.get(name) {
            Some(n) if matches!(n.op_type.as_str(), "Identity" | "Cast" | "Reshape" | "Squeeze" | "Unsqueeze") => name = &n.input[0],
            _ => return false,
        }
    }
    false
}

/// Removes nodes, initializers and inputs that no graph output depends on (names used inside
/// subgraphs count as used).
fn prune(g: &mut GraphProto) {
    let mut needed: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    visit_nodes(sub, &mut |m| needed.extend(m.input.iter().cloned()));
                }
            }
        }
    }
    let mut it = keep.iter();
    g.node.retain(|_| *it.next().unwrap_or(&false));
    g.initializer.retain(|t| needed.contains(&t.name));
    g.input.retain(|i| needed.contains(&i.name));
}

fn visit_nodes(g: &GraphProto, f: &mut dyn FnMut(&NodeProto)) {
    for n in &g.node {
        f(n);
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                visit_nodes(sub, f);
            }
        }
    }
}

/// Every tensor of the graph: initializers and tensor-valued attributes, subgraphs included.
fn all_tensors(g: &GraphProto) -> Box<dyn Iterator<Item = &TensorProto> + '_> {
    let attrs = g.node.iter().flat_map(|n| n.attribute.iter()).flat_map(|a: &AttributeProto| {
        let subs = a.g.iter().chain(a.graphs.iter()).flat_map(|s| all_tensors(s));
        a.t.iter().chain(a.tensors.iter()).chain(subs)
    });
    Box::new(g.initializer.iter().chain(attrs))
}

/// Bytes per element of an ONNX data type (None for strings and unknown types).
fn element_size(dt: i32) -> Option<u64> {
    use DataType::*;
    Some(match DataType::try_from(dt).ok()? {
        Float | Int32 | Uint32 => 4,
        Double | Int64 | Uint64 | Complex64 => 8,
        Float16 | Bfloat16 | Int16 | Uint16 => 2,
        Int8 | Uint8 | Bool => 1,
        Complex128 => 16,
        _ => return None,
    })
}

fn widen_graph(g: &mut GraphProto, dir: &Path, path: &Path, n: &mut usize) -> Result<()> {
    for t in g.initializer.iter_mut() {
        widen_tensor(t, dir, path, n)?;
    }
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        widen_value_info(v);
    }
    for node in g.node.iter_mut() {
        let is_cast = node.op_type == "Cast";
        for a in node.attribute.iter_mut() {
            if is_cast && a.name == "to" && a.i == DataType::Float16 as i64 {
                a.i = DataType::Float as i64;
            }
            if let Some(t) = a.t.as_mut() {
                widen_tensor(t, dir, path, n)?;
            }
            for t in a.tensors.iter_mut() {
                widen_tensor(t, dir, path, n)?;
            }
            if let Some(sub) = a.g.as_mut() {
                widen_graph(sub, dir, path, n)?;
            }
            for sub in a.graphs.iter_mut() {
                widen_graph(sub, dir, path, n)?;
            }
        }
    }
    Ok(())
}

fn widen_value_info(v: &mut ValueInfoProto) {
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if t.elem_type == DataType::Float16 as i32 {
            t.elem_type = DataType::Float as i32;
        }
    }
}

/// One float16 tensor rewritten as float32 (raw data, `int32_data` or external bytes).
fn widen_tensor(t: &mut TensorProto, dir: &Path, path: &Path, n: &mut usize) -> Result<()> {
    if t.data_type != DataType::Float16 as i32 {
        return Ok(());
    }
    let bits: Vec<u16> = if t.data_location == Some(DataLocation::External as i32) {
        let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
        let file = dir.join(entry("location").unwrap_or_default());
        let bytes = std::fs::read(&file).map_err(|e| Error::bundle(&file, format!("cannot read: {e}")))?;
        let offset: usize = entry("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
        let count = t.dims.iter().product::<i64>().max(0) as usize;
        let end = offset + 2 * count;
        let slice = bytes.get(offset..end).ok_or_else(|| Error::bundle(&file, format!("too short for tensor {}", t.name)))?;
        t.data_location = None;
        t.external_data.clear();
        slice.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    } else if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    } else {
        t.int32_data.iter().map(|&v| v as u16).collect()
    };
    let count = t.dims.iter().product::<i64>().max(0) as usize;
    if bits.len() != count {
        return Err(Error::bundle(path, format!("fp16 tensor {} holds {} values for shape {:?}", t.name, bits.len(), t.dims)));
    }
    t.raw_data = bits.iter().flat_map(|&b| half::f16::from_bits(b).to_f32().to_le_bytes()).collect();
    t.int32_data.clear();
    t.data_type = DataType::Float as i32;
    *n += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of several 1 MiB pieces decodes as the same bytes in memory do; cut short, it is
    /// refused as truncated, one line naming it.
    #[test]
    fn reads_in_pieces_as_in_memory() {
        let raw: Vec<u8> = (0..3_500_001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let weight = TensorProto { name: "w".into(), dims: vec![raw.len() as i64], data_type: DataType::Uint8 as i32, raw_data: raw, ..Default::default() };
        let proto = ModelProto { ir_version: 8, graph: Some(GraphProto { name: "g".into(), initializer: vec![weight], ..Default::default() }), ..Default::default() };
        let bytes = proto.encode_to_vec();
        let dir = std::env::temp_dir().join(format!("vitgpt2-filebuf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (whole, cut) = (dir.join("whole.onnx"), dir.join("cut.onnx"));
        std::fs::write(&whole, &bytes).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 1_000_000]).unwrap();
        let read = OnnxFile::read(&whole).and_then(|mut f| f.fill_all().map(|()| f.proto));
        let err = OnnxFile::read(&cut).err().map(|e| e.to_string());
        std::fs::remove_dir_all(&dir).ok();
        assert!(read.as_ref().is_ok_and(|p| *p == proto), "decoded differently: {:?}", read.err());
        let err = err.expect("a truncated file is refused");
        assert!(err.contains("cut.onnx") && err.contains("truncated") && !err.contains('\n'), "{err}");
    }
}
