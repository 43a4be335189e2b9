//! Loading and saving Hugging Face checkpoints.
//!
//! - A `VisionEncoderDecoderModel` directory: config.json + model.safetensors (or
//!   pytorch_model.bin), or a Flax one (flax_model.msgpack: transformers' or the original
//!   ViT-GPT2's, see [`super::flax`] and [`super::format`]). Every tensor must be there (the
//!   unused ViT pooler excepted) and no other.
//! - The original recipe: a pretrained ViT directory plus a pretrained GPT-2 directory (as
//!   `VisionEncoderDecoderModel.from_encoder_decoder_pretrained`). The GPT-2 LM head stays tied
//!   to its embedding; only the cross-attention layers (and `enc_to_dec_proj` when the widths
//!   differ) start from GPT-2's random initialisation.
//! - Saving writes config.json + model.safetensors that transformers loads as is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde_json::Value;

use super::flax::{self, FlaxTree};
use super::format::{self, CheckpointFormat};
pub use super::report::{group_names, group_names_by, LoadReport};
use super::ved::VisionEncoderDecoder;
use crate::rng::SplitMix;
use crate::config::{Gpt2Config, ModelConfig, VitConfig};
use crate::error::{Error, Result};
use format::read_json;

/// A VarBuilder backend that serves tensors from a checkpoint, initialises the ones it lacks,
/// makes every one a trainable `Var`, and records which names the model asked for.
struct Tracker {
    /// Tensors not yet taken: each moves into its `Var` when asked for, so that loading does
    /// not hold two copies of the model.
    source: Mutex<HashMap<String, Tensor>>,
    /// Every name the files hold.
    available: BTreeSet<String>,
    requested: Mutex<BTreeMap<String, Var>>,
    rng: Mutex<SplitMix>,
    /// The Flax tree the tensors came from, to name them as stored in messages.
    flax: Option<FlaxTree>,
}

/// `name`, and where a Flax checkpoint stores it.
fn stored(flax: Option<FlaxTree>, name: &str) -> String {
    match flax {
        Some(tree) => format!("{name} (flax: {})", flax::stored_name(tree, name)),
        None => name.to_string(),
    }
}

struct TrackerBackend(Arc<Tracker>);

impl Tracker {
    fn init(&self, shape: &Shape, init: Init, dev: &Device) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().map_err(|_| candle_core::Error::Msg("initialiser lock poisoned".into()))?;
        let data: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| (mean + stdev * rng.normal()) as f32).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| (lo + (up - lo) * rng.uniform_nonzero()) as f32).collect(),
            other => return other.var(shape.clone(), DType::F32, dev).map(|v| v.as_tensor().clone()),
        };
        Tensor::from_vec(data, shape.clone(), dev)
    }
}

impl SimpleBackend for TrackerBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = &self.0;
        let taken = t.source.lock().map_err(|_| candle_core::Error::Msg("checkpoint lock poisoned".into()))?.remove(name);
        let tensor = match taken {
            Some(w) => {
                if w.shape() != &s {
                    candle_core::bail!(
                        "tensor {} has shape {:?} in the checkpoint but the config gives {:?}",
                        stored(t.flax, name),
                        w.dims(),
                        s.dims()
                    );
                }
                w.to_dtype(dtype)?.to_device(dev)?
            }
            None => t.init(&s, h, dev)?.to_dtype(dtype)?,
        };
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        t.requested
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter lock poisoned".into()))?
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor {name} requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.available.contains(name)
    }
}

/// Tensors read from weight files, renamed to the VisionEncoderDecoder's names.
struct Source {
    files: Vec<PathBuf>,
    tensors: HashMap<String, Tensor>,
    ignored: Vec<String>,
    dropped: Vec<String>,
    /// A stored LM head to check against the token embedding (it must be tied).
    lm_head: Option<(PathBuf, Tensor)>,
    flax: Option<FlaxTree>,
}

/// The PyTorch weight file of a pretrained part's directory: model.safetensors, else
/// pytorch_model.bin.
fn weight_file(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(dir, "not a directory; pass a Hugging Face checkpoint folder (config.json + model.safetensors or pytorch_model.bin)"));
    }
    format::pytorch_weights(dir)?
        .ok_or_else(|| Error::checkpoint(dir, "no model.safetensors or pytorch_model.bin in the checkpoint folder"))
}

