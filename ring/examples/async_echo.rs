//! An async echo server and client over ivring (the `tokio` feature).
//!
//! Here both roles run in one process, on heap memory with an in-process doorbell pair,
//! so the example runs anywhere: `cargo run -p ivring --features tokio --example
//! async_echo`. In real programs the endpoints come from the edges, and the async code
//! is the same: on a host, `ivring_host::attach::HostLink::open(Role::Host, &attach,
//! cfg)?.endpoint`; in a guest, `Endpoint::guest` over what `ivring_guest::open` gives.

use ivring::tokio::{AsyncListener, AsyncSession};
use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u32 = 7;

/// Echoes every session's bytes back until its peer shuts its side down.
async fn echo_server(listener: AsyncListener) -> std::io::Result<()> {
    loop {
        let mut session = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = session.split();
            if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                eprintln!("echo: {e}");
            }
            // Half-close: the client reads EOF after the echo.
            let _ = w.shutdown().await;
        });
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let region = SharedRegion::heap(4 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), Config::default())
        .map_err(std::io::Error::other)?;
    let guest =
        Endpoint::guest(region, Arc::new(b), Config::default()).map_err(std::io::Error::other)?;

    // The guest serves, the host connects (either way round works the same).
    let listener = AsyncListener::bind(&guest, PORT)?;
    tokio::spawn(echo_server(listener));

    let mut clients = Vec::new();
    for i in 0..4u8 {
        let mut session = AsyncSession::connect(&host, PORT).await?;
        clients.push(tokio::spawn(async move {
            let message = vec![i; 1 << 20];
            let t = Instant::now();
            let (mut r, mut w) = session.split();
            let send = async {
                w.write_all(&message).await?;
                w.shutdown().await
            };
            let mut back = Vec::new();
            let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
            sent?;
            got?;
            assert_eq!(back, message);
            Ok::<Duration, std::io::Error>(t.elapsed())
        }));
    }
    for (i, c) in clients.into_iter().enumerate() {
        let took = c.await.expect("client task")?;
        println!(
            "client {i}: 1 MiB echoed in {:.2} ms",
            took.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
