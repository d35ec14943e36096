//! `ivring-guest`: the guest side of ivring.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ivring::{Config, Endpoint, Role};
use ivring_guest::bridge::{self, GuestBridgeOptions};
use ivring_host::attach::{Attach, HostLink};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "ivring-guest", version, about = "ivring inside a QEMU guest")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Carry the QEMU guest agent: each session on --port becomes one connection to
    /// `qemu-ga -m unix-listen -p QGA_SOCK`, its parser state scrubbed first.
    Bridge {
        /// The agent's socket.
        #[arg(long, value_name = "QGA_SOCK")]
        connect: PathBuf,
        /// The ivshmem PCI device (`0000:00:04.0`, or `auto` for the only one).
        #[arg(long, value_name = "BDF", conflicts_with_all = ["join", "plain"])]
        device: Option<String>,
        /// Join an ivshmem server instead (testing on the host).
        #[arg(long, value_name = "SOCK", conflicts_with = "plain")]
        join: Option<PathBuf>,
        /// Use a plain shared file instead (testing on the host).
        #[arg(long, value_name = "FILE")]
        plain: Option<PathBuf>,
        /// The port to listen on.
        #[arg(long, default_value_t = ivring_host::bridge::PORT_QGA)]
        port: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("ivring-guest: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Bridge {
            connect,
            device,
            join,
            plain,
            port,
        } => {
            let mut opts = GuestBridgeOptions::new(connect);
            opts.port = port;
            match (device, join, plain) {
                (Some(bdf), None, None) => {
                    let dev = ivring_guest::open(&ivring_guest::OpenOptions {
                        device: (bdf != "auto").then_some(bdf),
                        ..Default::default()
                    })
                    .context("opening the ivshmem device")?;
                    eprintln!(
                        "ivring-guest: {} ({} bytes): {}",
                        dev.bdf(),
                        dev.region().len(),
                        dev.why()
                    );
                    let doorbell: Arc<dyn ivring::Doorbell> = dev.doorbell();
                    let ep = Endpoint::guest(dev.region(), doorbell, Config::default())
                        .context("attaching to the shared memory")?;
                    bridge::run(&ep, &opts)
                }
                (None, Some(sock), None) => {
                    let link = HostLink::open(Role::Guest, &Attach::Join(sock), Config::default())?;
                    bridge::run(&link, &opts)
                }
                (None, None, Some(file)) => {
                    let link = HostLink::open(
                        Role::Guest,
                        &Attach::Plain { file, size: None },
                        Config::default(),
                    )?;
                    bridge::run(&link, &opts)
                }
                _ => bail!("give one of --device BDF, --join SOCK or --plain FILE"),
            }
        }
    }
}