/// All tensors of a weight file (on the CPU), by their names in the file.
fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let is_bin = path.extension().is_some_and(|e| e == "bin");
    if is_bin {
        // torch.save zip: read lazily so that buffers of unsupported dtypes (bool masks) are skipped.
        let pth = candle_core::pickle::PthTensors::new(path, None)
            .map_err(|e| Error::checkpoint(path, format!("not a readable PyTorch checkpoint ({e}); re-save it with torch.save or as safetensors")))?;
        let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if is_buffer(&n) {
                out.push((n, Tensor::zeros((), DType::F32, &Device::Cpu).map_err(|e| Error::checkpoint(path, e))?));
                continue;
            }
            match pth.get(&n) {
                Ok(Some(t)) => out.push((n, t)),
                Ok(None) => {}
                Err(e) => return Err(Error::checkpoint(path, format!("cannot read tensor {n}: {e}"))),
            }
        }
        Ok(out)
    } else {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e})")))?;
        let mut v: Vec<(String, Tensor)> = map.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
}

/// GPT-2's causal-mask buffers, which checkpoints saved by transformers < 4.3x carry
/// (`attn.bias`, `attn.masked_bias`, `crossattention.bias`, …): not parameters.
fn is_buffer(name: &str) -> bool {
    let parts: Vec<&str> = name.rsplitn(3, '.').collect();
    parts.len() >= 2 && matches!(parts[0], "bias" | "masked_bias") && matches!(parts[1], "attn" | "crossattention")
}

impl Source {
    fn new() -> Self {
        Source { files: Vec::new(), tensors: HashMap::new(), ignored: Vec::new(), dropped: Vec::new(), lm_head: None, flax: None }
    }

    /// Adds a Flax checkpoint's tensors (`n_embd`: the decoder width, see [`flax::read`]).
    fn add_flax(&mut self, path: &Path, tree: FlaxTree, n_embd: usize) -> Result<()> {
        let w = flax::read(path, tree, n_embd)?;
        self.tensors.extend(w.tensors);
        if let Some(head) = w.lm_head {
            self.ignored.push(flax::stored_name(tree, "decoder.lm_head.weight"));
            self.lm_head = Some((path.to_path_buf(), head));
        }
        self.dropped.extend(w.dropped);
        self.files.push(path.to_path_buf());
        self.flax = Some(tree);
        Ok(())
    }

