//! A loopback TCP proxy for fault tests: it can reset all its connections (each end sees its
//! peer vanish mid-stream) and stall them (bytes held back, connections left open).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy to one upstream port on 127.0.0.1.
pub struct Proxy {
    pub port: u16,
    generation: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    pub resets: AtomicU64,
    pub accepted: AtomicU64,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: u16) -> Arc<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Proxy {
            port: listener.local_addr().unwrap().port(),
            generation: watch::channel(0).0,
            stalled: watch::channel(false).0,
            resets: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                p.accepted.fetch_add(1, Ordering::Relaxed);
                for s in [&client, &server] {
                    s.set_nodelay(true).unwrap();
                }
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, p.generation.subscribe(), p.stalled.subscribe()));
                tokio::spawn(pipe(sr, cw, p.generation.subscribe(), p.stalled.subscribe()));
            }
        });
        proxy
    }

    /// Drops every connection.
    pub fn reset_all(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Holds every byte back (`true`) or lets them through again (`false`).
    pub fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }
}

/// Copies one direction until the connection ends or the proxy resets everything.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut generation: watch::Receiver<u64>,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = generation.changed() => return,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        while *stalled.borrow_and_update() {
            tokio::select! {
                _ = generation.changed() => return,
                _ = stalled.changed() => {}
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
