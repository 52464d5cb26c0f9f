//! Real peers of secure transport: a `redis-server` serving TLS only, with a user and
//! password; the TLS node of `scripts/rabbitmq-cluster` (node 5, a CA of its own made when the
//! script brings it up); and an HTTP CONNECT proxy that counts its tunnels.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::cluster;
use super::names::free_port;
use super::pki::{Issued, Pki};
use super::process::Process;

/// The user and password of [`TlsRedis`].
pub const REDIS_USER: &str = "fleet";
pub const REDIS_PASSWORD: &str = "tls-test-password";

/// A private `redis-server` that speaks TLS only (no plain port), serving `server`'s
/// certificate, with the default user off and [`REDIS_USER`] on.
pub struct TlsRedis {
    pub port: u16,
    process: Process,
}

impl TlsRedis {
    /// Starts one on a free port, trusting `pki`'s CA for client certificates (none are asked
    /// for), and waits until it answers PING over TLS.
    pub async fn start(pki: &Pki, server: &Issued) -> Self {
        let port = free_port();
        let mut command = tokio::process::Command::new("redis-server");
        command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(&server.cert_file)
            .arg("--tls-key-file")
            .arg(&server.key_file)
            .arg("--tls-ca-cert-file")
            .arg(pki.ca_file())
            .args(["--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--user", "default", "off"])
            .args(["--user", REDIS_USER, "on", &format!(">{REDIS_PASSWORD}")])
            .args(["~*", "&*", "+@all"]);
        let process = Process::start(format!("TLS redis-server on {port}"), command);
        let redis = Self { port, process };
        let until = Instant::now() + Duration::from_secs(10);
        while !redis.answers().await {
            assert!(
                Instant::now() < until,
                "the TLS redis-server does not answer:\n{}",
                redis.process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis
    }

    /// `rediss://fleet:…@{host}:{port}/0`
    pub fn url(&self, host: &str) -> String {
        format!(
            "rediss://{REDIS_USER}:{REDIS_PASSWORD}@{host}:{}/0",
            self.port
        )
    }

    /// Runs `redis-cli` over TLS (trusting `pki`'s CA) and returns what it printed.
    pub async fn cli(&self, pki: &Pki, args: &[&str]) -> String {
        let mut command = tokio::process::Command::new("redis-cli");
        command.arg("--cacert").arg(pki.ca_file());
        self.run_cli(command, args).await
    }

    /// Whether it answers PING: checked without verifying, since a test may serve an expired
    /// certificate on purpose.
    async fn answers(&self) -> bool {
        let mut command = tokio::process::Command::new("redis-cli");
        command.arg("--insecure");
        self.run_cli(command, &["PING"]).await == "PONG"
    }

    async fn run_cli(&self, mut command: tokio::process::Command, args: &[&str]) -> String {
        let out = command
            .args(["--tls", "--sni", "localhost", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args([
                "--user",
                REDIS_USER,
                "--pass",
                REDIS_PASSWORD,
                "--no-auth-warning",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// A sentinel that speaks TLS only, monitoring a [`TlsRedis`] over TLS as its primary (quorum
/// 1), logging in to it as [`REDIS_USER`].
pub struct TlsSentinel {
    pub port: u16,
    /// The name it monitors the primary under.
    pub master: String,
    process: Process,
    _dir: tempfile::TempDir,
}

impl TlsSentinel {
    /// Starts one on a free port, serving `server`'s certificate, and waits until it names
    /// `redis` as the primary of `master`.
    pub async fn start(pki: &Pki, server: &Issued, redis: &TlsRedis, master: &str) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\n\
                 tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor {master} 127.0.0.1 {} 1\n\
                 sentinel auth-user {master} {REDIS_USER}\n\
                 sentinel auth-pass {master} {REDIS_PASSWORD}\n",
                server.cert_file.display(),
                server.key_file.display(),
                pki.ca_file().display(),
                redis.port,
            ),
        )
        .expect("the sentinel's configuration is written");
        let mut command = tokio::process::Command::new("redis-server");
        command.arg(&conf).arg("--sentinel");
        let process = Process::start(format!("TLS sentinel on {port}"), command);
        let sentinel = Self {
            port,
            master: master.to_owned(),
            process,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        let named = format!("127.0.0.1\n{}", redis.port);
        loop {
            let mut cli = tokio::process::Command::new("redis-cli");
            cli.arg("--cacert").arg(pki.ca_file());
            let answer = cli
                .args(["--tls", "--sni", "localhost", "-h", "127.0.0.1"])
                .args(["-p", &port.to_string()])
                .args(["SENTINEL", "get-master-addr-by-name", master])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .await
                .expect("redis-cli runs");
            if String::from_utf8_lossy(&answer.stdout).trim() == named {
                break;
            }
            assert!(
                Instant::now() < until,
                "the TLS sentinel does not name its primary:\n{}",
                sentinel.process.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sentinel
    }

    /// `rediss+sentinel://fleet:…@{host}:{port}/{master}`: TLS to the sentinel and to the
    /// primary it names.
    pub fn url(&self, host: &str) -> String {
        format!(
            "rediss+sentinel://{REDIS_USER}:{REDIS_PASSWORD}@{host}:{}/{}",
            self.port, self.master
        )
    }
}

/// Node 5 of `scripts/rabbitmq-cluster`: AMQP over TLS on 5685 with a certificate for
/// `localhost` only, plain AMQP on 5675, the EXTERNAL mechanism for client certificates.
pub struct TlsNode {
    /// The folder of its PKI: `ca.pem`, `client.pem`, `client.key`, `other-ca.pem`.
    pub dir: PathBuf,
}

/// The TLS node's AMQP-over-TLS port and its plain one.
pub const TLS_PORT: u16 = 5685;
pub const PLAIN_PORT: u16 = 5675;

impl TlsNode {
    /// The node, brought up (with the rest of the cluster) when it does not answer.
    pub async fn up() -> Self {
        let dir = PathBuf::from(cluster::script(&["tls-dir"]).trim());
        let plain = SocketAddr::from((Ipv4Addr::LOCALHOST, PLAIN_PORT));
        let answers = std::net::TcpStream::connect_timeout(&plain, Duration::from_secs(1)).is_ok();
        if !answers || !dir.join("client.pem").exists() {
            let _cluster = cluster::exclusive().await;
            cluster::script(&["up"]);
        }
        Self { dir }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `amqps://{host}:5685/%2f?auth_mechanism=external`
    pub fn external_url(&self, host: &str) -> String {
        format!("amqps://{host}:{TLS_PORT}/%2f?auth_mechanism=external")
    }

    /// guest over plain AMQP: the test's own view of the node.
    pub fn plain_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{PLAIN_PORT}/%2f")
    }
}

/// An HTTP proxy that serves `CONNECT host:port` tunnels, and nothing else, recording the
/// target of each.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    pub async fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&tunnels);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(tunnel(client, Arc::clone(&seen)));
            }
        });
        Self {
            addr,
            tunnels,
            task,
        }
    }

    /// `http://127.0.0.1:{port}`: what `HTTPS_PROXY` is set to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The targets of the tunnels asked for so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client: its request head, then bytes both ways. Anything but CONNECT gets 405.
async fn tunnel(client: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut client = BufReader::new(client);
    let mut request = String::new();
    if client.read_line(&mut request).await.is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match client.read_line(&mut header).await {
            Ok(0) | Err(_) => return,
            Ok(_) if header == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let mut words = request.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = client
            .get_mut()
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    seen.lock().unwrap().push(target.to_owned());
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client
            .get_mut()
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .get_mut()
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}
