//! The engine trait: what runs a model's graphs or weights. The device's tract layouts
//! ([`crate::runtime`]) and the host's candle model (`crate::model`) implement it; one
//! [`crate::captioner::Captioner`] drives any of them, and generation sees only a
//! [`DecoderSession`].

use std::path::PathBuf;

use ndarray::Array4;

use crate::error::Result;
use crate::generate::DecoderSession;

/// Encodes images and opens decoder sessions on them.
pub trait Engine: Send + Sync {
    /// Runs the encoder on `pixel_values` `[1, 3, H, W]` (the image processor's output).
    /// Errors: [`crate::Error::Runtime`] when the engine fails.
    fn encode(&self, pixel_values: Array4<f32>) -> Result<Box<dyn ImageEncoding + '_>>;

    /// One line saying what runs: engine, layout, graph files.
    fn describe(&self) -> String;

    /// The weight form that runs: `fp32`, `int8`, … (transformers.js's dtype names where they exist).
    fn dtype(&self) -> &str;

    /// The files whose bytes define the weights that run, in a fixed order (their sha256
    /// identifies the model in every published caption).
    fn weight_files(&self) -> Vec<PathBuf>;
}

/// One encoded image, ready for decoding.
pub trait ImageEncoding {
    /// A decoder session over `rows` hypotheses (1 for greedy, `num_beams` for beam search),
    /// all attending to this image.
    fn session(&self, rows: usize) -> Result<Box<dyn DecoderSession + '_>>;
}
