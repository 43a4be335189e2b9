//! The caption tokenizer: a Hugging Face byte-level BPE, from `tokenizer.json` or from
//! `vocab.json` + `merges.txt` (as asi/gpt-fr-cased-small ships it).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::assets::SpecialTokens;
use crate::bundle::contract;
use crate::error::{write_atomic, write_json, Error, Result};

/// GPT-2 French special tokens: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3.
pub const DEFAULT_SPECIAL_TOKENS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];

pub struct CaptionTokenizer {
    inner: Tokenizer,
    special_ids: HashSet<u32>,
    /// transformers' `clean_up_tokenization_spaces` (" ." -> "." and friends).
    clean_up_spaces: bool,
    source: PathBuf,
}

impl CaptionTokenizer {
    /// Loads `tokenizer.json` from `dir`, or else `vocab.json` + `merges.txt`; the special tokens
    /// are the tokenizer's own (`tokenizer_config.json`'s bos/eos/pad/unk, else the French GPT-2's
    /// `<s>`, `<pad>`, `</s>`, `<unk>`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (mut inner, source) = if json.is_file() {
            let t = Tokenizer::from_file(&json).map_err(|e| Error::bundle(&json, format!("not a valid tokenizer.json: {e}")))?;
            (t, json)
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for p in [&vocab, &merges] {
                if !p.is_file() {
                    return Err(Error::bundle(
                        dir,
                        format!("no tokenizer: put tokenizer.json, or vocab.json + merges.txt, in the bundle ({} is missing)", p.display()),
                    ));
                }
            }
            (from_vocab_merges(&vocab, &merges)?, vocab)
        };
        let tokenizer_config = read_tokenizer_config(dir)?;
        // Make sure the special tokens are marked special, whichever file they came from.
        let names = special_token_names(&tokenizer_config);
        let added: Vec<AddedToken> = names
            .iter()
            .filter(|n| inner.token_to_id(n).is_some())
            .map(|n| AddedToken::from(n.clone(), true))
            .collect();
        let _ = inner.add_special_tokens(added);
        // Only the tokenizer's special tokens are skipped when decoding, as transformers'
        // `decode(ids, skip_special_tokens=True)`: a generation stop id that is an ordinary token
        // (e.g. a full stop listed in eos_token_id) keeps its text.
        let mut special_ids: HashSet<u32> = names.iter().filter_map(|n| inner.token_to_id(n)).collect();
        special_ids.extend(inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id));
        let clean_up_spaces = tokenizer_config
            .as_ref()
            .and_then(|c| c.get("clean_up_tokenization_spaces"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self { inner, special_ids, clean_up_spaces, source })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::bundle(&self.source, format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` with special tokens skipped, as `tokenizer.decode(ids, skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids.iter().copied().filter(|i| !self.special_ids.contains(i)).collect();
        let text = self
            .inner
            .decode(&kept, true)
            .map_err(|e| Error::bundle(&self.source, format!("cannot decode ids {kept:?}: {e}")))?;
        Ok(if self.clean_up_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// Writes the tokenizer files `dir` lacks, so that transformers (fast and slow tokenizers) and
    /// transformers.js all load the folder: `tokenizer.json`, `vocab.json` + `merges.txt` (from
    /// the BPE model), `tokenizer_config.json` and `special_tokens_map.json` naming `special`'s
    /// tokens. Files already there are kept. Returns the names written.
    pub fn complete_files(&self, dir: &Path, special: &SpecialTokens, model_max_length: usize) -> Result<Vec<String>> {
        let mut written = Vec::new();
        let missing = |name: &str| !dir.join(name).is_file();
        if missing(contract::TOKENIZER_JSON) {
            let p = dir.join(contract::TOKENIZER_JSON);
            self.inner.save(&p, true).map_err(|e| Error::bundle(&p, format!("cannot write: {e}")))?;
            written.push(contract::TOKENIZER_JSON.to_string());
        }
        if missing(contract::VOCAB_JSON) || missing(contract::MERGES_TXT) {
            let json = self.inner.to_string(false).map_err(|e| Error::serialize("the tokenizer", e))?;
            let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| Error::serialize("the tokenizer", e))?;
            let model = &v["model"];
            if model["type"] == "BPE" {
                write_json(&dir.join(contract::VOCAB_JSON), &model["vocab"])?;
                // merges are "a b" strings (tokenizers < 0.20) or [a, b] pairs.
                let mut text = String::from("#version: 0.2\n");
                for m in model["merges"].as_array().into_iter().flatten() {
                    match (m.as_str(), m.as_array()) {
                        (Some(s), _) => text.push_str(s),
                        (None, Some(pair)) => text.push_str(&pair.iter().filter_map(|p| p.as_str()).collect::<Vec<_>>().join(" ")),
                        _ => continue,
                    }
                    text.push('\n');
                }
                write_atomic(&dir.join(contract::MERGES_TXT), text.as_bytes())?;
                written.extend([contract::VOCAB_JSON.to_string(), contract::MERGES_TXT.to_string()]);
            }
        }
        let name = |id: u32| self.inner.id_to_token(id);
        let names = serde_json::json!({
            "bos_token": name(special.bos.unwrap_or(special.decoder_start)),
            "eos_token": name(special.eos()),
            "pad_token": name(special.pad),
            "unk_token": self.inner.token_to_id("<unk>").and_then(name),
        });
        if missing(contract::TOKENIZER_CONFIG) {
            let mut cfg = names.clone();
            cfg["tokenizer_class"] = "GPT2Tokenizer".into();
            cfg["add_prefix_space"] = false.into();
            cfg["clean_up_tokenization_spaces"] = self.clean_up_spaces.into();
            cfg["model_max_length"] = model_max_length.into();
            write_json(&dir.join(contract::TOKENIZER_CONFIG), &cfg)?;
            written.push(contract::TOKENIZER_CONFIG.to_string());
        }
        if missing(contract::SPECIAL_TOKENS_MAP) {
            write_json(&dir.join(contract::SPECIAL_TOKENS_MAP), &names)?;
            written.push(contract::SPECIAL_TOKENS_MAP.to_string());
        }
        Ok(written)
    }

    /// The underlying Hugging Face tokenizer (for training pipelines).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let (v, m) = (vocab.to_string_lossy().to_string(), merges.to_string_lossy().to_string());
    let bpe = BPE::from_file(&v, &m)
        .build()
        .map_err(|e| Error::bundle(vocab, format!("cannot load BPE from vocab.json + merges.txt: {e}")))?;
    let mut t = Tokenizer::new(bpe);
    // GPT-2's tokenizer: byte-level, no prefix space.
    t.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(t)
}

fn read_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join("tokenizer_config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::bundle(&p, format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::bundle(&p, format!("not valid JSON: {e}")))
}

/// Special token names from tokenizer_config.json (bos/eos/pad/unk entries are strings or
/// `{"content": ...}` objects), else the French GPT-2 defaults.
fn special_token_names(cfg: &Option<serde_json::Value>) -> Vec<String> {
    let mut names: Vec<String> = DEFAULT_SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    if let Some(cfg) = cfg {
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let name = match cfg.get(key) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                _ => None,
            };
            if let Some(n) = name {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
    }
    names
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
