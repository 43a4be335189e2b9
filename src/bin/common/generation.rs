//! Generation flags, shared by both binaries (one definition, one conversion).

use clap::Args;
use vitgpt2::GenerationOverrides;

/// Generation flags; unset ones keep the model's generation_config.json.
#[derive(Debug, Clone, Default, Args)]
pub struct GenerationArgs {
    /// Beam width (1 = greedy search).
    #[arg(long)]
    pub num_beams: Option<usize>,
    /// Maximum decoder length, decoder start token included.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Minimum decoder length before </s> is allowed.
    #[arg(long)]
    pub min_length: Option<usize>,
    /// Forbid repeating any n-gram of this size (0 = off).
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Beam score = log-prob sum / length^length_penalty.
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// Beam search stopping rule: true, false (heuristic) or never.
    #[arg(long)]
    pub early_stopping: Option<String>,
}

impl From<&GenerationArgs> for GenerationOverrides {
    fn from(a: &GenerationArgs) -> Self {
        GenerationOverrides {
            num_beams: a.num_beams,
            max_length: a.max_length,
            min_length: a.min_length,
            no_repeat_ngram_size: a.no_repeat_ngram_size,
            length_penalty: a.length_penalty,
            early_stopping: a.early_stopping.clone(),
        }
    }
}
