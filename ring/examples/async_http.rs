//! An HTTP service over ivring with hyper 1.x (the `tokio` feature): a hyper server on
//! one role's listener and a hyper client on a session of the other, through
//! hyper-util's `TokioIo`.
//!
//! Both roles run in one process on heap memory so that the example runs anywhere:
//! `cargo run -p ivring --features tokio --example async_http`. A host program takes its
//! endpoint from `ivring_host::attach::HostLink`, a guest program from
//! `ivring_guest::open`; the HTTP code is unchanged.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ivring::tokio::{AsyncListener, AsyncSession};
use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
use std::convert::Infallible;
use std::sync::Arc;

const PORT: u32 = 80;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = format!("hello over ivring, you asked for {}\n", req.uri().path());
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// Serves HTTP/1.1 on every session the peer opens.
async fn serve(listener: AsyncListener) -> std::io::Result<()> {
    loop {
        let session = listener.accept().await?;
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(session), hyper::service::service_fn(hello))
                .await;
            // A reset (the peer restarted, or this process is ending and its endpoint
            // closed) ends the connection as a TCP reset would; anything else is news.
            if let Err(e) = served {
                let reset = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset);
                if !reset {
                    eprintln!("server: {e}");
                }
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let region = SharedRegion::heap(4 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), Config::default())?;
    let guest = Endpoint::guest(region, Arc::new(b), Config::default())?;

    // The guest serves HTTP; the host is the client.
    tokio::spawn(serve(AsyncListener::bind(&guest, PORT)?));

    let session = AsyncSession::connect(&host, PORT).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(session)).await?;
    let connection = tokio::spawn(connection);
    for path in ["/", "/status", "/metrics"] {
        // The connection takes one request at a time: wait until it can take the next.
        sender.ready().await?;
        let request = Request::get(path)
            .header("host", "guest")
            .body(Full::new(Bytes::new()))?;
        let reply = sender.send_request(request).await?;
        let status = reply.status();
        let body = reply.into_body().collect().await?.to_bytes();
        print!("GET {path} -> {status}: {}", String::from_utf8_lossy(&body));
    }
    // Closing the client's side ends the session; the server's connection reads EOF.
    drop(sender);
    connection.await??;
    Ok(())
}
