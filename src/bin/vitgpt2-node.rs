//! The device binary: captions images with the tract runtime.

use clap::{Parser, Subcommand};
use vitgpt2::{bench, cli, daemon};

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
    /// Run the camera-to-MQTT daemon configured by a node.toml.
    Run(daemon::RunArgs),
    /// Check a node.toml; errors name the file, line and field.
    CheckConfig(daemon::CheckConfigArgs),
    /// Time a bundle in tract: load, encoder, decoder steps, greedy and beam-4 captions, peak RSS.
    Bench(bench::BenchArgs),
}

fn main() {
    let args = Cli::parse();
    let code = match &args.command {
        Command::Caption(a) => {
            cli::init_logging("warn");
            cli::caption(a).map_err(|e| e.to_string())
        }
        Command::Run(a) => {
            daemon::init_logging(&a.config);
            daemon::run(a)
        }
        Command::CheckConfig(a) => {
            cli::init_logging("warn");
            daemon::check_config(a)
        }
        Command::Bench(a) => {
            cli::init_logging("warn");
            bench::bench_command(a).map_err(|e| e.to_string())
        }
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
