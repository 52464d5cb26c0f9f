//! The command line as a user runs it (CONTRACT §8): the real binary's `config`, `run` with
//! `publish --wait`, `simulate` and `demo`.

use std::io::Write;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};
use transfer_worker::agentassist::jwt::TokenSource;
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{SimBot, SimulatorConfig};

use crate::harness::{
    Process, TEST_CALLBACK_SECRET, amqp_url, binary, free_port, output, own_topology, sim,
    succeeded, worker_env,
};

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file.flush().unwrap();
    file
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_prints_valid_settings_redacted_and_refuses_invalid_ones() {
    let secret = "cli-secret-never-printed-4242";
    let valid = toml_file(&format!(
        "[[bots]]\nstream_id = \"st-cli-config\"\naccount_id = \"acc-cli\"\n\
         client_id = \"cs-cli\"\nclient_secret = {}\n",
        toml_string(secret)
    ));
    let mut command = binary();
    command.arg("config").arg("--config").arg(valid.path());
    let stdout = succeeded(&output(command, Duration::from_secs(30)).await);
    assert!(stdout.contains("st-cli-config"), "{stdout}");
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains(secret), "the secret was printed: {stdout}");
    let printed: toml::Value = toml::from_str(&stdout).expect("the output is TOML");
    assert_eq!(printed["bots"][0]["account_id"].as_str(), Some("acc-cli"));

    let invalid = toml_file("[amqp]\nprefetch = 0\n");
    let mut command = binary();
    command.arg("config").arg("--config").arg(invalid.path());
    let out = output(command, Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an invalid configuration exits 0");
    assert!(stderr.contains("amqp.prefetch"), "names the key: {stderr}");
}

