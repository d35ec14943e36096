//! `ivring-host`: the host side of ivring.

use anyhow::{bail, Context, Result};
use ivring::Config;
use ivring_host::attach::{Attach, HostLink};
use ivring_host::{server, shm, HostError, Server};
use ivring_tools::logging::{self, LinkWatch};
use ivring_tools::{bench, checks, demo, services, status};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tracing::info;

mod cli;
use cli::{Cli, Cmd, TrustArgs};

const BIN: &str = "ivring-host";

fn main() {
    let cli: Cli = ivring_tools::cli::parse_args_from(BIN, cli::command());
    logging::init(BIN, cli.verbosity);
    if let Cmd::Bench(args) = &cli.cmd {
        if let Err(problem) = check_bench_args(args) {
            ivring_tools::cli::usage_error(BIN, &problem);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("{BIN}: error: {}", ivring_tools::cli::one_line(&e));
        std::process::exit(1);
    }
}

/// Everything about the bench's arguments that can be known before the first figure, so
/// that a mistake is not found minutes into a run.
fn check_bench_args(a: &bench::BenchArgs) -> Result<(), String> {
    let mem = a.mem_mib.checked_mul(1 << 20);
    if !mem.is_some_and(shm::is_region_size) {
        let try_mib = (shm::nearest_region_size(mem.unwrap_or(u64::MAX)) >> 20).max(1);
        return Err(format!(
            "--mem-mib {}: the shared memory must be a power of two from 64 KiB to 1 GiB \
             (try --mem-mib {try_mib})",
            a.mem_mib
        ));
    }
    for (flag, v) in [("--seconds", a.seconds), ("--idle-seconds", a.idle_seconds)] {
        if let Some(x) = v.filter(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(format!(
                "{flag} {x}: give a positive number of seconds, e.g. 1 or 0.5"
            ));
        }
    }
    if a.modes.is_empty() {
        return Err("--modes: give at least one of poll, block, adaptive".into());
    }
    check_cpus(&a.cpus)?;
    if let Some(plot) = &a.plot {
        check_writable(plot).map_err(|e| format!("--plot {}: {e}", plot.display()))?;
    }
    Ok(())
}

/// `--cpus`: `auto`, `none`, or CPU numbers this process may run on.
fn check_cpus(spec: &str) -> Result<(), String> {
    use rustix::thread::{sched_getaffinity, CpuSet};
    if spec == "auto" || spec == "none" {
        return Ok(());
    }
    let allowed: Vec<usize> = match sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => return Ok(()), // the bench itself will say what failed
    };
    let may_use = cpu_list(&allowed);
    let example = match allowed.as_slice() {
        [a, b, ..] => format!("{a},{b}"),
        [a] => a.to_string(),
        [] => "none".into(),
    };
    for c in spec.split(',') {
        let ok = match c.trim().parse::<usize>() {
            Ok(n) => allowed.contains(&n),
            Err(_) => {
                return Err(format!(
                    "--cpus {spec}: {c:?} is not a CPU number; give CPU numbers (this process \
                     may use {may_use}), e.g. --cpus {example}, or auto or none"
                ))
            }
        };
        if !ok {
            return Err(format!(
                "--cpus {spec}: CPU {} is not one this process may use ({may_use}): \
                 e.g. --cpus {example}",
                c.trim()
            ));
        }
    }
    Ok(())
}

