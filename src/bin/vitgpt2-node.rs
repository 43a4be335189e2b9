//! The device binary: captions images with the tract runtime.

use clap::{Parser, Subcommand};
use vitgpt2::cli;

#[derive(Parser)]
#[command(name = "vitgpt2-node", version, about = "French image captions on the device (ViT-GPT2 in tract)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption image files, one line per image.
    Caption(cli::CaptionArgs),
}

fn main() {
    let args = Cli::parse();
    cli::init_logging("warn");
    let code = match &args.command {
        Command::Caption(a) => cli::caption(a),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
