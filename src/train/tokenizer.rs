//! Training a byte-level BPE on captions (Hugging Face `tokenizers`, the crate's version in
//! Cargo.toml), with the French GPT-2 special tokens `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3.
//! The result is a `tokenizer.json` that [`crate::tokenizer::CaptionTokenizer`] loads.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer, TokenizerBuilder};

use crate::error::{Error, Result};
use crate::tokenizer::DEFAULT_SPECIAL_TOKENS;

/// Trains a byte-level BPE of `vocab_size` ids (special tokens and the 256 byte symbols
/// included) on `captions` and writes `dir/tokenizer.json` and `dir/tokenizer_config.json`.
pub fn train_bpe(captions: &[String], vocab_size: usize, dir: &Path) -> Result<()> {
    if vocab_size < 300 {
        return Err(Error::setting("--vocab-size", format!("{vocab_size} is too small: a byte-level BPE needs 4 special + 256 byte tokens; use 300 or more")));
    }
    let specials: Vec<AddedToken> = DEFAULT_SPECIAL_TOKENS.iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        // As GPT-2 French: byte-level, no prefix space.
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevelDecoder::default().into()))
        .build()
        .map_err(|e| Error::setting("tokenizer", e))?;
    tok.train(&mut trainer, captions.iter()).map_err(|e| Error::setting("tokenizer", format!("BPE training failed: {e}")))?;
    let tok: Tokenizer = tok.into();
    for (i, t) in DEFAULT_SPECIAL_TOKENS.iter().enumerate() {
        if tok.token_to_id(t) != Some(i as u32) {
            return Err(Error::setting("tokenizer", format!("special token {t} did not get id {i}")));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::setting("--out", format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).map_err(|e| Error::setting("--out", format!("cannot write {}: {e}", path.display())))?;
    let cfg = serde_json::json!({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1024,
    });
    crate::error::write_json(&dir.join("tokenizer_config.json"), &cfg)?;
    Ok(())
}
