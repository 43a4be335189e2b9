//! The host binary: the candle model (captioning, checkpoints; training comes with the host issues).

use clap::{Parser, Subcommand};
use vitgpt2::cli;
use vitgpt2::export;
use vitgpt2::model::commands;
use vitgpt2::train::{commands as train, trainer};

#[derive(Parser)]
#[command(name = "vitgpt2-host", version, about = "French image captions on the host (ViT-GPT2 in candle)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption image files with a checkpoint folder, one line per image (as vitgpt2-node caption).
    Caption(commands::HostCaptionArgs),
    /// Build a ViT-GPT2 from a pretrained ViT and a pretrained GPT-2 and save it as a checkpoint.
    Init(commands::InitArgs),
    /// Draw a synthetic French captioning set (shapes; COCO format), deterministic by seed.
    Synth(train::SynthArgs),
    /// Train a byte-level BPE tokenizer on captions.
    TrainTokenizer(train::TokenizerArgs),
    /// Fine-tune (or train from scratch) on COCO-format or flat caption records.
    Train(Box<trainer::TrainArgs>),
    /// Caption a held-out set and print exact match, BLEU-1..4, ROUGE-L and CIDEr-D.
    Evaluate(train::EvaluateArgs),
    /// Export a checkpoint (or random weights) to an ONNX bundle for vitgpt2-node (fp32, int8).
    Export(export::ExportArgs),
    /// Train (or --from-checkpoint), export fp32 and int8, evaluate both, write the bundle with its manifest.
    TrainAndExport(export::pipeline::TrainAndExportArgs),
}

fn main() {
    let args = Cli::parse();
    // Before any thread starts: allocator settings, and candle sizes its CPU pools once.
    trainer::configure_allocator();
    match &args.command {
        Command::Train(a) => trainer::configure_compute_threads(a.threads, a.workers),
        Command::TrainAndExport(a) => {
            if let Some(Ok(t)) = a.train_args.as_deref().map(export::pipeline::parse_train_args) {
                trainer::configure_compute_threads(t.threads, t.workers);
            }
        }
        _ => {}
    }
    cli::init_logging("warn");
    let code = match &args.command {
        Command::Caption(a) => commands::caption(a),
        Command::Init(a) => commands::init(a),
        Command::Synth(a) => train::synth(a),
        Command::TrainTokenizer(a) => train::train_tokenizer(a),
        Command::Train(a) => train::train(a),
        Command::Evaluate(a) => train::evaluate(a),
        Command::Export(a) => export::export_command(a),
        Command::TrainAndExport(a) => export::pipeline::train_and_export(a),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
