//! A small ONNX graph builder over tract-onnx's prost types (`tract_onnx::pb`): initializers
//! from f32/int8 buffers, typed inputs and outputs with symbolic dims, and node helpers.

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension, tensor_shape_proto::Dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The opset every exported graph declares: 20 for `Gelu` (with `approximate="tanh"`) and
/// `LayerNormalization` (17).
pub const OPSET: i64 = 20;
/// ONNX IR version matching opset 20 (onnx 1.15).
pub const IR_VERSION: i64 = 9;

/// A dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(usize),
    Sym(&'static str),
}

impl From<usize> for Dim {
    fn from(v: usize) -> Self {
        Dim::Fixed(v)
    }
}

/// An attribute value for [`GraphBuilder::node`].
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(&'static str),
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto { name: name.to_string(), ..Default::default() };
    match value {
        Attr::Int(i) => {
            a.r#type = AttributeType::Int as i32;
            a.i = i;
        }
        Attr::Ints(v) => {
            a.r#type = AttributeType::Ints as i32;
            a.ints = v;
        }
        Attr::Float(f) => {
            a.r#type = AttributeType::Float as i32;
            a.f = f;
        }
        Attr::Str(s) => {
            a.r#type = AttributeType::String as i32;
            a.s = s.as_bytes().to_vec();
        }
    }
    a
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(v) => dimension::Value::DimValue(*v as i64),
                Dim::Sym(s) => dimension::Value::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// Builds one ONNX graph node by node. Values are named by strings, as in ONNX.
pub struct GraphBuilder {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    counter: usize,
    /// Bytes of initializer data, for progress and size reports.
    pub weight_bytes: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            name: name.to_string(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            counter: 0,
            weight_bytes: 0,
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    fn init_raw(&mut self, name: &str, dims: &[usize], dt: DataType, raw: Vec<u8>) -> String {
        self.weight_bytes += raw.len();
        self.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dt as i32,
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    /// A float32 initializer.
    pub fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "initializer {name}: shape {dims:?} vs {} values", data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, dims, DataType::Float, raw)
    }

    /// An int8 initializer.
    pub fn init_i8(&mut self, name: &str, dims: &[usize], data: &[i8]) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "initializer {name}");
        let raw = data.iter().map(|&v| v as u8).collect();
        self.init_raw(name, dims, DataType::Int8, raw)
    }

    /// A uint8 initializer (onnxruntime's `_uint8` weights, zero points).
    pub fn init_u8(&mut self, name: &str, dims: &[usize], data: &[u8]) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "initializer {name}");
        self.init_raw(name, dims, DataType::Uint8, data.to_vec())
    }

    /// An int64 initializer (shapes, axes).
    pub fn init_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "initializer {name}");
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, dims, DataType::Int64, raw)
    }

    /// A 1-D int64 constant (for Reshape shapes), with a fresh name.
    pub fn shape_const(&mut self, dims: &[i64]) -> String {
        let n = self.fresh("shape");
        self.init_i64(&n, &[dims.len()], dims)
    }

    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Declares `value` as a graph output named `name` (through an Identity when the names differ).
    pub fn output(&mut self, value: &str, name: &str, elem: DataType, dims: &[Dim]) {
        if value != name {
            self.node_to("Identity", &[value], name, vec![]);
        }
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Adds a node with one output, named after the op; returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.node_to(op, inputs, &out, attrs);
        out
    }

    /// Adds a node with one output named `out`.
    pub fn node_to(&mut self, op: &str, inputs: &[&str], out: &str, attrs: Vec<(&str, Attr)>) {
        self.node_multi(op, inputs, &[out], attrs);
    }

    /// Adds a node with several outputs (empty names for unused optional ones).
    pub fn node_multi(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        let name = self.fresh(&format!("n_{op}"));
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.to_string(),
            domain: String::new(),
            attribute: attrs.into_iter().map(|(n, v)| attribute(n, v)).collect(),
            doc_string: String::new(),
        });
    }

    /// Fresh value names for multi-output nodes.
    pub fn fresh_names(&mut self, hint: &str, n: usize) -> Vec<String> {
        (0..n).map(|_| self.fresh(hint)).collect()
    }

    pub fn finish(self, doc: &str, metadata: &[(&str, String)]) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
            producer_name: "vitgpt2".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.to_string(),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto { key: k.to_string(), value: v.clone() })
                .collect(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Serializes a model to bytes (protobuf).
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}
