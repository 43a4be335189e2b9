//! Hugging Face `config.json` of a VisionEncoderDecoder model (ViT encoder + GPT-2 decoder),
//! with transformers' defaults for every field a checkpoint may leave out.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VitConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
}

impl Default for VitConfig {
    fn default() -> Self {
        // google/vit-base-patch16-224-in21k
        Self {
            model_type: "vit".into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

impl VitConfig {
    /// Patches plus the CLS token.
    pub fn seq_len(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side + 1
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Gpt2Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: Option<usize>,
    pub activation_function: String,
    pub resid_pdrop: f64,
    pub embd_pdrop: f64,
    pub attn_pdrop: f64,
    pub layer_norm_epsilon: f64,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub reorder_and_upcast_attn: bool,
    pub add_cross_attention: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Standard deviation of GPT-2's weight initialisation (the host model draws the new
    /// cross-attention weights with it).
    pub initializer_range: f64,
    /// The original ViT-GPT2's cross-attention (flax-community/vit-gpt2): causal over the image
    /// tokens, so the decoder position t attends to encoder positions 0..=t only (position 0
    /// sees only CLS; positions ≥ image tokens − 1 see all). Its `encoder_attn` is GPT-2's
    /// attention module with the default causal mask. Written by the Flax importer for the
    /// original's checkpoints; off (and not written) for every other checkpoint. A vitgpt2
    /// setting: transformers ignores it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cross_attention_causal: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for Gpt2Config {
    fn default() -> Self {
        // asi/gpt-fr-cased-small with cross-attention added
        Self {
            model_type: "gpt2".into(),
            vocab_size: 50_000,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            add_cross_attention: true,
            tie_word_embeddings: true,
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            pad_token_id: Some(1),
            initializer_range: 0.02,
            cross_attention_causal: false,
        }
    }
}

impl Gpt2Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// `VisionEncoderDecoderConfig`: the top-level `config.json` of the model and of the bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    #[serde(default = "ved_type")]
    pub model_type: String,
    pub encoder: VitConfig,
    pub decoder: Gpt2Config,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

fn ved_type() -> String {
    "vision-encoder-decoder".into()
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::bundle(path, format!("cannot read: {e}")))?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| {
            Error::bundle(path, format!("not a VisionEncoderDecoder config.json ({e}); expected `encoder` (ViT) and `decoder` (GPT-2) sections"))
        })?;
        cfg.validate().map_err(|msg| Error::bundle(path, msg))?;
        Ok(cfg)
    }

    /// The checks every model config passes (a VisionEncoderDecoder of ViT and GPT-2 with
    /// cross-attention, head counts dividing widths). Errors: [`Error::Invalid`] naming the field;
    /// callers add the file or setting.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "vision-encoder-decoder" {
            return Err(Error::Invalid(format!("model_type is `{}`, expected `vision-encoder-decoder`", self.model_type)));
        }
        if self.encoder.model_type != "vit" {
            return Err(Error::Invalid(format!("encoder.model_type is `{}`: only a ViT encoder is supported", self.encoder.model_type)));
        }
        if self.decoder.model_type != "gpt2" {
            return Err(Error::Invalid(format!("decoder.model_type is `{}`: the decoder must be GPT-2", self.decoder.model_type)));
        }
        if !self.decoder.add_cross_attention {
            return Err(Error::Invalid("decoder.add_cross_attention is false: the GPT-2 decoder needs cross-attention to see the image".into()));
        }
        let d = &self.decoder;
        if d.n_head == 0 || !d.n_embd.is_multiple_of(d.n_head) {
            return Err(Error::Invalid(format!("decoder.n_embd ({}) is not a multiple of decoder.n_head ({})", d.n_embd, d.n_head)));
        }
        let e = &self.encoder;
        if e.num_attention_heads == 0 || !e.hidden_size.is_multiple_of(e.num_attention_heads) {
            return Err(Error::Invalid(format!(
                "encoder.hidden_size ({}) is not a multiple of encoder.num_attention_heads ({})",
                e.hidden_size, e.num_attention_heads
            )));
        }
        if e.patch_size == 0 || !e.image_size.is_multiple_of(e.patch_size) {
            return Err(Error::Invalid(format!("encoder.image_size ({}) is not a multiple of encoder.patch_size ({})", e.image_size, e.patch_size)));
        }
        Ok(())
    }
}
