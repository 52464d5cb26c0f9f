//! The fleet under test: replicas, each with a name of its own (as a pod has), started,
//! killed, stopped, frozen, and replaced the way a Kubernetes rolling update replaces them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::task::JoinHandle;

use crate::amqp::{self, Names};
use crate::feed::History;
use crate::procs::{self, ChildGuard};
use crate::rig::{Template, node_url};
use crate::{Rng, lock};

/// How long a new replica may take to join before a rolling update gives it up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// One replica: its name stays across restarts of its process, as a pod's across restarts of
/// its container.
pub struct Replica {
    pub name: String,
    config: PathBuf,
    admin: u16,
    starts: u32,
    process: Option<ChildGuard>,
}

/// How a replica asked to stop (SIGTERM) ended.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub name: String,
    /// `None`: still running after the grace, so killed (SIGKILL).
    pub status: Option<std::process::ExitStatus>,
    pub at: Instant,
}

pub struct Fleet {
    template: Template,
    exe: PathBuf,
    dir: PathBuf,
    history: Arc<Mutex<History>>,
    /// The replicas running (or frozen, or between a kill and their start).
    pub replicas: Vec<Replica>,
    /// Replicas made so far, for new names.
    made: u32,
    /// Old replicas exiting by themselves after SIGTERM.
    retiring: Vec<JoinHandle<()>>,
    http: reqwest::Client,
}

