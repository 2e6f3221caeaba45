//! Checks of files no test run would otherwise load, runnable without
//! Docker or a cluster: the compose stack, the Dockerfile, the Kubernetes
//! manifests, the Prometheus rules and the Grafana dashboard are parsed and
//! cross-checked against the code (config keys, ports, probe paths, metric
//! names); the README's two commands stay in step with CI.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use resonance_task::config::Config;

/// The repository: this crate is `crates/cli`.
fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<serde_yaml::Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// Loads the shipped config file with `env` on top, as a pod would.
#[allow(clippy::result_large_err)]
fn load_with_env(yaml: Option<&str>, env: &[(String, String)]) -> Result<Config, String> {
    let mut out = Err(String::new());
    figment::Jail::expect_with(|jail| {
        let path: Option<PathBuf> = yaml.map(|y| {
            jail.create_file("task.yaml", y).unwrap();
            PathBuf::from("task.yaml")
        });
        for (k, v) in env {
            jail.set_env(k, v);
        }
        out = Config::load(path.as_deref()).map_err(|e| e.to_string());
        Ok(())
    });
    out
}

/// Every `resonance_*` metric name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("resonance_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = tail[..end].to_string();
        for suffix in ["_bucket", "_count", "_sum"] {
            if let Some(stripped) = name.strip_suffix(suffix) {
                name = stripped.to_string();
            }
        }
        names.insert(name);
        rest = &tail[end..];
    }
    names
}

/// Every metric the code defines.
fn known_metrics() -> BTreeSet<String> {
    let mut known = metric_names(&read("crates/task/src/telemetry/metrics.rs"));
    known.extend(
        metric_names(&read("crates/reference-gateway/src/lib.rs"))
            .into_iter()
            .filter(|n| n.starts_with("resonance_gateway_")),
    );
    known
}

#[test]
fn compose_stack_parses_and_matches_the_code() {
    let mut compose = yaml_docs("docker-compose.yml").remove(0);
    compose.apply_merge().expect("YAML merge keys resolve");
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "nats",
        "etcd",
        "redis",
        "mysql",
        "task-1",
        "task-2",
        "gateway-1",
        "gateway-2",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    let mut built = BTreeSet::new();
    for (name, service) in services {
        if service.get("build").is_some() {
            assert!(
                root().join("Dockerfile").exists(),
                "{name:?} builds the Dockerfile"
            );
            built.insert(
                service["image"]
                    .as_str()
                    .expect("a built service names its image")
                    .to_string(),
            );
        }
    }
    let mut mounts = 0;
    for (name, service) in services {
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name:?} has an image"));
        assert!(image.contains(':'), "{name:?} pins an image tag");
        if image.starts_with("resonance-task") {
            assert!(
                built.contains(image),
                "{name:?} uses {image}, which a service builds"
            );
            let env: Vec<(String, String)> = service["environment"]
                .as_mapping()
                .expect("environment")
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect();
            load_with_env(None, &env).unwrap_or_else(|e| panic!("{name:?} environment: {e}"));
        }
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(
                    root().join(source).exists(),
                    "{name:?} mounts missing {source}"
                );
                mounts += 1;
            }
        }
    }
    assert!(
        mounts >= 4,
        "migrations, prometheus and grafana files are mounted"
    );
    // The `cluster` profile: three NATS nodes, six Redis nodes made a
    // cluster, three etcd members, and a pod and a gateway on them alone.
    let clustered: Vec<&str> = services
        .iter()
        .filter(|(_, s)| {
            s["profiles"]
                .as_sequence()
                .is_some_and(|p| p.iter().any(|p| p == "cluster"))
        })
        .map(|(name, _)| name.as_str().unwrap())
        .collect();
    for name in [
        "nats-1",
        "nats-2",
        "nats-3",
        "redis-c1",
        "redis-c6",
        "redis-cluster-init",
        "etcd-1",
        "etcd-3",
        "task-c1",
        "gateway-c1",
    ] {
        assert!(clustered.contains(&name), "{name} in the cluster profile");
    }
    let env = |name: &str| -> Vec<(String, String)> {
        services[name]["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
            .collect()
    };
    let pod = load_with_env(None, &env("task-c1")).unwrap();
    assert_eq!(pod.consumer.stream_replicas, 3);
    assert_eq!(pod.nats.url.expose().split(',').count(), 3);
    assert_eq!(pod.redis.cluster_addrs.len(), 6);
    assert_eq!(pod.etcd.endpoints.len(), 3);
    let gateway = load_with_env(None, &env("gateway-c1")).unwrap();
    assert_eq!(gateway.redis.cluster_addrs, pod.redis.cluster_addrs);

    let prometheus = &yaml_docs("deploy/prometheus/prometheus.yml")[0];
    let targets = serde_yaml::to_string(&prometheus["scrape_configs"]).unwrap();
    for target in [
        "task-1:9090",
        "task-2:9090",
        "gateway-1:9191",
        "gateway-2:9191",
    ] {
        assert!(targets.contains(target), "prometheus scrapes {target}");
    }
}