    /// Adds the tensors of `path` under the model's names (`rename`); names the model does not
    /// ask for are reported as unexpected when it is built.
    fn add(&mut self, path: &Path, rename: impl Fn(&str) -> String, lm_head_names: &[&str]) -> Result<()> {
        for (name, t) in read_weights(path)? {
            if is_buffer(&name) {
                self.ignored.push(name);
                continue;
            }
            if lm_head_names.contains(&name.as_str()) {
                self.ignored.push(name);
                self.lm_head = Some((path.to_path_buf(), t));
                continue;
            }
            self.tensors.insert(rename(&name), t);
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }
}

/// `base` with `over`'s fields written over it (objects merged recursively).
fn overlay(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => overlay(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Builds the model over `source`; `may_initialise` says which missing names are expected.
fn build(
    source: Source,
    cfg: &ModelConfig,
    with_pooler: bool,
    seed: u64,
    may_initialise: impl Fn(&str) -> bool,
    blame: &Path,
    device: &Device,
) -> Result<(VisionEncoderDecoder, LoadReport)> {
    let Source { files, tensors, ignored, dropped, lm_head, flax } = source;
    let available: BTreeSet<String> = tensors.keys().cloned().collect();
    let tracker = Arc::new(Tracker {
        source: Mutex::new(tensors),
        available,
        requested: Mutex::new(BTreeMap::new()),
        rng: Mutex::new(SplitMix::new(seed)),
        flax,
    });
    let vb = VarBuilder::from_backend(Box::new(TrackerBackend(tracker.clone())), DType::F32, device.clone());
    let mut model = VisionEncoderDecoder::load(vb, cfg, with_pooler).map_err(|e| Error::checkpoint(blame, without_backtrace(e)))?;
    let params = std::mem::take(&mut *tracker.requested.lock().map_err(|_| Error::checkpoint(blame, "parameter lock poisoned"))?);

    let mut loaded = Vec::new();
    let mut initialised = Vec::new();
    for name in params.keys() {
        if tracker.available.contains(name) {
            loaded.push(name.clone());
        } else {
            initialised.push(name.clone());
        }
    }
    let missing: Vec<&String> = initialised.iter().filter(|n| !may_initialise(n)).collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            blame,
            format!(
                "{} tensor(s) missing: {} — the weights do not match config.json (wrong checkpoint or config?)",
                missing.len(),
                group_names(&missing.iter().map(|s| s.to_string()).collect::<Vec<_>>()).iter().map(|g| stored(flax, g)).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let unexpected: Vec<String> = tracker.available.iter().filter(|n| !params.contains_key(*n)).cloned().collect();
    if !unexpected.is_empty() {
        return Err(Error::checkpoint(
            blame,
            format!(
                "{} unexpected tensor(s): {} — not part of a ViT-GPT2 with this config.json (a different architecture or a task head?)",
                unexpected.len(),
                group_names(&unexpected).iter().map(|g| stored(flax, g)).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if let Some((path, head)) = lm_head {
        let wte = params.get("decoder.transformer.wte.weight").map(|v| v.as_tensor().clone());
        let same = match wte {
            Some(wte) => head.dims() == wte.dims() && {
                let diff = (head.to_dtype(DType::F32).and_then(|h| h.to_device(device)).and_then(|h| h - &wte))
                    .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                    .map_err(|e| Error::checkpoint(&path, e))?;
                diff == 0.0
            },
            None => false,
        };
        if !same {
            return Err(Error::checkpoint(path, "the stored LM head differs from the token embedding: only a tied LM head (lm_head = wte) is supported"));
        }
    }
    model.params = params;
    Ok((model, LoadReport { files, loaded, initialised, ignored, dropped }))
}

/// candle's message without the backtrace it attaches when RUST_BACKTRACE is set (the error is
/// one line about the checkpoint, not about candle's stack).
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

/// The typed config, written over the raw JSON so that fields this crate does not model survive.
fn config_json(raw: &Value, cfg: &ModelConfig) -> Result<Value> {
    let typed = serde_json::to_value(cfg).map_err(|e| Error::setting("config", e))?;
    let mut out = raw.clone();
    if !out.is_object() {
        out = Value::Object(Default::default());
    }
    overlay(&mut out, &typed);
    Ok(out)
}

impl VisionEncoderDecoder {
    /// Loads a checkpoint directory: transformers' `VisionEncoderDecoderModel` (PyTorch or Flax
    /// weights) or the original ViT-GPT2's Flax checkpoint, told apart by
    /// [`format::detect`]. The original's config.json becomes a `VisionEncoderDecoderConfig`
    /// with `decoder.cross_attention_causal` ([`format::original_config`]).
    pub fn from_checkpoint(dir: &Path, device: &Device) -> Result<(Self, LoadReport)> {
        let config_path = dir.join("config.json");
        if dir.is_dir() && !config_path.is_file() {
            return Err(Error::checkpoint(&config_path, "missing: a VisionEncoderDecoder checkpoint needs config.json"));
        }
        let fmt = format::detect(dir)?;
        let (cfg, raw) = match fmt {
            CheckpointFormat::Flax(_, FlaxTree::Original) => format::original_config(&config_path)?,
            _ => (ModelConfig::from_file(&config_path)?, read_json(&config_path)?),
        };
        Self::load_format(dir, &fmt, &cfg, raw, device)
    }

    /// As [`Self::from_checkpoint`], with `cfg` in place of the directory's config.json.
    pub fn from_checkpoint_with_config(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<(Self, LoadReport)> {
        let fmt = format::detect(dir)?;
        let config_path = dir.join("config.json");
        let raw = match fmt {
            CheckpointFormat::Flax(_, FlaxTree::Original) => format::original_config(&config_path)?.1,
            _ if config_path.is_file() => read_json(&config_path)?,
            _ => Value::Null,
        };
        Self::load_format(dir, &fmt, cfg, raw, device)
    }

    fn load_format(dir: &Path, fmt: &CheckpointFormat, cfg: &ModelConfig, raw: Value, device: &Device) -> Result<(Self, LoadReport)> {
        let weights = fmt.weights().to_path_buf();
        check_tied(cfg, &dir.join("config.json"))?;
        let mut source = Source::new();
        match fmt {
            CheckpointFormat::PyTorch(_) => source.add(&weights, |n| n.to_string(), &["decoder.lm_head.weight"])?,
            CheckpointFormat::Flax(_, tree) => source.add_flax(&weights, *tree, cfg.decoder.n_embd)?,
        }
        let with_pooler = source.tensors.contains_key("encoder.pooler.dense.weight");
        // The pooler is never used for captions; anything else missing is an error.
        let (mut model, report) = build(source, cfg, with_pooler, 0, |n| n.starts_with("encoder.pooler."), &weights, device)?;
        model.raw_config = config_json(&raw, cfg)?;
        Ok((model, report))
    }

    /// The original recipe: a pretrained ViT (`ViTModel` checkpoint) and a pretrained GPT-2
    /// (`GPT2LMHeadModel` or `GPT2Model` checkpoint), as transformers'
    /// `VisionEncoderDecoderModel.from_encoder_decoder_pretrained`. Cross-attention layers and
    /// `enc_to_dec_proj` start from GPT-2's initialisation, drawn from `seed`.
    pub fn from_pretrained_parts(vit_dir: &Path, gpt2_dir: &Path, seed: u64, device: &Device) -> Result<(Self, LoadReport)> {
        let vit_cfg_path = vit_dir.join("config.json");
        let gpt_cfg_path = gpt2_dir.join("config.json");
        let vit_weights = weight_file(vit_dir)?;
        let gpt_weights = weight_file(gpt2_dir)?;
        let vit_raw = read_json(&vit_cfg_path)?;
        let mut gpt_raw = read_json(&gpt_cfg_path)?;
        let encoder: VitConfig = serde_json::from_value(vit_raw.clone())
            .map_err(|e| Error::checkpoint(&vit_cfg_path, format!("not a ViT config ({e})")))?;
        if encoder.model_type != "vit" {
            return Err(Error::checkpoint(&vit_cfg_path, format!("model_type is `{}`; pass a ViT checkpoint as the encoder", encoder.model_type)));
        }
        // The decoder becomes a cross-attending decoder, as from_encoder_decoder_pretrained does.
        overlay(&mut gpt_raw, &serde_json::json!({"is_decoder": true, "add_cross_attention": true}));
        let decoder: Gpt2Config = serde_json::from_value(gpt_raw.clone())
            .map_err(|e| Error::checkpoint(&gpt_cfg_path, format!("not a GPT-2 config ({e})")))?;
        if decoder.model_type != "gpt2" {
            return Err(Error::checkpoint(&gpt_cfg_path, format!("model_type is `{}`; pass a GPT-2 checkpoint as the decoder", decoder.model_type)));
        }
        check_tied_gpt2(&decoder, &gpt_cfg_path)?;
        let (cfg, raw) = format::encoder_decoder_config(encoder, decoder, vit_raw, gpt_raw, &gpt_cfg_path)?;

        let mut source = Source::new();
        // ViTModel names; a ViTFor… checkpoint nests them under `vit.`.
        source.add(&vit_weights, |n| format!("encoder.{}", n.strip_prefix("vit.").unwrap_or(n)), &[])?;
        // GPT2LMHeadModel names are under `transformer.`; GPT2Model and OpenAI's files have none.
        source.add(&gpt_weights, |n| format!("decoder.transformer.{}", n.strip_prefix("transformer.").unwrap_or(n)), &["lm_head.weight"])?;
        let may_init = |n: &str| {
            n.starts_with("enc_to_dec_proj.")
                || n.starts_with("encoder.pooler.")
                || (n.starts_with("decoder.transformer.h.") && (n.contains(".crossattention.") || n.contains(".ln_cross_attn.")))
        };
        // Blame the GPT-2 file for missing decoder tensors, the ViT file otherwise.
        let (mut model, report) = build(source, &cfg, true, seed, may_init, gpt2_dir, device)
            .map_err(|e| match e {
                Error::Bundle { msg, .. } => Error::checkpoint(format!("{} + {}", vit_weights.display(), gpt_weights.display()), msg),
                other => other,
            })?;
        model.raw_config = config_json(&raw, &cfg)?;
        Ok((model, report))
    }

    /// A randomly initialised model for `cfg` (GPT-2's and ViT's initialisation, drawn from
    /// `seed`), to train from scratch.
    pub fn random_init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate().map_err(|m| Error::setting("model config", m))?;
        check_tied(cfg, Path::new("config.json"))?;
        let blame = Path::new("<random init>");
        let (mut model, _) = build(Source::new(), cfg, false, seed, |_| true, blame, device)?;
        model.add_pooler(seed)?;
        let raw = serde_json::json!({
            "architectures": ["VisionEncoderDecoderModel"],
            "model_type": "vision-encoder-decoder",
            "is_encoder_decoder": true,
            "encoder": {"architectures": ["ViTModel"]},
            "decoder": {"architectures": ["GPT2LMHeadModel"], "is_decoder": true},
        });
        model.raw_config = config_json(&raw, cfg)?;
        Ok(model)
    }

    /// Gives a model built without the ViT pooler one (weight N(0, 0.02) from its own stream of
    /// `seed`, bias 0, as transformers initialises a `ViTPooler`), so that its checkpoints load in
    /// transformers with no missing keys (`VisionEncoderDecoderModel` builds its ViT with the
    /// pooler and has no setting to leave it out). Captioning never uses it and it is not
    /// trained. Drawn after everything else, so the other weights of a seed do not change.
    fn add_pooler(&mut self, seed: u64) -> Result<()> {
        if self.params.contains_key("encoder.pooler.dense.weight") {
            return Ok(());
        }
        let d = self.config.encoder.hidden_size;
        let mut rng = SplitMix::new(seed ^ 0x706f_6f6c_6572);
        let w: Vec<f32> = (0..d * d).map(|_| (0.02 * rng.normal()) as f32).collect();
        let device = self.device().clone();
        let err = |e: candle_core::Error| Error::runtime("pooler initialisation", e);
        let weight = Var::from_tensor(&Tensor::from_vec(w, (d, d), &device).map_err(err)?).map_err(err)?;
        let bias = Var::from_tensor(&Tensor::zeros(d, DType::F32, &device).map_err(err)?).map_err(err)?;
        self.params.insert("encoder.pooler.dense.weight".into(), weight);
        self.params.insert("encoder.pooler.dense.bias".into(), bias);
        Ok(())
    }

    /// config.json as it will be saved.
    pub fn config_json(&self) -> Result<Value> {
        config_json(&self.raw_config, &self.config)
    }

    /// Writes config.json and model.safetensors (no LM head: it is the tied embedding, as
    /// transformers saves it) into `dir`, which is created if needed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::checkpoint(dir, format!("cannot create the output folder: {e}")))?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config_json()?).map_err(|e| Error::checkpoint(&cfg_path, e))?;
        std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::checkpoint(&cfg_path, format!("cannot write: {e}")))?;
        let path = dir.join("model.safetensors");
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| Error::checkpoint(&path, e))?;
        // transformers checks the format tag of safetensors files.
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(tensors, Some(metadata), &path)
            .map_err(|e| Error::checkpoint(&path, format!("cannot write: {e}")))?;
        Ok(())
    }

    /// Writes what `vitgpt2-host caption` needs besides the weights: the tokenizer files of
    /// the GPT-2 folder, the ViT folder's preprocessor_config.json and a generation_config.json
    /// with the model's special tokens (kept if `dir` already has one).
    pub fn write_assets(&self, dir: &Path, vit_dir: &Path, gpt2_dir: &Path) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        let copy = |from: PathBuf, written: &mut Vec<PathBuf>| -> Result<()> {
            if from.is_file() {
                let to = dir.join(from.file_name().unwrap_or_default());
                std::fs::copy(&from, &to).map_err(|e| Error::checkpoint(&to, format!("cannot copy from {}: {e}", from.display())))?;
                written.push(to);
            }
            Ok(())
        };
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"] {
            copy(gpt2_dir.join(name), &mut written)?;
        }
        copy(vit_dir.join("preprocessor_config.json"), &mut written)?;
        let gen_path = dir.join("generation_config.json");
        if !gen_path.is_file() {
            let c = &self.config;
            let gen = serde_json::json!({
                "decoder_start_token_id": c.decoder_start_token_id,
                "bos_token_id": c.decoder.bos_token_id,
                "eos_token_id": c.eos_token_id,
                "pad_token_id": c.pad_token_id,
            });
            let text = serde_json::to_string_pretty(&gen).map_err(|e| Error::checkpoint(&gen_path, e))?;
            std::fs::write(&gen_path, text + "\n").map_err(|e| Error::checkpoint(&gen_path, format!("cannot write: {e}")))?;
            written.push(gen_path);
        }
        Ok(written)
    }
}

fn check_tied(cfg: &ModelConfig, path: &Path) -> Result<()> {
    check_tied_gpt2(&cfg.decoder, path)
}

fn check_tied_gpt2(cfg: &Gpt2Config, path: &Path) -> Result<()> {
    if !cfg.tie_word_embeddings {
        return Err(Error::checkpoint(path, "decoder tie_word_embeddings is false: only GPT-2 with its LM head tied to the token embedding is supported"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_layer_indices() {
        let names: Vec<String> =
            ["a.h.0.w", "a.h.1.w", "a.h.2.w", "b", "c.3.x", "c.5.x"].iter().map(|s| s.to_string()).collect();
        assert_eq!(group_names(&names), vec!["a.h.{0..2}.w", "b", "c.{3,5}.x"]);
    }

    #[test]
    fn buffers_are_recognised() {
        assert!(is_buffer("transformer.h.0.attn.bias"));
        assert!(is_buffer("h.3.attn.masked_bias"));
        assert!(is_buffer("decoder.transformer.h.0.crossattention.bias"));
        assert!(!is_buffer("transformer.h.0.attn.c_attn.bias"));
        assert!(!is_buffer("transformer.h.0.crossattention.c_attn.bias"));
    }
}