/// What `transfer-worker config` says on stderr of a file with this `[fleet]` section, which it
/// must refuse.
async fn config_refuses(fleet: &str) -> String {
    let file = toml_file(&format!("[fleet]\n{fleet}"));
    let mut command = binary();
    command.arg("config").arg("--config").arg(file.path());
    let out = output(command, Duration::from_secs(30)).await;
    assert!(!out.status.success(), "accepted: {fleet}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_refuses_fleet_timings_with_which_a_replica_stops_itself_naming_the_keys() {
    // Twice the heartbeat: one heartbeat that times out (redis_timeout, 2 s) and the replica
    // stops consuming.
    let stderr = config_refuses("heartbeat = \"1s\"\nmember_ttl = \"2s\"\n").await;
    for key in ["fleet.member_ttl", "fleet.heartbeat", "fleet.redis_timeout"] {
        assert!(stderr.contains(key), "names {key}: {stderr}");
    }
    // Enough for that alone, but not in a fleet on the worker's 3 s AMQP heartbeats.
    let fleet = "redis_url = \"redis://127.0.0.1:6379/0\"\nmember_ttl = \"5s\"\n";
    let stderr = config_refuses(fleet).await;
    for key in [
        "fleet.member_ttl",
        "fleet.heartbeat",
        "amqp.url",
        "AMQP heartbeat",
    ] {
        assert!(stderr.contains(key), "names {key}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_publish_wait_with_secrets_from_a_file_and_the_environment() {
    let (settings, _cleanup) = own_topology();
    let amqp = &settings.amqp;
    // The simulator checks every token's signature against these secrets: a worker signing
    // with anything else gets 401s and a failed transfer.
    let from_file = "secret-from-a-file-0001";
    let from_env = "secret-from-the-environment-0002";
    let bot = |n: &str, secret: &str| SimBot {
        stream_id: format!("st-cli-{n}"),
        account_id: "acc-cli".into(),
        client_id: format!("cs-cli-{n}"),
        client_secret: SecretString::from(secret.to_owned()),
    };
    let sim = sim::start(SimulatorConfig {
        bots: vec![bot("file", from_file), bot("env", from_env)],
        ..sim::config(&settings)
    })
    .await;

    let mut secret_file = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret_file, "{from_file}").unwrap();
    secret_file.flush().unwrap();
    let secret_var = format!("TW_TEST_SECRET_{}", std::process::id());
    let config = toml_file(&format!(
        "[[bots]]\nstream_id = \"st-cli-file\"\naccount_id = \"acc-cli\"\n\
         client_id = \"cs-cli-file\"\nclient_secret_file = {}\n\n\
         [[bots]]\nstream_id = \"st-cli-env\"\naccount_id = \"acc-cli\"\n\
         client_id = \"cs-cli-env\"\nclient_secret_env = {}\n",
        toml_string(&secret_file.path().display().to_string()),
        toml_string(&secret_var),
    ));
    let configured = |mut command: tokio::process::Command| {
        command
            .arg("--config")
            .arg(config.path())
            .env(&secret_var, from_env)
            .envs(worker_env(amqp, &sim.base_url()));
        command
    };

    let mut run = binary();
    run.arg("run");
    let mut worker = Process::start("the worker", configured(run));
    worker.wait_consumed(&amqp.commands_queue).await;

    for stream in ["st-cli-file", "st-cli-env"] {
        let mut publish = binary();
        publish.args([
            "publish",
            "--org-id",
            "o-cli",
            "--session-id",
            &format!("s-{stream}"),
            "--agent",
            "a-cli",
            "--stream-id",
            stream,
            "--command-id",
            &format!("cmd-{stream}"),
            "--wait",
            "--timeout",
            "20s",
        ]);
        let out = output(configured(publish), Duration::from_secs(30)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "publish --wait: {}\n{stdout}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            worker.log()
        );
        let (id, outcome) = stdout.split_once('\n').expect("the id, then the outcome");
        assert_eq!(id, format!("cmd-{stream}"));
        let outcome: Value = serde_json::from_str(outcome).expect("the outcome as JSON");
        assert_eq!(outcome["event"], "transfer.succeeded", "{outcome}");
        assert_eq!(outcome["streamId"], stream);
        assert_eq!(outcome["target"], json!({"type": "agent", "id": "a-cli"}));
    }
    let statuses: Vec<(String, u16)> = sim
        .requests()
        .into_iter()
        .map(|r| (r.stream_id, r.status))
        .collect();
    assert_eq!(
        statuses,
        [("st-cli-file".into(), 200), ("st-cli-env".into(), 200)],
        "each bot signed with its own secret"
    );

    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}\n{}", worker.log());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_answers_a_request_like_the_api() {
    let port = free_port();
    let mut command = binary();
    command
        .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--no-callbacks");
    let mut child = Process::start("simulate", command);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            child.is_running(),
            "simulate exited early:\n{}",
            child.log()
        );
        assert!(Instant::now() < until, "simulate never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The default configuration's bot, as `simulate` and `run` both read it.
    let settings = Settings::load_with_env(None, Some(Default::default())).unwrap();
    let bot = &settings.bots[0];
    let send = async |secret: &SecretString| {
        let token = TokenSource::new(bot.client_id.clone(), secret, None, false)
            .token()
            .unwrap();
        http.post(format!(
            "{base}/agentassist/api/v1/public/{}/assign-conversation",
            bot.stream_id
        ))
        .header("auth", token.expose())
        .header("accountid", &bot.account_id)
        .header("content-type", "application/json")
        .body(json!({"orgId": "o-sim", "botSessionId": "s-sim", "aId": "a-sim"}).to_string())
        .send()
        .await
        .expect("simulate answers")
    };
    let accepted = send(bot.client_secret.as_ref().unwrap()).await;
    assert_eq!(accepted.status(), 200);
    let body: Value = serde_json::from_str(&accepted.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "transferred", "{body}");
    assert_eq!(body["agentId"], "a-sim");
    assert_eq!(body["sessionId"], "s-sim");
    // It checks the signature, as the real API does.
    let forged = send(&SecretString::from("not-the-secret")).await;
    assert_eq!(forged.status(), 401);

    let status = child.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_to_its_summary_and_exits_0() {
    let mut command = binary();
    command
        .arg("demo")
        .env("TRANSFER__AMQP__URL", amqp_url())
        .env("NO_COLOR", "1");
    let stdout = succeeded(&output(command, Duration::from_secs(90)).await);
    assert!(stdout.contains("summary"), "{stdout}");
    assert!(stdout.contains("transfer.succeeded"), "{stdout}");
    assert!(stdout.contains("transfer.rejected"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_the_shipped_examples_naming_the_key() {
    let refused = |envs: &[(&str, &str)], config: Option<&std::path::Path>| {
        let mut command = binary();
        command
            .arg("run")
            .env("TRANSFER__AMQP__URL", "amqp://127.0.0.1:9/%2f");
        if let Some(path) = config {
            command.arg("--config").arg(path);
        }
        for (k, v) in envs {
            command.env(k, v);
        }
        command
    };
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let limit = Duration::from_secs(30);
    // No configuration at all: the example relay secret is named first.
    let out = output(refused(&[], None), limit).await;
    assert!(
        !out.status.success(),
        "run started with the shipped defaults"
    );
    assert!(
        stderr(&out).contains("callbacks.secret"),
        "{}",
        stderr(&out)
    );
    // A secret of its own, but too short.
    let short = [("TRANSFER__CALLBACKS__SECRET", "sixteen-bytes-ok")];
    let out = output(refused(&short, None), limit).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("callbacks.secret"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("32"), "{}", stderr(&out));
    // A good secret, but only the example bot.
    let secret = [("TRANSFER__CALLBACKS__SECRET", TEST_CALLBACK_SECRET)];
    let out = output(refused(&secret, None), limit).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid configuration: bots"),
        "{}",
        stderr(&out)
    );
    // A bot of its own that kept the example's secret.
    let example = toml_file(
        "[[bots]]\nstream_id = \"st-own\"\naccount_id = \"own\"\nclient_id = \"cs-own\"\n\
         client_secret = \"demo-secret-change-me\"\n",
    );
    let out = output(refused(&secret, Some(example.path())), limit).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bots[0].client_secret"),
        "{}",
        stderr(&out)
    );
    // `config` still shows the shipped defaults: only `run` refuses them.
    let mut config = binary();
    config.arg("config");
    succeeded(&output(config, limit).await);
}