#[test]
fn dockerfile_builds_from_files_that_exist_and_runs_as_non_root() {
    let dockerfile = read("Dockerfile");
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                root().join(source).exists(),
                "Dockerfile copies missing {source}"
            );
        }
    }
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root:root")),
        "runs as non-root"
    );
    assert!(dockerfile.contains("EXPOSE 9090"), "exposes the admin port");
}

#[test]
fn kubernetes_manifests_match_the_code() {
    let mut kinds = BTreeSet::new();
    let mut config_yaml = None;
    let mut deployment = None;
    for file in ["configmap.yaml", "deployment.yaml", "pdb.yaml", "hpa.yaml"] {
        for doc in yaml_docs(&format!("deploy/kubernetes/{file}")) {
            let kind = doc["kind"].as_str().expect("kind").to_string();
            if kind == "ConfigMap" {
                config_yaml = Some(doc["data"]["task.yaml"].as_str().unwrap().to_string());
            }
            if kind == "Deployment" {
                deployment = Some(doc.clone());
            }
            kinds.insert(kind);
        }
    }
    for kind in [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(kinds.contains(kind), "{kind}");
    }
    let deployment = deployment.unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            e["name"]
                .as_str()
                .filter(|n| n.starts_with("RESONANCE_TASK__"))
                .map(String::from)
        })
        .map(|k| {
            let v = if k.ends_with("URL") {
                "mysql://task@mysql:3306/resonance"
            } else {
                "x"
            };
            (k, v.to_string())
        })
        .collect();
    let config = load_with_env(config_yaml.as_deref(), &env)
        .expect("ConfigMap and env make a valid configuration");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        u64::from(config.admin.listen.port()),
        port,
        "probes reach the admin port"
    );
    let admin = read("crates/task/src/telemetry/admin.rs");
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        assert!(
            admin.contains(&format!("\"{path}\"")),
            "{probe} path {path} is served"
        );
    }
    // The clustered variant: same pods, the engines' clusters, R3 streams.
    let clustered = yaml_docs("deploy/kubernetes/cluster/configmap.yaml");
    assert_eq!(clustered[0]["metadata"]["name"], "resonance-task");
    let clustered = load_with_env(clustered[0]["data"]["task.yaml"].as_str(), &env)
        .expect("the clustered ConfigMap and env make a valid configuration");
    assert_eq!(clustered.consumer.stream_replicas, 3);
    assert_eq!(clustered.nats.url.expose().split(',').count(), 3);
    assert_eq!(clustered.redis.cluster_addrs.len(), 6);
    assert_eq!(clustered.etcd.endpoints.len(), 3);
    assert_eq!(clustered.admin.listen, config.admin.listen);

    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace > config.consumer.shutdown_grace.as_secs(),
        "Kubernetes waits for the drain"
    );
}

#[test]
fn alert_rules_and_dashboard_use_metrics_that_exist() {
    let known = known_metrics();
    let alerts = read("deploy/prometheus/alerts.yml");
    let rules = &yaml_docs("deploy/prometheus/alerts.yml")[0]["groups"][0]["rules"];
    assert!(rules.as_sequence().unwrap().len() >= 5);
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/resonance-task.json")).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 6);
    for (what, text) in [("alerts", alerts), ("dashboard", dashboard.to_string())] {
        let used = metric_names(&text);
        assert!(!used.is_empty());
        for name in used {
            assert!(
                known.contains(&name),
                "{what} uses {name}, which the code does not define"
            );
        }
    }
}

