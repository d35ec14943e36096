//! The command line of `ivring-guest`, apart from what runs it: `main.rs` parses it and
//! `xtask` makes the man page and shell completions from it.

use clap::{Args, CommandFactory, Parser, Subcommand};
use ivring_guest::device;
use ivring_tools::{checks, logging};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ivring-guest",
    version,
    about = "ivring in a QEMU guest: probe the ivshmem device, serve, check",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub verbosity: logging::Verbosity,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Show the ivshmem devices, the interrupt mode and why, our peer id, and what the
    /// host published in the shared header.
    Probe {
        /// The device to open (default: the only ivshmem device).
        #[arg(long, value_name = "BDF")]
        device: Option<String>,
        /// Do not try VFIO (poll instead of interrupts).
        #[arg(long)]
        no_vfio: bool,
    },
    /// Run the echo, check, source, sink and zero-copy sink services (ports 1-4 and 6)
    /// until killed.
    Serve(AttachArgs),
    /// Test the link against the host's services; prints `PASS name` / `FAIL name: why`.
    Check {
        #[command(flatten)]
        attach: AttachArgs,
        #[command(flatten)]
        args: checks::CheckArgs,
    },
    /// Show the link on the ivshmem device from outside: its state (up, waiting, reset,
    /// down), the peer ids, epochs and words each side published. Exits 0 when the link
    /// is up, 3 when not. It maps BAR2 private (copy-on-write) through sysfs and writes
    /// nothing, binds no driver and rings no doorbell: the link cannot see it.
    Status {
        /// The device (default, or `auto`: the only ivshmem device).
        #[arg(long, value_name = "BDF")]
        device: Option<String>,
        /// One JSON object on stdout instead of the text.
        #[arg(long)]
        json: bool,
        /// Where the PCI devices are listed (tests use a fake tree).
        #[arg(long, hide = true, default_value = device::DEFAULT_SYSFS_ROOT)]
        sysfs_root: PathBuf,
    },
    /// Carry the QEMU guest agent: each session on --port becomes one connection to
    /// `qemu-ga -m unix-listen -p QGA_SOCK`, its parser state scrubbed first.
    Bridge {
        /// The agent's socket.
        #[arg(long, value_name = "QGA_SOCK")]
        connect: PathBuf,
        #[command(flatten)]
        attach: AttachArgs,
        /// The port to listen on.
        #[arg(long, default_value_t = ivring_tools::bridge::PORT_QGA)]
        port: u32,
    },
}

/// Where the guest end of the link comes from.
#[derive(Args, Clone, Debug)]
pub struct AttachArgs {
    /// The ivshmem PCI device (default, or `auto`: the only one).
    #[arg(long, value_name = "BDF", conflicts_with_all = ["join", "plain"])]
    pub device: Option<String>,
    /// Join an ivshmem server socket as QEMU would (tests on the host).
    #[arg(long, value_name = "SOCK", conflicts_with = "plain")]
    pub join: Option<PathBuf>,
    /// Map a plain shared file (tests on the host).
    #[arg(long, value_name = "FILE")]
    pub plain: Option<PathBuf>,
    /// With --join: accept shared memory the server has not sealed against shrinking
    /// (QEMU's own ivshmem-server, -M or -m). Only for a trusted server: a process holding
    /// the memory can shrink it, and a shrunk mapping kills us with SIGBUS.
    #[arg(long, requires = "join", conflicts_with_all = ["plain", "device"])]
    pub allow_unsealed: bool,
    /// Do not try VFIO (poll instead of interrupts).
    #[arg(long)]
    pub no_vfio: bool,
}

/// The command as parsed.
pub fn command() -> clap::Command {
    Cli::command()
}
