//! The Kubernetes manifests (deploy/kubernetes/, docs/kubernetes.md) agree with the binary.
//!
//! Each test renders a kustomization with `kubectl kustomize` (kubectl's `annotate --local`
//! turns the YAML into JSON, offline), then plays the worker's pod: the files its volumes
//! mount are written under a temporary directory that stands for the pod's filesystem, its
//! environment is built from the container's `env` (secrets from the rendered Secrets, the pod
//! name from the downward API), and the real binary's `config` reads the configuration file
//! its arguments name. The settings that result are then held against the manifests: probe
//! and container ports, the termination grace, KEDA's bounds.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use transfer_worker::config::{ConfigError, Settings};

/// The name the downward API gives `metadata.name` in these tests.
const POD_NAME: &str = "transfer-worker-5d8c7b9f4-x2x9q";

/// The objects a kustomization renders.
struct Rendered {
    target: String,
    objects: Vec<Value>,
}

fn kubectl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kubectl (it renders the manifests): {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Rendered {
    /// `kubectl kustomize deploy/kubernetes/<target>`, as JSON objects.
    fn of(target: &str) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes")
            .join(target);
        let yaml = kubectl(&["kustomize", dir.to_str().unwrap()], None);
        // Removing an annotation no object has changes nothing but the format.
        let json = kubectl(
            &[
                "annotate",
                "--local",
                "-f",
                "-",
                "-o",
                "json",
                "transfer-worker-test-",
            ],
            Some(&yaml),
        );
        let objects = serde_json::Deserializer::from_slice(&json)
            .into_iter::<Value>()
            .map(Result::unwrap)
            .collect();
        Self {
            target: target.to_owned(),
            objects,
        }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        (self.objects.iter())
            .filter(|o| o["kind"] == kind)
            .collect()
    }

    /// The one object of `kind`.
    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "{}: expected one {kind}", self.target);
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        (self.objects.iter())
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.target))
    }

    /// The value of `key` in the Secret or ConfigMap `name`, decoded.
    fn key(&self, kind: &str, name: &str, key: &str) -> Vec<u8> {
        let object = self.named(kind, name);
        let value = object["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {kind} {name} has no key {key}", self.target));
        match kind {
            "Secret" => base64::engine::general_purpose::STANDARD
                .decode(value)
                .unwrap(),
            _ => value.as_bytes().to_vec(),
        }
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn pod_spec(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    /// The worker's container: the pod's only one.
    fn container(&self) -> &Value {
        let containers = self.pod_spec()["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{}: one container", self.target);
        &containers[0]
    }

    /// A container port, by name or number, as a number.
    fn container_port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).unwrap();
        }
        let name = port.as_str().expect("a port is a number or a name");
        let ports = self.container()["ports"].as_array().unwrap();
        let found = (ports.iter())
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.target));
        u16::try_from(found["containerPort"].as_u64().unwrap()).unwrap()
    }
}

/// The worker's pod, played on this machine.
struct Pod {
    /// Stands for the pod's filesystem: `/etc/x` is `<root>/etc/x`.
    root: tempfile::TempDir,
    /// The configuration file `run --config` names, its secret files' paths moved under `root`.
    config: PathBuf,
    env: HashMap<String, String>,
}

