//! The host binary: the candle model (captioning, checkpoints, training, export).

mod args;
#[path = "../common/generation.rs"]
mod generation;

use args::{Cli, Command};
use clap::Parser;
use vitgpt2::train::{commands as train, setup};
use vitgpt2::{commands, export, model};

fn main() {
    let cli = Cli::parse();
    // Before any thread starts: allocator settings, and candle sizes its CPU pools once.
    setup::configure_allocator();
    match &cli.command {
        Command::Train(a) => setup::configure_compute_threads(a.threads, a.workers),
        Command::TrainAndExport(a) => {
            if let Some(Ok(t)) = a.train_args() {
                setup::configure_compute_threads(t.threads, t.workers);
            }
        }
        _ => {}
    }
    commands::init_logging("warn");
    let code = match &cli.command {
        Command::Caption(a) => model::commands::caption(&a.into()).map_err(|e| e.to_string()),
        Command::Init(a) => model::commands::init(&a.into()).map_err(|e| e.to_string()),
        Command::Convert(a) => model::commands::convert(&a.into()).map_err(|e| e.to_string()),
        Command::Synth(a) => train::synth(&a.into()).map_err(|e| e.to_string()),
        Command::TrainTokenizer(a) => train::train_tokenizer(&a.into()).map_err(|e| e.to_string()),
        Command::Train(a) => train::train(&a.as_ref().into()).map_err(|e| e.to_string()),
        Command::Evaluate(a) => train::evaluate(&a.into()).map_err(|e| e.to_string()),
        Command::Export(a) => export::export_command(&a.into()).map_err(|e| e.to_string()),
        Command::TrainAndExport(a) => a.options().and_then(|o| export::pipeline::train_and_export(&o)).map_err(|e| e.to_string()),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
