//! The `vmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use vmm::config::VmConfig;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A microVM monitor for AI-agent sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM from a JSON config and run it until the guest shuts down.
    Launch {
        /// The VM configuration (docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// Write a JSON report (exit reason, boot timings) here when the VM ends.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Check that this host can run VMs and say how to fix what is missing.
    Doctor,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Boot time: VMM setup and boot to the guest's init, against qemu microvm.
    Boot {
        /// Number of boots of each VMM.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// Skip the qemu comparison.
        #[arg(long)]
        no_qemu: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::from(1)
}

fn launch(config: PathBuf, report: Option<PathBuf>, start: Instant) -> ExitCode {
    let config = match VmConfig::from_file(&config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let hv = match vmm::open_hypervisor() {
        Ok(hv) => hv,
        Err(e) => return fail(e),
    };
    let vm = match vmm::Vm::build(&config, hv.as_ref(), start) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    let stop = match vmm::signals::install() {
        Ok(evt) => evt,
        Err(e) => return fail(format!("cannot install signal handlers: {e}")),
    };
    let outcome = match vm.run(Some(stop)) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    if let Some(path) = report {
        let json = vmm::bench::report_json(&outcome);
        if let Err(e) = std::fs::write(&path, json.to_string()) {
            eprintln!("vmm: cannot write the report {}: {e}", path.display());
        }
    }
    let code = outcome.reason.exit_code();
    if outcome.reason.is_clean() {
        tracing::info!("{}", outcome.reason);
    } else {
        eprintln!("vmm: error: {}", outcome.reason);
    }
    ExitCode::from(code as u8)
}

fn main() -> ExitCode {
    // Boot timings count from here: the first thing the process does.
    let start = Instant::now();
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Launch { config, report } => launch(config, report, start),
        Command::Doctor => {
            let report = vmm::doctor::run();
            print!("{report}");
            if report.can_launch() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Bench {
            what:
                BenchCommand::Boot {
                    runs,
                    json,
                    memory_mib,
                    no_qemu,
                },
        } => {
            let opts = vmm::bench::BootBenchOptions {
                runs,
                memory_mib,
                qemu: !no_qemu,
            };
            match vmm::bench::boot(&opts) {
                Ok(result) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&result.to_json()).unwrap_or_default()
                        );
                    } else {
                        print!("{}", result.table());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}
