//! vitgpt2: French image captioning (ViT-GPT2) for edge devices.
//!
//! On the device, an int8 ViT-GPT2 bundle runs in tract ([`runtime`]) to caption camera frames
//! ([`node`]); on the host, the model is trained and exported with candle (`model`, `train`,
//! `export`, cargo feature `host`). Every path from an image to a caption goes through one
//! [`Captioner`]: a model's [`assets`] plus an [`engine`]. README, "How it is built", has the map.

/// `FromStr` for an option enum whose values are words (`--precision int8`, `decay = "cosine"`):
/// the binaries' flags and the config files parse them; an unknown word is an error listing
/// the accepted ones. Also `word()`, the inverse.
macro_rules! word_enum {
    ($t:ty { $($v:ident = $w:literal),+ $(,)? }) => {
        impl std::str::FromStr for $t {
            type Err = crate::error::Error;
            /// Errors: [`crate::error::Error::Invalid`], "`word`: use a, b or c".
            fn from_str(s: &str) -> crate::error::Result<Self> {
                match s {
                    $($w => Ok(Self::$v),)+
                    other => {
                        let words: Vec<&str> = vec![$($w),+];
                        Err(crate::error::Error::Invalid(format!("`{other}`: use {}", crate::word_list(&words))))
                    }
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.word())
            }
        }
        impl $t {
            /// The word that names this value on a command line or in a config file.
            pub fn word(&self) -> &'static str {
                match self {
                    $(Self::$v => $w,)+
                }
            }
        }
    };
}

/// `a`, `a or b`, `a, b or c`.
fn word_list(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

pub mod assets;
pub mod bench;
pub mod bundle;
pub mod captioner;
pub mod commands;
pub mod config;
pub mod engine;
pub mod error;
#[cfg(feature = "host")]
pub mod export;
pub mod generate;
#[cfg(feature = "host")]
pub mod model;
pub mod node;
pub mod preprocess;
#[cfg(feature = "host")]
pub mod rng;
pub mod runtime;
pub mod tokenizer;
#[cfg(feature = "host")]
pub mod train;

pub use captioner::{Caption, Captioner};
pub use error::{Error, Result};
pub use generate::GenerationOverrides;
