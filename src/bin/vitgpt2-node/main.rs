//! The device binary: captions images and runs the camera-to-MQTT daemon with the tract runtime.

mod args;
#[path = "../common/generation.rs"]
mod generation;

use args::{Cli, Command};
use clap::Parser;
use vitgpt2::{bench, commands, node, runtime};

fn main() {
    runtime::quiet_error_backtraces();
    runtime::manage_load_heap();
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Caption(a) => {
            commands::init_logging("warn");
            commands::caption(&a.into()).map_err(|e| e.to_string())
        }
        Command::Run(a) => {
            node::init_logging(&a.config);
            node::run(&a.into()).map_err(|e| e.to_string())
        }
        Command::CheckConfig(a) => {
            commands::init_logging("warn");
            node::check_config(&a.into()).map_err(|e| e.to_string())
        }
        Command::Describe(a) => {
            commands::init_logging("warn");
            commands::describe(&a.into()).map_err(|e| e.to_string())
        }
        Command::Bench(a) => {
            commands::init_logging("warn");
            bench::bench_command(&a.into()).map_err(|e| e.to_string())
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
