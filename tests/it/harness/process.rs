//! The real binary as a child process: its environment and configuration file for a test's
//! topology, its output in a log file, and the signals a test sends it.

use std::io::Write;
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tokio::process::{Child, Command};
use transfer_worker::config::{AmqpSettings, BotSettings};

use super::broker::{queue_counts, test_channel};
use super::names::{TEST_CALLBACK_SECRET, amqp_url};

/// The real binary, with no configuration from the test's own environment.
pub fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_transfer-worker"));
    command
        .env_remove("TRANSFER_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("TRANSFER__") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs to the end within `limit`, capturing its output.
pub async fn output(mut command: Command, limit: Duration) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::time::timeout(limit, command.output())
        .await
        .expect("the command ends in time")
        .expect("the binary runs")
}

/// Asserts that a command succeeded, and returns its standard output.
pub fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The environment that points a `transfer-worker` process at a test's own topology on the
/// test broker and at the API `api_base_url`, with its listeners on free ports.
pub fn worker_env(amqp: &AmqpSettings, api_base_url: &str) -> Vec<(String, String)> {
    env(&[
        ("TRANSFER__AMQP__URL", &amqp_url()),
        ("TRANSFER__AMQP__COMMANDS_QUEUE", &amqp.commands_queue),
        ("TRANSFER__AMQP__RESULTS_EXCHANGE", &amqp.results_exchange),
        (
            "TRANSFER__AMQP__DEAD_LETTER_EXCHANGE",
            &amqp.dead_letter_exchange,
        ),
        ("TRANSFER__AMQP__DEAD_LETTER_QUEUE", &amqp.dead_letter_queue),
        ("TRANSFER__AGENTASSIST__BASE_URL", api_base_url),
        ("TRANSFER__CALLBACKS__LISTEN", "127.0.0.1:0"),
        ("TRANSFER__CALLBACKS__SECRET", TEST_CALLBACK_SECRET),
        ("TRANSFER__ADMIN__LISTEN", "127.0.0.1:0"),
    ])
}

/// Quick reconnects and calls, no public callback URL, a short grace, `info` logs: what a
/// worker process of the tests runs with beside [`worker_env`].
pub fn quick_env() -> Vec<(String, String)> {
    env(&[
        ("TRANSFER__AMQP__RECONNECT_INITIAL_DELAY", "50ms"),
        ("TRANSFER__AMQP__RECONNECT_MAX_DELAY", "500ms"),
        ("TRANSFER__AGENTASSIST__REQUEST_TIMEOUT", "5s"),
        ("TRANSFER__CALLBACKS__PUBLIC_URL", ""),
        ("TRANSFER__SHUTDOWN__GRACE", "5s"),
        ("TRANSFER__LOG__LEVEL", "info"),
    ])
}

/// Owned `(key, value)` pairs.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A configuration file with these bots, each at its own pace.
pub fn config_file(bots: &[BotSettings]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
    for bot in bots {
        write!(
            file,
            "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
             rate_limit = {}\nrate_window = \"{}ms\"\n",
            s(&bot.stream_id),
            s(&bot.account_id),
            s(&bot.client_id),
            s(bot.client_secret.as_ref().unwrap().expose_secret()),
            bot.rate_limit,
            bot.rate_window.as_millis(),
        )
        .unwrap();
        if let Some(max) = bot.max_in_flight {
            writeln!(file, "max_in_flight = {max}").unwrap();
        }
    }
    file.flush().unwrap();
    file
}

/// A child process, its output (every run of it) in a log file.
pub struct Process {
    pub name: String,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Process {
    /// A process not started yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            child: None,
            log: tempfile::NamedTempFile::new().unwrap(),
        }
    }

    /// Starts `command` as a new process.
    pub fn start(name: impl Into<String>, command: Command) -> Self {
        let mut process = Self::new(name);
        process.spawn(command);
        process
    }

    /// Runs `command` as this process, its output appended to the log.
    pub fn spawn(&mut self, mut command: Command) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .unwrap();
        writeln!(&out, "---- {} starts ----", self.name).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        self.child = Some(child);
    }

    /// Its output so far, every run of it.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Its output since it last started.
    pub fn last_log(&self) -> String {
        let log = self.log();
        log.rsplit("starts ----")
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Whether the process runs (it may be starting, or stopping).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Forgets a process that has exited.
    pub fn forget(&mut self) {
        self.child = None;
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGSTOP: the process is frozen, as in a VM or GC pause, its sockets open.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Sends SIGCONT to a frozen process.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the process runs");
        let pid = child.id().expect("running");
        let kill = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success(), "kill {signal} {pid}");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the process runs");
        let _ = child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("a killed process is reaped in time")
            .expect("wait");
    }

    /// SIGTERM, and waits up to `limit` for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.sigterm();
        self.exit_status(limit).await
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn exit_status(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the process runs");
        let status = match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("{} still runs after {limit:?}:\n{}", self.name, self.log()),
        };
        self.child = None;
        status
    }

    /// Waits until something consumes `queue` (declared by the process, so it may not exist
    /// yet); panics with the log should the process exit first.
    pub async fn wait_consumed(&mut self, queue: &str) {
        let (conn, _) = test_channel().await;
        let until = Instant::now() + Duration::from_secs(20);
        while queue_counts(&conn, queue)
            .await
            .is_none_or(|(_, consumers)| consumers == 0)
        {
            assert!(
                self.is_running(),
                "{} exited early:\n{}",
                self.name,
                self.log()
            );
            assert!(
                Instant::now() < until,
                "{} never consumed:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
