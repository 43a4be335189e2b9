//! What a training process sets up before it trains: the device, candle's thread pools, glibc's
//! allocator, and the model and processor of a preset.

use candle_core::Device;

use super::options::Preset;
use crate::config::{Gpt2Config, ModelConfig, VitConfig};
use crate::error::{Error, Result};
use crate::preprocess::{ImageSize, PreprocessConfig};

/// `cpu`, or `cuda` (the first GPU; needs a build with the `cuda` feature).
pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            #[cfg(feature = "cuda")]
            {
                Device::new_cuda(0).map_err(|e| Error::setting("--device", format!("no CUDA GPU: {e}")))
            }
            #[cfg(not(feature = "cuda"))]
            Err(Error::setting("--device", "cuda needs a build with `--features cuda`"))
        }
        other => Err(Error::setting("--device", format!("`{other}`: use cpu or cuda"))),
    }
}

/// Sizes candle's CPU thread pools; call from `main` before any other thread starts (the pools
/// read CANDLE_NUM_THREADS / RAYON_NUM_THREADS once, at first use). Candle's pool spin-waits at
/// every op's barrier, so compute threads plus decoding workers must not outnumber the cores:
/// on 2 cores with 1 worker, 1 compute thread trained the tiny preset at 82.6 samples/s against
/// 57.2 with candle's default of 2 (debug build; its barrier then spun for 29 % of the samples
/// in `perf`).
pub fn configure_compute_threads(threads: Option<usize>, workers: usize) {
    let preset = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"].iter().any(|v| std::env::var_os(v).is_some());
    if threads.is_none() && preset {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n = threads.unwrap_or_else(|| cores.saturating_sub(workers)).max(1).to_string();
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    std::env::set_var("RAYON_NUM_THREADS", &n);
}

/// Keeps glibc malloc from handing freed memory back to the kernel after every op. Candle
/// allocates a fresh tensor per op and frees it soon after; with glibc's defaults the heap top was
/// trimmed and re-faulted all the time (25 % of the training samples in `perf` were page faults,
/// page clearing and `brk`). Retaining up to 1 GB of freed heap: tiny preset 117 -> 160
/// samples/s (release build, 2 cores, these settings). Large blocks (> 32 MB) still go to mmap and back.
/// Skipped when the user set glibc's own MALLOC_*_ variables.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let preset = ["MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_"].iter().any(|v| std::env::var_os(v).is_some());
        if !preset {
            // SAFETY: mallopt only sets allocator parameters; called from main before other threads.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        }
    }
}

/// A random-initialised model config for a preset (dropout 0, so that resume is exact).
pub fn preset_config(preset: Preset, vocab_size: usize) -> ModelConfig {
    let (image, patch, d, enc_layers, dec_layers) = match preset {
        Preset::Tiny => (64, 8, 96, 2, 2),
        Preset::Small => (96, 8, 192, 4, 3),
    };
    let heads = d / 32;
    let encoder = VitConfig {
        hidden_size: d,
        num_hidden_layers: enc_layers,
        num_attention_heads: heads,
        intermediate_size: 4 * d,
        image_size: image,
        patch_size: patch,
        ..VitConfig::default()
    };
    let decoder = Gpt2Config {
        vocab_size,
        n_positions: 64,
        n_embd: d,
        n_layer: dec_layers,
        n_head: heads,
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..Gpt2Config::default()
    };
    ModelConfig {
        model_type: "vision-encoder-decoder".into(),
        encoder,
        decoder,
        decoder_start_token_id: Some(0),
        pad_token_id: Some(1),
        eos_token_id: Some(2),
        tie_word_embeddings: Some(false),
    }
}

/// The image processor of a preset: ViT's (bilinear, 1/255, mean = std = 0.5) at `side` pixels.
pub fn default_pre(side: usize) -> PreprocessConfig {
    PreprocessConfig { size: ImageSize { height: side, width: side }, ..PreprocessConfig::default() }
}