impl Pod {
    fn of(rendered: &Rendered) -> Self {
        let root = tempfile::tempdir().unwrap();
        let container = rendered.container();
        let volumes = rendered.pod_spec()["volumes"].as_array().unwrap();
        for mount in container["volumeMounts"].as_array().unwrap() {
            let volume = (volumes.iter())
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
            let (kind, name) = if let Some(name) = volume["configMap"]["name"].as_str() {
                ("ConfigMap", name)
            } else if let Some(name) = volume["secret"]["secretName"].as_str() {
                ("Secret", name)
            } else {
                panic!("volume {volume}: only ConfigMaps and Secrets are played here");
            };
            assert!(
                volume["configMap"]["items"].is_null() && volume["secret"]["items"].is_null(),
                "volume {volume}: items are not played here"
            );
            let mount_path = in_root(root.path(), mount["mountPath"].as_str().unwrap());
            if let Some(key) = mount["subPath"].as_str() {
                write(&mount_path, &rendered.key(kind, name, key));
            } else {
                let data = rendered.named(kind, name)["data"].as_object().unwrap();
                for key in data.keys() {
                    write(&mount_path.join(key), &rendered.key(kind, name, key));
                }
            }
        }

        let mut env = HashMap::new();
        for var in container["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap().to_owned();
            let from = &var["valueFrom"];
            let value = if let Some(value) = var["value"].as_str() {
                value.to_owned()
            } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
                POD_NAME.to_owned()
            } else if let Some(secret) = from["secretKeyRef"]["name"].as_str() {
                let key = from["secretKeyRef"]["key"].as_str().unwrap();
                String::from_utf8(rendered.key("Secret", secret, key)).unwrap()
            } else if let Some(map) = from["configMapKeyRef"]["name"].as_str() {
                let key = from["configMapKeyRef"]["key"].as_str().unwrap();
                String::from_utf8(rendered.key("ConfigMap", map, key)).unwrap()
            } else {
                panic!("env {var}: not played here");
            };
            env.insert(name, value);
        }
        assert!(container["envFrom"].is_null(), "envFrom is not played here");

        // `run --config FILE`, FILE mounted from the ConfigMap.
        let args: Vec<&str> = (container["args"].as_array().unwrap().iter())
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args.first(), Some(&"run"), "the container runs the worker");
        let at = args
            .iter()
            .position(|a| *a == "--config")
            .expect("--config");
        let in_pod = in_root(root.path(), args[at + 1]);
        let text = std::fs::read_to_string(&in_pod)
            .unwrap_or_else(|e| panic!("--config {}: not mounted ({e})", args[at + 1]));

        // The secret files it names, where the pod's volumes put them.
        let mut table: toml::Table = toml::from_str(&text).unwrap();
        for bot in (table.get_mut("bots").and_then(toml::Value::as_array_mut))
            .into_iter()
            .flatten()
        {
            if let Some(file) = bot.get("client_secret_file").and_then(toml::Value::as_str) {
                let moved = in_root(root.path(), file);
                bot.as_table_mut().unwrap().insert(
                    "client_secret_file".into(),
                    toml::Value::String(moved.to_str().unwrap().to_owned()),
                );
            }
        }
        let config = root.path().join("config-on-this-machine.toml");
        write(&config, toml::to_string(&table).unwrap().as_bytes());
        Self { root, config, env }
    }

    /// What the real binary's `config` says of this pod's configuration.
    fn check_with_the_binary(&self) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_transfer-worker"))
            .arg("config")
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .envs(&self.env)
            .current_dir(self.root.path())
            .output()
            .unwrap()
    }

    fn settings(&self) -> Settings {
        let out = self.check_with_the_binary();
        assert!(
            out.status.success(),
            "`transfer-worker config` refuses the pod's configuration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Settings::load_with_env(Some(&self.config), Some(self.env.clone())).unwrap()
    }
}

