//! Training on the host (`vitgpt2-host train`, `synth`, `evaluate`, `train-tokenizer`):
//! caption data sets, a synthetic French set, BPE training, AdamW with exact resume, caption
//! metrics and plots. Plain code in the spirit of nanoGPT's train.py.

pub mod commands;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod synth;
pub mod tokenizer;
pub mod trainer;
