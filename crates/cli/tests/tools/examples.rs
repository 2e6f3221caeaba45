//! Every command's `--help` carries an example, and the examples of the
//! commands that do one thing and exit run as printed against a live stack
//! (NATS, etcd, Redis and a database, wired through the environment as
//! `scripts/demo.sh --keep` prints it).

use std::collections::BTreeMap;
use std::path::Path;

use resonance_testkit::harness::*;

/// Commands that run until stopped, need gateways, or start stacks of
/// their own for minutes: their examples are shown, not run here.
const NOT_RUN: &[&str] = &["run", "notify", "gateway", "workload", "chaos", "bench"];

fn help(path: &[&str]) -> String {
    let out = std::process::Command::new(pod_binary())
        .args(path)
        .arg("--help")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{path:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Subcommand names listed under `Commands:`.
fn subcommands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The command lines under `Example...:` headings.
fn examples(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("Example") {
            inside = true;
        } else if inside && line.starts_with("  ") {
            found.push(line.trim().to_string());
        } else {
            inside = false;
        }
    }
    found
}

/// Every command path with its help text.
fn commands() -> BTreeMap<Vec<String>, String> {
    let mut all = BTreeMap::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        for sub in subcommands(&text) {
            let mut child = path.clone();
            child.push(sub);
            todo.push(child);
        }
        if !path.is_empty() {
            all.insert(path, text);
        }
    }
    all
}

/// Runs one example line (`NAME=value ... resonance-task args...`) in
/// `dir` with `env`; its own assignments win.
fn run_example(line: &str, dir: &Path, env: &[(String, String)]) -> std::process::Output {
    let mut words = line.split_whitespace().peekable();
    let mut own = Vec::new();
    while let Some(w) = words.next_if(|w| w.contains('=') && !w.starts_with('-')) {
        let (k, v) = w.split_once('=').unwrap();
        own.push((k.to_string(), v.to_string()));
    }
    assert_eq!(words.next(), Some("resonance-task"), "{line}");
    std::process::Command::new(pod_binary())
        .args(words)
        .current_dir(dir)
        .env_remove("RESONANCE_TASK_CONFIG")
        .envs(env.iter().cloned())
        .envs(own)
        .output()
        .expect("the binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_an_example_and_the_one_shot_ones_work() {
    let all = commands();
    for name in [
        "dlq",
        "offline",
        "run",
        "bench",
        "offline pull",
        "dlq replay",
    ] {
        let path: Vec<String> = name.split(' ').map(String::from).collect();
        assert!(
            all.contains_key(&path),
            "{name} not found in {:?}",
            all.keys()
        );
    }
    let missing: Vec<_> = all
        .iter()
        .filter(|(_, text)| examples(text).is_empty())
        .map(|(path, _)| path.join(" "))
        .collect();
    assert!(missing.is_empty(), "no example in --help of: {missing:?}");

    let stack = Stack::start().await;
    let config = stack.config();
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("RESONANCE_TASK__NATS__URL".to_string(), stack.nats_url()),
        (
            "RESONANCE_TASK__ETCD__ENDPOINTS".to_string(),
            config.etcd.endpoints[0].clone(),
        ),
        (
            "RESONANCE_TASK__REDIS__ADDR".to_string(),
            config.redis.addr.clone(),
        ),
        (
            "RESONANCE_TASK__DATABASE__URL".to_string(),
            stack.db.url.clone(),
        ),
        ("RESONANCE_TASK__LOG__LEVEL".to_string(), "warn".to_string()),
    ];
    // Sessions first, as on the demo stack, so the examples that name one
    // find it.
    let mut ran = 0;
    let order = |path: &Vec<String>| (path[0] != "seed", path.clone());
    let mut paths: Vec<_> = all.keys().cloned().collect();
    paths.sort_by_key(order);
    for path in paths {
        if NOT_RUN.contains(&path[0].as_str()) {
            continue;
        }
        for line in examples(&all[&path]) {
            if !line.contains(&format!("resonance-task {}", path.join(" "))) {
                // An example that shows another command alongside.
                continue;
            }
            let out = run_example(&line, dir.path(), &env);
            assert!(
                out.status.success(),
                "`{line}` failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("ran: {line}");
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} examples ran");
}
