//! An ONNX file as prost's input, with the weights left where they lie in the file.
//!
//! prost decodes a `bytes` field by copying it twice into fresh memory (`Buf::copy_to_bytes`,
//! then `Vec<u8>`'s `put`), and tract's `load_tensor` copies `raw_data` once more into the
//! tensor: three fresh copies of every weight (~240 MB for the full-size int8 bundle) before the
//! graph is even parsed — with their page faults, the largest part of a cold start's protobuf
//! work (perf: ~300 ms of ~1.1 s). Here each bytes field of at least [`DEFER_MIN`] bytes is
//! skipped while decoding and left as a 32-byte marker (this read's random tag, its offset and
//! length in the file); the top-level initializers are then read once, straight from the file
//! into their tensors ([`RawData::read_tensor`]), and every other marked field is filled in
//! right after decoding ([`RawData::fill_nested`]), so tract never sees a marker.
//!
//! Positional reads need Unix (`FileExt::read_exact_at`); elsewhere nothing is deferred.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{GraphProto, ModelProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{bail, format_err};

/// Bytes fields at least this long stay in the file while decoding: every weight matrix, not the
/// full-size model's biases and norms (768 floats, 3 KiB). Small enough that the tiny test
/// fixtures' and the demo model's matrices are read this way too, so every parity test checks it.
pub const DEFER_MIN: usize = 4 * 1024;

/// Marker layout: `MAGIC`, this read's tag, offset, length (little-endian u64 each).
const MAGIC: &[u8; 8] = b"vgp2defr";
const MARKER_LEN: usize = 32;

/// A file as prost's input, read in 1 MiB pieces (decoding then holds only the protobuf's own
/// copy; through a memory map, the whole file counted as resident beside it, the top of a
/// caption's peak RSS — README "Performance"). With a [`RawData`] tag, long bytes fields are
/// skipped (see the module). A read error ends the input early (prost then reports a truncation)
/// and is kept in `error`.
pub(super) struct FileBuf {
    file: File,
    piece: Vec<u8>,
    pos: usize,
    total: usize,
    remaining: usize,
    tag: Option<u64>,
    pub error: Option<std::io::Error>,
}

impl FileBuf {
    const PIECE: usize = 1 << 20;

    /// `tag`: the [`RawData::tag`] that skipped fields are marked with (None: copy everything).
    pub fn new(file: File, tag: Option<u64>) -> std::io::Result<Self> {
        let total = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        let mut buf = FileBuf { file, piece: Vec::with_capacity(Self::PIECE), pos: 0, total, remaining: total, tag, error: None };
        buf.refill();
        Ok(buf)
    }

    /// The next piece, when the current one is used up.
    fn refill(&mut self) {
        if self.pos < self.piece.len() || self.remaining == 0 {
            return;
        }
        self.piece.resize(Self::PIECE.min(self.remaining), 0);
        self.pos = 0;
        if let Err(e) = self.file.read_exact(&mut self.piece) {
            self.fail(e);
        }
    }

    /// The file shrank or failed under us: nothing more to give.
    fn fail(&mut self, e: std::io::Error) {
        self.piece.clear();
        self.pos = 0;
        self.remaining = 0;
        self.error = Some(e);
    }

    /// Moves past `len` bytes without reading them (`len` ≤ `remaining`).
    fn skip(&mut self, len: usize) {
        let in_piece = self.piece.len() - self.pos;
        if len <= in_piece {
            return self.advance(len);
        }
        // The file's position is the end of the current piece.
        self.remaining -= len;
        self.pos = self.piece.len();
        match i64::try_from(len - in_piece).map_err(std::io::Error::other).and_then(|n| self.file.seek(SeekFrom::Current(n))) {
            Ok(_) => self.refill(),
            Err(e) => self.fail(e),
        }
    }
}

impl Buf for FileBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.piece[self.pos..]
    }

    fn advance(&mut self, mut cnt: usize) {
        // Across pieces if asked (prost takes at most the current chunk, but the trait allows more).
        while cnt > 0 && self.remaining > 0 {
            let take = cnt.min(self.piece.len() - self.pos);
            self.pos += take;
            self.remaining -= take;
            cnt -= take;
            self.refill();
        }
    }

    /// prost's read of every `bytes` field (`raw_data`, attribute bytes; strings go through
    /// `take`): a long one becomes a marker, the rest is copied as the default method does.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        let Some(tag) = self.tag.filter(|_| len >= DEFER_MIN && len <= self.remaining) else {
            let mut out = BytesMut::with_capacity(len.min(self.remaining));
            out.put(self.take(len));
            return out.freeze();
        };
        let offset = (self.total - self.remaining) as u64;
        self.skip(len);
        Bytes::copy_from_slice(&marker(tag, offset, len as u64))
    }
}

