//! A TCP proxy in front of RabbitMQ that a test can cut: every open connection is dropped and,
//! while down, new ones are refused — what a worker sees when the broker goes away. It can also
//! stall: hold back everything the broker sends (confirms, deliveries) while the client's
//! traffic still gets through, as a broker that is slow to confirm looks to its client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    held: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies what the broker sends to the client, holding it back while `held` says so.
async fn forward_unless_held(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if held.wait_for(|held| !*held).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Forwards a free local port to the test broker ([`super::names::amqp_addr`]).
    pub async fn start() -> Self {
        Self::start_to(super::names::amqp_addr()).await
    }

    /// Forwards a free local port to `upstream`.
    pub async fn start_to(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (held, _) = watch::channel(false);
        let task = {
            let up = up.clone();
            let generation = generation.clone();
            let held = held.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let mut cut = generation.subscribe();
                    let held = held.subscribe();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (mut client_read, client_write) = client.into_split();
                        let (server_read, mut server_write) = server.into_split();
                        tokio::select! {
                            _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
                            () = forward_unless_held(server_read, client_write, held) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        Self {
            addr,
            up,
            generation,
            held,
            task,
        }
    }

    /// The test broker's AMQP URL, through the proxy.
    pub fn amqp_url(&self) -> String {
        super::names::amqp_url_via(self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Holds back everything the broker sends, on every connection, until [`Proxy::resume`].
    pub fn stall(&self) {
        self.held.send_replace(true);
    }

    /// Lets the broker's traffic through again, what was held back first.
    pub fn resume(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.generation.send_modify(|g| *g += 1);
        self.task.abort();
    }
}