/// `promtool` (Debian's `prometheus` package, which the scripts install)
/// checks the rules and runs their unit tests: every alert has a case where
/// it fires, with its labels and text, and one where it stays quiet.
#[test]
fn alert_rules_pass_promtool_and_every_alert_has_a_unit_test() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(root())
            .output()
            .expect("promtool is installed (scripts/lib.sh installs the prometheus package)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    run(&["test", "rules", "deploy/prometheus/alerts.test.yml"]);
    let tests = read("deploy/prometheus/alerts.test.yml");
    let rules = &yaml_docs("deploy/prometheus/alerts.yml")[0]["groups"][0]["rules"];
    for rule in rules.as_sequence().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        let cases = tests.matches(&format!("alertname: {name}\n")).count();
        assert!(
            cases >= 2,
            "{name} needs a case where it fires and one where it does not ({cases} found)"
        );
    }
}

#[test]
fn readme_opens_with_the_two_commands_ci_runs() {
    let readme = read("README.md");
    let block = readme
        .split("```")
        .nth(1)
        .expect("a code block near the top");
    let commands: Vec<&str> = block
        .lines()
        .skip(1)
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands, ["bash scripts/demo.sh", "bash scripts/test.sh"]);
    let ci = read(".ci/run");
    assert!(
        ci.contains("bash scripts/test.sh"),
        "CI runs the README's test command"
    );
    for script in ["scripts/demo.sh", "scripts/test.sh"] {
        assert!(root().join(script).exists(), "{script}");
    }
}

/// The names in one `[section]` of a manifest (`name = ...` or
/// `name.workspace = true` lines).
fn manifest_names(manifest: &str, section: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == section;
            continue;
        }
        if inside && let Some((name, _)) = line.split_once('=') {
            let name = name.trim();
            let name = name.strip_suffix(".workspace").unwrap_or(name);
            if !name.is_empty() && !name.starts_with('#') {
                names.push(name.to_string());
            }
        }
    }
    names
}

#[test]
fn the_service_crate_depends_on_no_tool_and_no_dev_only_crate() {
    let manifest = read("crates/task/Cargo.toml");
    let all: Vec<String> = [
        "[dependencies]",
        "[dev-dependencies]",
        "[build-dependencies]",
    ]
    .iter()
    .flat_map(|s| manifest_names(&manifest, s))
    .collect();
    assert!(
        all.iter().any(|d| d == "async-nats"),
        "manifest read: {all:?}"
    );
    for banned in [
        "resonance-notify",
        "resonance-reference-gateway",
        "resonance-testkit",
        "resonance-devtools",
        "rcgen",
        "plotters",
        "hdrhistogram",
        "tempfile",
    ] {
        assert!(
            !all.iter().any(|d| d == banned),
            "the service crate depends on {banned}"
        );
    }
    let cli = read("crates/cli/Cargo.toml");
    let cli_deps = manifest_names(&cli, "[dependencies]");
    for tool in [
        "resonance-devtools",
        "resonance-reference-gateway",
        "resonance-testkit",
    ] {
        let line = cli
            .lines()
            .find(|l| l.starts_with(&format!("{tool} =")))
            .unwrap_or_else(|| panic!("the command line names {tool}: {cli_deps:?}"));
        assert!(line.contains("optional = true"), "{tool} is optional");
    }
    // The default target is the last stage: the production image. It must
    // copy the binary from a stage built without the developer tools.
    let dockerfile = read("Dockerfile");
    let last_stage = dockerfile.rsplit("\nFROM ").next().expect("a final stage");
    let built_from = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("COPY --from="))
        .and_then(|l| l.split_whitespace().next())
        .expect("the final stage copies the binary from a build stage");
    let build_stage = dockerfile
        .split("\nFROM ")
        .find(|stage| stage.contains(&format!(" AS {built_from}")))
        .unwrap_or_else(|| panic!("no stage {built_from}"));
    assert!(
        build_stage.contains("cargo build") && build_stage.contains("--no-default-features"),
        "the production image builds without the developer tools: {build_stage}"
    );
}
