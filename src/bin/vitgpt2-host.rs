//! The host binary: the candle model (captioning, checkpoints).

use clap::{Parser, Subcommand};
use vitgpt2::cli;
use vitgpt2::model::commands;

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
}

fn main() {
    let args = Cli::parse();
    cli::init_logging("warn");
    let code = match &args.command {
        Command::Caption(a) => commands::caption(a),
        Command::Init(a) => commands::init(a),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