fn in_root(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.strip_prefix('/').expect("an absolute path"))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// What every rendering must agree on with the settings its pod runs with.
fn agrees(rendered: &Rendered, settings: &Settings) {
    let target = &rendered.target;
    let container = rendered.container();

    // The probes reach admin.listen: its port, on every interface of the pod.
    let admin = settings.admin.listen;
    assert!(
        admin.ip().is_unspecified(),
        "{target}: admin.listen is {admin}: the kubelet and Prometheus cannot reach it"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{target}: {probe}");
        assert_eq!(
            rendered.container_port(&get["port"]),
            admin.port(),
            "{target}: {probe} is not on admin.listen ({admin})"
        );
    }

    // The relay's container port is callbacks.listen's, and the Services send each port there.
    let relay: SocketAddr = settings.callbacks.listen;
    assert!(
        relay.ip().is_unspecified(),
        "{target}: callbacks.listen is {relay}"
    );
    assert_eq!(
        rendered.container_port(&Value::from("relay")),
        relay.port(),
        "{target}: the container port `relay` is not callbacks.listen ({relay})"
    );
    for (service, port) in [
        ("transfer-worker-relay", relay.port()),
        ("transfer-worker-metrics", admin.port()),
    ] {
        let ports = rendered.named("Service", service)["spec"]["ports"]
            .as_array()
            .unwrap();
        assert_eq!(ports.len(), 1, "{target}: {service}");
        assert_eq!(
            rendered.container_port(&ports[0]["targetPort"]),
            port,
            "{target}: Service {service} targets another port"
        );
    }

    // SIGKILL never cuts a stop short: the grace, then a call on the wire and its confirm.
    let settle = settings.agentassist.request_timeout + settings.amqp.confirm_timeout;
    let stop = settings.shutdown.grace + settle;
    let termination = Duration::from_secs(
        rendered.pod_spec()["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds is set"),
    );
    assert!(
        termination > stop,
        "{target}: terminationGracePeriodSeconds ({termination:?}) is not above shutdown.grace \
         + agentassist.request_timeout + amqp.confirm_timeout ({stop:?})"
    );

    // Every replica owns work: never more of them than partitions.
    let partitions = u64::from(settings.fleet.partitions);
    if let Some(replicas) = rendered.deployment()["spec"]["replicas"].as_u64() {
        assert!(
            replicas <= partitions.max(1),
            "{target}: {replicas} replicas for {partitions} partitions"
        );
    }
    for scaled in rendered.all("ScaledObject") {
        let spec = &scaled["spec"];
        assert_eq!(
            spec["scaleTargetRef"]["name"],
            rendered.deployment()["metadata"]["name"],
            "{target}: KEDA scales another Deployment"
        );
        let max = spec["maxReplicaCount"].as_u64().expect("maxReplicaCount");
        let min = spec["minReplicaCount"].as_u64().unwrap_or(0);
        assert!(
            max <= partitions,
            "{target}: KEDA's maxReplicaCount ({max}) is above fleet.partitions ({partitions})"
        );
        assert!(min <= max, "{target}: minReplicaCount {min} > max {max}");
        for trigger in spec["triggers"].as_array().unwrap() {
            let queue = trigger["metadata"]["queueName"].as_str().unwrap();
            let escaped = settings.amqp.commands_queue.replace('.', "\\.");
            assert!(
                queue.starts_with(&format!("^{escaped}(")) || queue == settings.amqp.commands_queue,
                "{target}: KEDA counts {queue}, not amqp.commands_queue and its partitions"
            );
        }
    }
    // What KEDA authenticates with exists.
    for auth in rendered.all("TriggerAuthentication") {
        for reference in auth["spec"]["secretTargetRef"].as_array().unwrap() {
            rendered.key(
                "Secret",
                reference["name"].as_str().unwrap(),
                reference["key"].as_str().unwrap(),
            );
        }
    }
}

#[test]
fn the_example_overlay_runs_with_what_its_manifests_give_it() {
    let rendered = Rendered::of("overlays/example");
    let pod = Pod::of(&rendered);
    let settings = pod.settings();
    // `run` would start: the development values are not the shipped examples.
    settings
        .ready_for_production()
        .expect("`run` refuses the example overlay's settings");
    assert_eq!(
        settings.fleet.name, POD_NAME,
        "fleet.name is the pod's name"
    );
    agrees(&rendered, &settings);

    // The Ingress sends callbacks.public_url's host to the relay's Service.
    let ingress = rendered.one("Ingress");
    let rule = &ingress["spec"]["rules"][0];
    let host = rule["host"].as_str().unwrap();
    assert_eq!(
        settings.callbacks.public_url.trim_end_matches('/'),
        format!("https://{host}"),
        "callbacks.public_url is not the Ingress's host"
    );
    let backend = &rule["http"]["paths"][0]["backend"]["service"];
    assert_eq!(backend["name"], "transfer-worker-relay");
    let service = rendered.named("Service", "transfer-worker-relay");
    assert_eq!(backend["port"]["name"], service["spec"]["ports"][0]["name"]);
    assert_eq!(rendered.all("ScaledObject").len(), 1, "the KEDA component");
}

#[test]
fn the_base_is_consistent_but_its_placeholders_cannot_run() {
    let rendered = Rendered::of("base");
    let pod = Pod::of(&rendered);
    let settings = pod.settings();
    agrees(&rendered, &settings);
    match settings.ready_for_production() {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "callbacks.secret"),
        other => panic!("the base's placeholder secrets would run: {other:?}"),
    }
}
