//! `vmm-bench`: the VMM's benchmarks, outside the product. They drive
//! VMs through the `vmm` library's public Rust API; the boot, fs and net
//! benches start `vmm launch` processes instead, the way users run them,
//! so that process start counts and qemu's figures compare like with like.
//! `vmm bench ...` runs this program. Keys and recorded results:
//! docs/bench.md, docs/results/.

mod agent;
mod boot;
mod common;
mod confinement;
mod containerd;
mod fork;
mod fs;
mod image;
mod net;
mod serve;
mod start;
mod vmm_process;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmm bench", about = "Benchmarks of the vmm microVM monitor")]
struct Cli {
    #[command(subcommand)]
    what: BenchCommand,
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
    /// Sandbox start: `vmm run --cold`, `vmm run --template`, a fork of a
    /// warm parent and `vmm exec` into a running VM, for `true` and a
    /// python one-liner; the breakdown of a template start; memory per
    /// started sandbox.
    Start {
        /// Starts of each kind.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What seccomp and the jail cost: boot (spawn to the init's line) and
    /// fork latency with both and with neither, in turns.
    Confinement {
        /// Boots and forks of each kind.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The agent path: ping and `exec true` round trips, vsock throughput
    /// both ways, sequential block I/O in the guest.
    Agent {
        /// Round trips per latency figure.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// MiB per throughput figure (keep it small on PVM hosts, where the
        /// guest kernel moves about 1 MiB/s).
        #[arg(long, default_value_t = 4)]
        mib: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fork: latency (request to the child's vCPUs running), parent pause
    /// and memory per child, against guest memory size.
    Fork {
        /// Guest memory sizes in MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
        sizes: Vec<u64>,
        /// Forks per size.
        #[arg(long, default_value_t = 20)]
        runs: u32,
        /// Of those, children that write 10 MiB (memory measured again).
        #[arg(long, default_value_t = 3)]
        write_runs: u32,
        /// Also fork this many children of a 1 GiB guest at once.
        #[arg(long)]
        many: Option<u32>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shared folders: sequential MiB/s and small-file operations on a
    /// virtio-fs share, the virtio-blk root, and behind qemu virtiofsd and
    /// `vmm device fs`.
    Fs {
        /// MiB per sequential figure (the guest kernel copies slowly on
        /// PVM hosts: keep it small there).
        #[arg(long, default_value_t = 32)]
        mib: u64,
        /// Files per metadata figure.
        #[arg(long, default_value_t = 300)]
        files: u32,
        /// Figures per target.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Skip the comparisons behind qemu (virtiofsd, `vmm device fs`).
        #[arg(long)]
        no_qemu: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Networking: TCP throughput both ways and connection set-up time
    /// through the user-mode network, and through qemu's `-netdev user`.
    Net {
        /// MiB per throughput figure.
        #[arg(long, default_value_t = 32)]
        mib: u64,
        /// Figures per direction.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Connection set-ups timed.
        #[arg(long, default_value_t = 20)]
        connects: u32,
        /// Skip the qemu comparison.
        #[arg(long)]
        no_qemu: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Images: `vmm image import` of the Debian base as an OCI image
    /// against `tar -xzf` + `mkfs.ext4 -d` of its layers, the disk each
    /// takes, and `vmm run --cold -- true` on the imported image against
    /// the Debian base.
    Image {
        /// Imports and boots of each kind.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// containerd: `ctr run --rm IMAGE true` through our shim
    /// (`io.containerd.vmm.v2`) against runc, and `ctr task exec true`
    /// into a running container of each, through a containerd of the
    /// bench's own (Linux, with Debian's containerd and runc).
    Containerd {
        /// Runs of each kind.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// `vmm serve` and the E2B SDK: create, `python3 -c 'print(1)'` and
    /// kill through the official Python SDK against `vmm exec` of the same
    /// command into a running VM; with `--many N`, N sandboxes alive at
    /// once under one server, each answering, and their memory.
    Serve {
        /// Runs of each way.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Also hold this many sandboxes alive at once.
        #[arg(long)]
        many: Option<u32>,
        /// Of those, created and driven at a time.
        #[arg(long, default_value_t = 10)]
        parallel: u32,
        /// The server's spares per template (`vmm serve --warm`); the
        /// bench waits for them to be ready before each E2B run and after
        /// it, so that a refill never runs beside what it times.
        #[arg(long, default_value_t = 1)]
        warm: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Snapshot create time and restore-to-running time against memory size.
    Snapshot {
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long)]
        json: bool,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm bench: error: {msg}");
    ExitCode::from(1)
}

/// Prints a benchmark's results as JSON or as a table.
fn print_bench<E: std::fmt::Display>(
    result: Result<impl common::Report, E>,
    json: bool,
) -> ExitCode {
    match result {
        Ok(r) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&r.to_json()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print!("{}", r.table());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    vmm::fork_child::run_child_if_asked();
    vmm::init_logging();
    match Cli::parse().what {
        BenchCommand::Fork {
            sizes,
            runs,
            write_runs,
            many,
            json,
        } => print_bench(
            fork::fork(&fork::ForkBenchOptions {
                sizes_mib: sizes,
                runs,
                write_runs,
                many,
            }),
            json,
        ),
        BenchCommand::Snapshot { sizes, runs, json } => print_bench(
            fork::snapshot(&fork::SnapshotBenchOptions {
                sizes_mib: sizes,
                runs,
            }),
            json,
        ),
        BenchCommand::Fs {
            mib,
            files,
            runs,
            no_qemu,
            json,
        } => print_bench(
            fs::fs(&fs::FsBenchOptions {
                mib,
                files,
                runs,
                qemu: !no_qemu,
            }),
            json,
        ),
        BenchCommand::Net {
            mib,
            runs,
            connects,
            no_qemu,
            json,
        } => print_bench(
            net::net(&net::NetBenchOptions {
                mib,
                runs,
                connects,
                qemu: !no_qemu,
            }),
            json,
        ),
        BenchCommand::Agent { runs, mib, json } => {
            print_bench(agent::agent(&agent::AgentBenchOptions { runs, mib }), json)
        }
        BenchCommand::Boot {
            runs,
            json,
            memory_mib,
            no_qemu,
        } => print_bench(
            boot::boot(&boot::BootBenchOptions {
                runs,
                memory_mib,
                qemu: !no_qemu,
            }),
            json,
        ),
        BenchCommand::Confinement { runs, json } => {
            print_bench(confinement::confinement(runs), json)
        }
        BenchCommand::Start { runs, json } => print_bench(start::start(runs), json),
        BenchCommand::Image { runs, json } => print_bench(image::image(runs), json),
        BenchCommand::Containerd { runs, json } => print_bench(containerd::containerd(runs), json),
        BenchCommand::Serve {
            runs,
            many,
            parallel,
            warm,
            json,
        } => print_bench(
            serve::serve(&serve::ServeBenchOptions {
                runs,
                many,
                parallel,
                warm,
            }),
            json,
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