fn marker(tag: u64, offset: u64, len: u64) -> [u8; MARKER_LEN] {
    let mut m = [0u8; MARKER_LEN];
    m[..8].copy_from_slice(MAGIC);
    m[8..16].copy_from_slice(&tag.to_le_bytes());
    m[16..24].copy_from_slice(&offset.to_le_bytes());
    m[24..].copy_from_slice(&len.to_le_bytes());
    m
}

/// Where the skipped fields of one decoded file are: the file, open since decoding (a bundle
/// replaced on disk meanwhile is still read whole from the old one), and the tag its markers
/// carry — random per read, so no field of any file can pass for a marker.
pub struct RawData {
    file: File,
    tag: u64,
}

impl RawData {
    /// For reading `file` with [`FileBuf`]: a handle of its own and a fresh tag. None where
    /// positional reads are missing (nothing is then deferred).
    pub(super) fn new(file: &File) -> std::io::Result<Option<Self>> {
        if !cfg!(unix) {
            return Ok(None);
        }
        use std::hash::{BuildHasher, Hasher};
        // SipHash's keys are random per `RandomState`: a u64 no file can know in advance.
        let tag = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Ok(Some(RawData { file: file.try_clone()?, tag }))
    }

    pub(super) fn tag(&self) -> u64 {
        self.tag
    }

    /// `(offset, len)` in the file when `bytes` is one of this read's markers.
    fn deferred(&self, bytes: &[u8]) -> Option<(u64, usize)> {
        if bytes.len() != MARKER_LEN || &bytes[..8] != MAGIC || bytes[8..16] != self.tag.to_le_bytes() {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        Some((word(16), usize::try_from(word(24)).ok()?))
    }

    fn read_at(&self, dst: &mut [u8], offset: u64) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::read_exact_at(&self.file, dst, offset)
        }
        #[cfg(not(unix))]
        {
            let _ = (dst, offset);
            Err(std::io::Error::other("deferred raw data needs positional reads"))
        }
    }

    /// Replaces a marker in `bytes` by the bytes it stands for (anything else is left as it is).
    pub fn fill(&self, bytes: &mut Vec<u8>) -> std::io::Result<()> {
        if let Some((offset, len)) = self.deferred(bytes) {
            let mut data = vec![0u8; len];
            self.read_at(&mut data, offset)?;
            *bytes = data;
        }
        Ok(())
    }

    /// Fills in every marked field except the top-level graph's initializers' `raw_data`, which
    /// [`read_tensor`](Self::read_tensor) reads into tensors: node attributes, subgraphs (their
    /// initializers too), sparse initializers, functions and training graphs.
    pub fn fill_nested(&self, proto: &mut ModelProto) -> std::io::Result<()> {
        if let Some(g) = proto.graph.as_mut() {
            for t in g.initializer.iter_mut() {
                t.string_data.iter_mut().try_for_each(|s| self.fill(s))?;
            }
            self.fill_graph(g, false)?;
        }
        for f in proto.functions.iter_mut() {
            f.node.iter_mut().flat_map(|n| n.attribute.iter_mut()).try_for_each(|a| self.fill_attribute(a))?;
        }
        for t in proto.training_info.iter_mut() {
            t.initialization.iter_mut().chain(t.algorithm.iter_mut()).try_for_each(|g| self.fill_graph(g, true))?;
        }
        Ok(())
    }

    fn fill_graph(&self, g: &mut GraphProto, initializers: bool) -> std::io::Result<()> {
        if initializers {
            g.initializer.iter_mut().try_for_each(|t| self.fill_tensor(t))?;
        }
        for s in g.sparse_initializer.iter_mut() {
            s.values.iter_mut().chain(s.indices.iter_mut()).try_for_each(|t| self.fill_tensor(t))?;
        }
        g.node.iter_mut().flat_map(|n| n.attribute.iter_mut()).try_for_each(|a| self.fill_attribute(a))
    }

    fn fill_attribute(&self, a: &mut tract_onnx::pb::AttributeProto) -> std::io::Result<()> {
        self.fill(&mut a.s)?;
        a.strings.iter_mut().try_for_each(|s| self.fill(s))?;
        a.t.iter_mut().chain(a.tensors.iter_mut()).try_for_each(|t| self.fill_tensor(t))?;
        for s in a.sparse_tensor.iter_mut().chain(a.sparse_tensors.iter_mut()) {
            s.values.iter_mut().chain(s.indices.iter_mut()).try_for_each(|t| self.fill_tensor(t))?;
        }
        a.g.iter_mut().chain(a.graphs.iter_mut()).try_for_each(|g| self.fill_graph(g, true))
    }

    fn fill_tensor(&self, t: &mut TensorProto) -> std::io::Result<()> {
        self.fill(&mut t.raw_data)?;
        t.string_data.iter_mut().try_for_each(|s| self.fill(s))
    }

    /// The tensor of a top-level initializer whose `raw_data` stayed in the file, read straight
    /// into it (one copy, as tract's `load_tensor` would make it from the bytes). None when `t`
    /// is not deferred; a deferred tensor of a type read otherwise (bool, strings…) or on a
    /// big-endian CPU gets its bytes back in `t` and None. Errors: dims that do not match the
    /// data's length, a failed read.
    pub fn read_tensor(&self, t: &mut TensorProto) -> TractResult<Option<Tensor>> {
        let Some((offset, len)) = self.deferred(&t.raw_data) else { return Ok(None) };
        let Some(dt) = plain_datum_type(t.data_type).filter(|_| cfg!(target_endian = "little")) else {
            self.fill(&mut t.raw_data)?;
            return Ok(None);
        };
        let shape = t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| format_err!("negative dimension {d}"))).collect::<TractResult<Vec<usize>>>()?;
        let size = shape.iter().try_fold(dt.size_of(), |n, &d| n.checked_mul(d));
        if size != Some(len) {
            bail!("raw data of {len} bytes for shape {:?} of {dt:?}", t.dims);
        }
        // Safety: every byte is written by the read below before the tensor is used (an error
        // drops it unread), and each of these types is valid for any bit pattern — tract's own
        // `Tensor::from_raw` fills an uninitialized tensor the same way.
        let mut tensor = unsafe { Tensor::uninitialized_dt(dt, &shape)? };
        self.read_at(tensor.as_bytes_mut(), offset)?;
        Ok(Some(tensor))
    }
}