impl Fleet {
    pub fn new(
        template: Template,
        exe: PathBuf,
        dir: PathBuf,
        history: Arc<Mutex<History>>,
    ) -> Self {
        Self {
            template,
            exe,
            dir,
            history,
            replicas: Vec::new(),
            made: 0,
            retiring: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    /// A new replica under a new name, started; its index.
    pub fn add(&mut self) -> anyhow::Result<usize> {
        self.made += 1;
        let prefix = &self.template.names.prefix;
        let name = format!("{prefix}-w{}", self.made);
        let admin = procs::free_port()?;
        let config = self.dir.join(format!("{name}.toml"));
        std::fs::write(&config, self.template.render(&name, admin))?;
        self.replicas.push(Replica {
            name,
            config,
            admin,
            starts: 0,
            process: None,
        });
        let r = self.replicas.len() - 1;
        self.start(r)?;
        Ok(r)
    }

    /// Starts replica `r`'s process (again).
    pub fn start(&mut self, r: usize) -> anyhow::Result<()> {
        let replica = &mut self.replicas[r];
        replica.starts += 1;
        let mut cmd = procs::clean_command(&self.exe);
        cmd.env("TRANSFER__LOG__LEVEL", "info")
            .args(["run", "--config"])
            .arg(&replica.config);
        let log = self
            .dir
            .join(format!("{}.{}.log", replica.name, replica.starts));
        replica.process = Some(ChildGuard::spawn("worker", cmd, &log)?);
        Ok(())
    }

    /// A replica chosen by `rng`.
    pub fn pick(&self, rng: &mut Rng) -> usize {
        rng.index(self.replicas.len())
    }

    /// SIGKILL to replica `r`.
    pub fn kill(&mut self, r: usize) {
        lock(&self.history).abrupt.push(Instant::now());
        drop(self.replicas[r].process.take());
    }

    /// SIGTERM to replica `r`, waiting until it exits (SIGKILL after the grace).
    pub async fn stop(&mut self, r: usize) {
        if let Some(mut process) = self.replicas[r].process.take() {
            let stopped = terminate(&self.replicas[r].name, &mut process).await;
            record(&self.history, stopped);
        }
    }

    /// SIGSTOP to replica `r`, and SIGCONT `frozen` later.
    pub async fn freeze(&mut self, r: usize, frozen: Duration) -> anyhow::Result<()> {
        let pid = self.replicas[r]
            .process
            .as_ref()
            .map(ChildGuard::pid)
            .context("the replica to freeze is not running")?;
        let pid = libc::pid_t::try_from(pid)?;
        lock(&self.history).abrupt.push(Instant::now());
        // SAFETY: plain syscalls on our own child's pid, which we have not reaped (the guard
        // holds it).
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        tokio::time::sleep(frozen).await;
        unsafe {
            libc::kill(pid, libc::SIGCONT);
        }
        Ok(())
    }

    /// A rolling update's step for replica `r`: a new replica under a new name first; once it
    /// has joined, `r` gets SIGTERM and exits by itself, in the background. Returns the new
    /// replica's name and how long it took to join, or `Err` with why the update was rolled
    /// back (the new replica stopped, the old one kept).
    pub async fn roll(
        &mut self,
        r: usize,
        settle: Duration,
    ) -> anyhow::Result<Result<(String, Duration), String>> {
        let old = self.replicas[r].name.clone();
        let new = self.add()?;
        let started = Instant::now();
        let joined = self.wait_joined(new).await;
        if let Err(why) = joined {
            let name = self.replicas[new].name.clone();
            self.stop(new).await;
            self.replicas.remove(new);
            return Ok(Err(format!(
                "{name} did not join within {JOIN_TIMEOUT:?} ({why:#}); rolled back, {old} kept"
            )));
        }
        let took = started.elapsed();
        tokio::time::sleep(settle).await;
        let mut retired = self.replicas.remove(r);
        let new_name = self.replicas.last().map(|n| n.name.clone());
        if let Some(mut process) = retired.process.take() {
            let history = self.history.clone();
            self.retiring.push(tokio::spawn(async move {
                let stopped = terminate(&retired.name, &mut process).await;
                record(&history, stopped);
            }));
        }
        Ok(Ok((new_name.unwrap_or_default(), took)))
    }

    /// Until replica `r` is ready (`/readyz`) and sees another member of the fleet besides
    /// itself: it has joined, and the others see it at their next heartbeat.
    async fn wait_joined(&mut self, r: usize) -> anyhow::Result<()> {
        let base = format!("http://127.0.0.1:{}", self.replicas[r].admin);
        let until = Instant::now() + JOIN_TIMEOUT;
        loop {
            if let Some(process) = self.replicas[r].process.as_mut() {
                process.check_alive()?;
            }
            let ready = matches!(
                self.http.get(format!("{base}/readyz")).send().await,
                Ok(answer) if answer.status().is_success()
            );
            if ready && self.series(&base, "transfer_fleet_members").await >= 2.0 {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("not ready, or alone in the fleet");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn series(&self, base: &str, name: &str) -> f64 {
        let Ok(answer) = self.http.get(format!("{base}/metrics")).send().await else {
            return 0.0;
        };
        let text = answer.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Until the first replica consumes the commands queue.
    pub async fn wait_for_intake(&mut self, names: &Names) -> anyhow::Result<()> {
        let probe = amqp::connect(&node_url(2), "chaos readiness").await?;
        if let Some(first) = self.replicas.first_mut().and_then(|r| r.process.as_mut()) {
            amqp::wait_for_consumer(&probe, &names.commands, first, Duration::from_secs(60))
                .await?;
        }
        let _ = probe.close(200, "ready".into()).await;
        Ok(())
    }

    /// SIGTERM to every replica at once, and waits for those retiring.
    pub async fn stop_all(&mut self) {
        let stops = self.replicas.iter_mut().filter_map(|replica| {
            let mut process = replica.process.take()?;
            let name = replica.name.clone();
            Some(async move { terminate(&name, &mut process).await })
        });
        for stopped in futures_util::future::join_all(stops).await {
            // The soak is over: an unclean exit here is reported, not counted as in doubt.
            lock(&self.history).stopped_at_end.push(stopped);
        }
        for retiring in self.retiring.drain(..) {
            let _ = retiring.await;
        }
    }
}

async fn terminate(name: &str, process: &mut ChildGuard) -> Stopped {
    let status = process.stop().await;
    Stopped {
        name: name.to_owned(),
        status,
        at: Instant::now(),
    }
}

/// A stop during the faults: a replica killed after the grace is in doubt as at a kill.
fn record(history: &Mutex<History>, stopped: Stopped) {
    let mut h = lock(history);
    if stopped.status.is_none() {
        h.abrupt.push(stopped.at);
    }
    h.stopped.push(stopped);
}