/// CPU numbers as ranges: "0-3,6".
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// Whether `path` can be written: an existing file is opened for appending (left
/// unchanged), a new one is created and removed again.
fn check_writable(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => std::fs::remove_file(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "directory {} does not exist: create it first",
                            dir.display()
                        ),
                    ))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Waits up to `bound` for a socket to appear at `path` (the server's unit may still be
/// starting), saying so once.
fn wait_for_server_socket(path: &Path, bound: Duration) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = || std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket() || path.exists() {
        return Ok(());
    }
    info!(
        "waiting up to {} s for the ivshmem server's socket {}",
        bound.as_secs_f64(),
        path.display()
    );
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        if is_socket() {
            return Ok(());
        }
    }
    Err(HostError::NoServer { path: path.into() }.into())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve {
            socket,
            size,
            vectors,
            max_peers,
            mode,
            group,
            vm_socket,
        } => {
            let gid = group.as_deref().map(server::resolve_group).transpose()?;
            let mut server = Server::bind(&socket, size, vectors)?.with_max_peers(max_peers.into());
            if let Some(vm) = &vm_socket {
                server = server.with_vm_socket(vm)?;
                info!(
                    "VM socket {}: the VM connecting there gets peer id 0 (QEMU: -device ivshmem-doorbell,master=on,chardev=... with -chardev socket,path={}); host programs join on {}",
                    vm.display(),
                    vm.display(),
                    socket.display()
                );
            }
            server.set_socket_access(mode, gid)?;
            // The socket accepts from here on (the backlog holds early peers).
            ivring_tools::notify::ready(&format!("serving {}", socket.display()));
            info!(
                "serving {} on {} ({} vector{}, at most {max_peers} peers, socket mode {mode:04o}); start QEMU with -chardev socket,path={},id=ivs -device ivshmem-doorbell,chardev=ivs,vectors={}",
                shm::human_size(size),
                socket.display(),
                vectors,
                if vectors == 1 { "" } else { "s" },
                socket.display(),
                vectors
            );
            server.run()?;
            Ok(())
        }
        Cmd::Demo { size, seconds } => demo::run(&demo::DemoOptions { size, seconds }),
        Cmd::Peer {
            join,
            plain,
            size,
            trust,
            role,
            hello,
            wait,
        } => {
            let cfg = Config {
                wait,
                ..Config::default()
            };
            // Listen before attaching, so that no connect the other side makes the moment
            // it sees us is refused.
            let attach = attach(join, plain, size, trust)?;
            let link = HostLink::open_with(role.into(), &attach, cfg, services::spawn_all)?;
            info!("serving ports 1-4 and 6; {}", link.why());
            if hello {
                let mut s = link
                    .connect(demo::PORT_HELLO)
                    .context("greet the other side")?;
                write!(s, "hello from pid {}", std::process::id())?;
            }
            let never = AtomicBool::new(false);
            LinkWatch::new(attach.to_string()).run(&link, logging::WATCH_PERIOD, &never);
            Ok(())
        }
        Cmd::Bridge {
            listen,
            join,
            join_wait,
            serve,
            plain,
            trust,
            size,
            vectors,
            port,
            mode,
            group,
        } => {
            let attach = match (join, serve, plain) {
                (Some(j), None, None) => {
                    wait_for_server_socket(&j, Duration::from_secs_f64(join_wait))?;
                    Attach::join(j, trust.allow_unsealed)
                }
                (None, Some(socket), None) => Attach::Serve {
                    socket,
                    size,
                    vectors,
                },
                (None, None, Some(file)) => Attach::Plain {
                    file,
                    size: Some(size),
                },
                _ => bail!("give one of --join SOCK, --serve SOCK or --plain FILE"),
            };
            server::prepare_socket_dir(&listen)?;
            if trust.allow_unsealed && !matches!(attach, Attach::JoinWith(..)) {
                bail!("--allow-unsealed applies to --join only: drop it, or join a server");
            }
            let mut opts = ivring_tools::bridge::HostBridgeOptions::new(listen, attach);
            opts.port = port;
            opts.mode = mode;
            // Resolved here, through the name service; the bridge takes the number as is.
            opts.group = group
                .as_deref()
                .map(server::resolve_group)
                .transpose()?
                .map(|gid| gid.to_string());
            ivring_tools::bridge::run_host(&opts)
        }
        Cmd::Check {
            join,
            plain,
            trust,
            role,
            args,
        } => {
            let link = HostLink::open(
                role.into(),
                &attach(join, plain, None, trust)?,
                args.config(),
            )?;
            checks::out(format_args!("INFO {}", link.why()));
            checks::run(&link, Some(&link.region()), role.into(), &args)
        }
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Daemon(args) => ivring_tools::daemon::args::run_daemon(args),
        Cmd::Vm(cmd) => ivring_tools::daemon::args::run_vm(cmd),
        Cmd::Status {
            join,
            plain,
            trust,
            json,
        } => {
            let (region, what) = match (join, plain) {
                (Some(sock), None) => {
                    let opts = ivring_host::ConnectOptions {
                        allow_unsealed: trust.allow_unsealed,
                        ..Default::default()
                    };
                    let memfd = ivring_host::Client::fetch_memory(&sock, &opts)?;
                    let what = format!("server {}", sock.display());
                    (shm::map_fd_private(memfd.as_fd(), &what)?, what)
                }
                (None, Some(file)) => (
                    shm::map_file_private(&file)?,
                    format!("plain {}", file.display()),
                ),
                _ => bail!("give --join SOCK or --plain FILE"),
            };
            let st = status::read(&region, what, status::WATCH);
            if json {
                println!("{}", st.to_json());
            } else {
                print!("{}", st.text());
            }
            if st.state != status::State::Up {
                std::process::exit(3);
            }
            Ok(())
        }
    }
}

fn attach(
    join: Option<PathBuf>,
    plain: Option<PathBuf>,
    size: Option<u64>,
    trust: TrustArgs,
) -> Result<Attach> {
    Ok(match (join, plain) {
        (Some(j), None) => Attach::join(j, trust.allow_unsealed),
        (None, Some(file)) => Attach::Plain { file, size },
        _ => bail!("give --join SOCK or --plain FILE"),
    })
}