/// The tract type of ONNX data types stored as their little-endian bytes, as `load_tensor` reads
/// them (bool and strings excepted: not plain bytes).
fn plain_datum_type(dt: i32) -> Option<DatumType> {
    use DataType::*;
    Some(match DataType::try_from(dt).ok()? {
        Float => DatumType::F32,
        Double => DatumType::F64,
        Float16 => DatumType::F16,
        Int8 => DatumType::I8,
        Uint8 => DatumType::U8,
        Int16 => DatumType::I16,
        Uint16 => DatumType::U16,
        Int32 => DatumType::I32,
        Uint32 => DatumType::U32,
        Int64 => DatumType::I64,
        Uint64 => DatumType::U64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::OnnxFile;
    use prost::Message;
    use tract_onnx::pb::{AttributeProto, NodeProto};

    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    }

    fn tensor(name: &str, dt: DataType, dims: Vec<i64>, raw_data: Vec<u8>) -> TensorProto {
        TensorProto { name: name.into(), dims, data_type: dt as i32, raw_data, ..Default::default() }
    }

    /// `proto` written to a temporary file and read back: as `OnnxFile::read` leaves it, and with
    /// every initializer filled back in.
    fn write_and_read(proto: &ModelProto, name: &str) -> (crate::error::Result<OnnxFile>, crate::error::Result<ModelProto>) {
        let dir = std::env::temp_dir().join(format!("vitgpt2-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, proto.encode_to_vec()).unwrap();
        let read = OnnxFile::read(&path);
        let filled = OnnxFile::read(&path).and_then(|mut f| f.fill_all().map(|()| f.proto));
        std::fs::remove_dir_all(&dir).ok();
        (read, filled)
    }

    /// Long fields stay in the file only where they are read back: top-level weights into
    /// tensors equal to tract's own `load_tensor`, everything else filled in at once — a Constant
    /// node's tensor, a long attribute string, a subgraph's initializer — and a genuine 32-byte
    /// field that begins like a marker is left alone. Filled back, the protobuf is the file's.
    #[test]
    fn long_fields_are_read_back_where_they_lie() {
        let n = DEFER_MIN + 4 * 321;
        let weight = tensor("w", DataType::Float, vec![(n / 4) as i64], bytes(n, 1));
        let small = tensor("b", DataType::Int8, vec![300], bytes(300, 2));
        let mut lookalike = marker(0, 0, n as u64).to_vec();
        lookalike[8] ^= 1;
        let fake = tensor("fake", DataType::Uint8, vec![32], lookalike);
        let odd_shape = tensor("odd", DataType::Int8, vec![2, (n / 2) as i64], bytes(n, 3));
        let konst = NodeProto {
            op_type: "Constant".into(),
            output: vec!["c".into()],
            attribute: vec![AttributeProto { name: "value".into(), t: Some(tensor("c", DataType::Uint8, vec![n as i64], bytes(n, 4))), ..Default::default() }],
            ..Default::default()
        };
        let sub = GraphProto { name: "branch".into(), initializer: vec![tensor("s", DataType::Int8, vec![n as i64], bytes(n, 5))], ..Default::default() };
        let with_sub = NodeProto {
            op_type: "If".into(),
            attribute: vec![
                AttributeProto { name: "then_branch".into(), g: Some(sub), ..Default::default() },
                AttributeProto { name: "note".into(), s: bytes(n, 6), ..Default::default() },
            ],
            ..Default::default()
        };
        let graph = GraphProto { name: "g".into(), node: vec![konst, with_sub], initializer: vec![weight.clone(), small.clone(), fake.clone(), odd_shape], ..Default::default() };
        let proto = ModelProto { ir_version: 8, graph: Some(graph), ..Default::default() };
        let (read, again) = write_and_read(&proto, "raw-data");
        let mut file = read.expect("reads");
        if !cfg!(unix) {
            return assert!(file.raw.is_none() && file.proto == proto);
        }
        let raw = file.raw.take().expect("deferred on Unix");
        let g = file.proto.graph.as_mut().unwrap();
        // Nested fields are back already; only the long top-level weights are markers.
        let orig = proto.graph.as_ref().unwrap();
        assert_eq!(g.node, orig.node);
        assert_eq!(g.initializer[1], small);
        assert_eq!(g.initializer[2], fake);
        assert_eq!(g.initializer[0].raw_data.len(), MARKER_LEN);
        let provider = tract_onnx::data_resolver::MmapDataResolver;
        let expected = tract_onnx::tensor::load_tensor(&provider, &weight, None).unwrap();
        let got = raw.read_tensor(&mut g.initializer[0]).unwrap().expect("read into a tensor");
        assert_eq!(got, expected);
        assert!(raw.read_tensor(&mut g.initializer[1]).unwrap().is_none(), "not deferred");
        assert!(raw.read_tensor(&mut g.initializer[2]).unwrap().is_none(), "a look-alike is no marker");
        // Dims that do not match the data: an error naming both, no tensor.
        g.initializer[3].dims = vec![3, (n / 2) as i64];
        let err = raw.read_tensor(&mut g.initializer[3]).unwrap_err().to_string();
        assert!(err.contains(&format!("{n} bytes")) && err.contains("shape [3,"), "{err}");
        assert!(again.as_ref().is_ok_and(|p| *p == proto), "filled back differently: {:?}", again.err());
    }

    /// Fields longer than the 1 MiB pieces one after the other, short ones between them (each
    /// skip seeks, and the short field after it must decode from the right place): every weight
    /// read back from its own offset as tract's `load_tensor` reads the original; a bool weight
    /// (not plain bytes) gets its bytes back for tract's own reading.
    #[test]
    fn long_fields_across_pieces() {
        let sizes = [FileBuf::PIECE + 12_345, 3 * FileBuf::PIECE / 2, 2 * FileBuf::PIECE + 1];
        let mut initializer = vec![];
        for (i, &n) in sizes.iter().enumerate() {
            initializer.push(tensor(&format!("w{i}"), DataType::Uint8, vec![n as i64], bytes(n, i as u32)));
            initializer.push(tensor(&format!("b{i}"), DataType::Int8, vec![7], bytes(7, 9 + i as u32)));
        }
        initializer.push(tensor("mask", DataType::Bool, vec![5000], bytes(5000, 11).iter().map(|b| b & 1).collect()));
        let proto = ModelProto { ir_version: 8, graph: Some(GraphProto { name: "g".into(), initializer, ..Default::default() }), ..Default::default() };
        let (read, again) = write_and_read(&proto, "raw-pieces");
        assert!(again.as_ref().is_ok_and(|p| *p == proto), "filled back differently: {:?}", again.err());
        let Some(raw) = read.as_ref().expect("reads").raw.as_ref() else { return assert!(!cfg!(unix)) };
        let provider = tract_onnx::data_resolver::MmapDataResolver;
        let got = &read.as_ref().unwrap().proto.graph.as_ref().unwrap().initializer;
        for (orig, got) in proto.graph.as_ref().unwrap().initializer.iter().zip(got) {
            let expected = tract_onnx::tensor::load_tensor(&provider, orig, None).unwrap();
            let mut t = got.clone();
            match raw.read_tensor(&mut t).unwrap() {
                Some(tensor) => assert!(orig.raw_data.len() >= DEFER_MIN && tensor == expected, "{}", orig.name),
                None => assert!(t == *orig && (orig.raw_data.len() < DEFER_MIN || orig.name == "mask"), "{}", orig.name),
            }
        }
    }
}

