//! The bundle contract: every file name and ONNX tensor name that the exporter writes and the
//! runtime and bench read. Both sides use these, so a rename cannot split writer and reader.
//!
//! Names of Optimum's `image-to-text-with-past` layout are Optimum's own (and transformers.js's);
//! the fast layout's are this project's (see README, "The model bundle").

/// `VisionEncoderDecoderConfig`.
pub const CONFIG: &str = "config.json";
/// Decoding settings (optional in a bundle: `config.json` and transformers' defaults fill in).
pub const GENERATION_CONFIG: &str = "generation_config.json";
/// `ViTImageProcessor` settings.
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
/// A fast (Rust `tokenizers`) tokenizer.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// A slow GPT-2 tokenizer: `vocab.json` + `merges.txt`.
pub const VOCAB_JSON: &str = "vocab.json";
pub const MERGES_TXT: &str = "merges.txt";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
pub const ADDED_TOKENS: &str = "added_tokens.json";
/// Written by `vitgpt2-host export`: sizes, sha256, provenance, scores.
pub const MANIFEST: &str = "manifest.json";
/// The folder transformers.js bundles keep their graphs in (graphs are also looked up at the root).
pub const ONNX_DIR: &str = "onnx";

/// Tokenizer files a checkpoint or bundle may carry (all copied along when present).
pub const TOKENIZER_FILES: [&str; 6] = [TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS];

/// Everything besides weights and `config.json` that a checkpoint hands to a bundle or to the
/// next checkpoint: the tokenizer files, the image processor's and the generation settings.
pub const ASSET_FILES: [&str; 8] =
    [TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS, GENERATION_CONFIG, PREPROCESSOR_CONFIG];

/// Graph files by their stem; the file is `{stem}{suffix}.onnx`, the suffix naming the weight
/// form (`""` fp32, `"_quantized"` Optimum int8, `"_int8"` the fast layout's int8).
pub mod graph {
    /// Optimum: pixel_values → last_hidden_state.
    pub const ENCODER_MODEL: &str = "encoder_model";
    /// Optimum: the first decoder step (no past).
    pub const DECODER_MODEL: &str = "decoder_model";
    /// Optimum: later decoder steps (self-attention past in, present out).
    pub const DECODER_WITH_PAST: &str = "decoder_with_past_model";
    /// Optimum's default export: both decoders in one graph behind an `If` on `use_cache_branch`.
    pub const DECODER_MERGED: &str = "decoder_model_merged";
    /// Fast layout: the encoder that also emits every layer's cross-attention keys/values.
    pub const ENCODER_FAST: &str = "encoder_fast";
    /// Fast layout: one decoder step over the cached self- and cross-attention keys/values.
    pub const DECODER_STEP: &str = "decoder_step";

    /// The Optimum layout's three graphs, in load order.
    pub const OPTIMUM: [&str; 3] = [ENCODER_MODEL, DECODER_MODEL, DECODER_WITH_PAST];
    /// The fast layout's two graphs, in load order.
    pub const FAST: [&str; 2] = [ENCODER_FAST, DECODER_STEP];

    /// Weight-form suffixes: fp32 graphs have none; Optimum's int8 graphs (transformers.js's
    /// `q8`) end in `_quantized`, the fast layout's in `_int8`.
    pub const FP32: &str = "";
    pub const OPTIMUM_INT8: &str = "_quantized";
    pub const FAST_INT8: &str = "_int8";

    /// `{stem}{suffix}.onnx`.
    pub fn file(stem: &str, suffix: &str) -> String {
        format!("{stem}{suffix}.onnx")
    }
}

/// ONNX input and output names.
pub mod tensor {
    /// `[1, 3, H, W]` f32, the image processor's output.
    pub const PIXEL_VALUES: &str = "pixel_values";
    /// `[1, S, D_enc]` f32: the ViT's output (before `enc_to_dec_proj`).
    pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
    /// `[B, T]` i64 token ids (T = 1 in the fast layout and with a past).
    pub const INPUT_IDS: &str = "input_ids";
    /// Fast layout: `[B, 1]` i64 position of the token.
    pub const POSITION_IDS: &str = "position_ids";
    /// Optimum: `[B, S, D_enc]` f32, the encoder output repeated per hypothesis.
    pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
    /// Optimum merged decoder: `[1]` bool, whether the past inputs are used.
    pub const USE_CACHE_BRANCH: &str = "use_cache_branch";
    /// `[B, T, V]` (Optimum) or `[B, V]` (fast layout) f32.
    pub const LOGITS: &str = "logits";

    /// A key/value pair's two halves, in the order every layout lists them.
    pub const KV: [&str; 2] = ["key", "value"];

    /// Optimum's self-attention cache inputs: `past_key_values.{layer}.{key|value}`, `[B, H, P, hd]`.
    pub fn past_key_values(layer: usize, kv: &str) -> String {
        format!("past_key_values.{layer}.{kv}")
    }
    /// Both layouts' self-attention cache outputs: `present.{layer}.{key|value}`, `[B, H, P+1, hd]`.
    pub fn present(layer: usize, kv: &str) -> String {
        format!("present.{layer}.{kv}")
    }
    /// Fast layout's self-attention cache inputs: `past.{layer}.{key|value}`, `[B, H, P, hd]`.
    pub fn past(layer: usize, kv: &str) -> String {
        format!("past.{layer}.{kv}")
    }
    /// Fast layout's cross-attention keys/values: encoder outputs and decoder inputs,
    /// `cross.{layer}.{key|value}`, `[1, H, S, hd]`.
    pub fn cross(layer: usize, kv: &str) -> String {
        format!("cross.{layer}.{kv}")
    }

    /// `f(layer, kv)` for every layer, key before value: the order of the cache vectors.
    pub fn per_layer(n_layer: usize, f: fn(usize, &str) -> String) -> Vec<String> {
        (0..n_layer).flat_map(|i| KV.map(|kv| f(i, kv))).collect()
    }
}

/// ONNX metadata (`metadata_props`) the exporter writes and the runtime checks.
pub mod metadata {
    /// On decoder graphs whose cross-attention is causal over the image tokens (the query at
    /// position t sees encoder positions 0..=t), as `config.json`'s
    /// `decoder.cross_attention_causal` asks: the runtime refuses a decoder without it for such a
    /// model, which would run the ordinary cross-attention and caption differently.
    pub const CROSS_ATTENTION: &str = "vitgpt2.cross_attention";
    /// [`CROSS_ATTENTION`]'s value.
    pub const CAUSAL_OVER_IMAGE_TOKENS: &str = "causal_over_image_tokens";
}
