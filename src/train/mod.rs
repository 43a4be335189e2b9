//! Training on the host (`vitgpt2-host train`, `synth`, `evaluate`, `train-tokenizer`):
//! caption data sets, a synthetic French set, BPE training, AdamW with exact resume, caption
//! metrics, evaluation through the product's captioner, and plots. Plain code in the spirit of
//! nanoGPT's train.py.

pub mod commands;
pub mod data;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod options;
pub mod plot;
pub mod progress;
pub mod run_dir;
pub mod setup;
pub mod synth;
pub mod tokenizer;
pub mod trainer;
