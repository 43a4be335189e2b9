//! vitgpt2: French image captioning (ViT-GPT2) for edge devices.
//!
//! On the device, an int8 ViT-GPT2 bundle runs in tract ([`runtime`]) to caption camera frames;
//! on the host, the model is trained and exported with candle.

pub mod bench;
pub mod bundle;
pub mod caption;
pub mod cli;
pub mod config;
pub mod error;
#[cfg(feature = "host")]
pub mod export;
pub mod generate;
#[cfg(feature = "host")]
pub mod model;
pub mod node;
pub mod preprocess;
pub mod runtime;
pub mod tokenizer;
#[cfg(feature = "host")]
pub mod train;

pub use caption::{Caption, Captioner, GenerationOverrides, LoadOptions};
pub use error::{Error, Result};
