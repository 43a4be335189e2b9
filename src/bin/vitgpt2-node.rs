//! The device binary: captions images with the tract runtime, and runs the node daemon.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vitgpt2::node::{self, CheckConfigOptions, RunOptions};
use vitgpt2::{bench, cli};

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
    Run(RunArgs),
    /// Check a node.toml; errors name the file, line and field.
    CheckConfig(CheckConfigArgs),
    /// Time a bundle in tract: load, encoder, decoder steps, greedy and beam-4 captions, peak RSS.
    Bench(bench::BenchArgs),
}

/// `vitgpt2-node run` flags; each one overrides the config file.
#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Node configuration (see firmware-config/node.toml).
    #[arg(long)]
    config: PathBuf,
    /// Model bundle directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Watch this folder for new images (sets source.kind = "directory").
    #[arg(long)]
    watch: Option<PathBuf>,
    /// MQTT broker host.
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    device_id: Option<String>,
    /// Spool folder.
    #[arg(long)]
    spool: Option<PathBuf>,
    /// Minimum milliseconds between captions.
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Stop after this many captions.
    #[arg(long)]
    max_captions: Option<u64>,
    /// Do not connect to any broker (captions go to the spool and stdout).
    #[arg(long)]
    no_mqtt: bool,
    #[command(flatten)]
    generation: cli::GenerationArgs,
}

impl From<&RunArgs> for RunOptions {
    fn from(a: &RunArgs) -> Self {
        RunOptions {
            config: a.config.clone(),
            model: a.model.clone(),
            watch: a.watch.clone(),
            host: a.host.clone(),
            port: a.port,
            device_id: a.device_id.clone(),
            spool: a.spool.clone(),
            interval_ms: a.interval_ms,
            max_captions: a.max_captions,
            no_mqtt: a.no_mqtt,
            generation: a.generation.overrides(),
        }
    }
}

/// `vitgpt2-node check-config [--strict] FILE`.
#[derive(Debug, Clone, Args)]
struct CheckConfigArgs {
    file: PathBuf,
    /// Also open the model bundle, the spool folder, the password file and the camera (what
    /// systemd runs before each start); fail on any of them. Without it, paths missing on
    /// this machine are only warnings.
    #[arg(long)]
    strict: bool,
}

fn main() {
    let args = Cli::parse();
    let code = match &args.command {
        Command::Caption(a) => {
            cli::init_logging("warn");
            cli::caption(a)
        }
        Command::Run(a) => {
            node::init_logging(&a.config);
            node::run(&a.into())
        }
        Command::CheckConfig(a) => {
            cli::init_logging("warn");
            node::check_config(&CheckConfigOptions { file: a.file.clone(), strict: a.strict })
        }
        Command::Bench(a) => {
            cli::init_logging("warn");
            bench::bench_command(a)
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
