//! Clustered servers on loopback, each member its own process on its own
//! free ports and temp dir, killable and restartable like any
//! [`LocalServer`]: a JetStream cluster of NATS nodes, a Redis Cluster
//! (masters with one replica each, made by `redis-cli --cluster create`)
//! and an etcd cluster. Each waits at start until the cluster serves: a
//! JetStream meta leader, every slot covered, an etcd leader.

use std::time::Duration;

use async_nats::jetstream;

use crate::servers::{LocalServer, StackError, free_port};

/// How long a cluster gets to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

async fn start_all(members: &mut [LocalServer]) -> Result<(), StackError> {
    let started = futures::future::join_all(members.iter_mut().map(LocalServer::start)).await;
    started.into_iter().collect()
}

fn formed_too_late(what: &'static str, port: u16) -> StackError {
    StackError::Timeout { what, port }
}

/// NATS servers clustered with JetStream (`server_name` n1, n2, ...).
pub struct NatsCluster {
    pub nodes: Vec<LocalServer>,
}

impl NatsCluster {
    pub async fn start(size: usize) -> Result<Self, StackError> {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (client, route))| {
                let routes = routes.clone();
                let route = *route;
                LocalServer::prepared(
                    "nats-server",
                    "nats-server",
                    "nats-server",
                    None,
                    *client,
                    move |dir, port| {
                        let file = dir.path().join("node.conf");
                        let store = dir.path().join("jetstream");
                        let conf = format!(
                            "server_name: n{}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\ncluster {{\n  name: resonance\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
                            i + 1,
                            store.display().to_string(),
                        );
                        std::fs::write(&file, conf).expect("the temp dir takes the configuration");
                        vec!["-c".into(), file.display().to_string()]
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        start_all(&mut nodes).await?;
        let cluster = Self { nodes };
        cluster.wait_jetstream().await?;
        Ok(cluster)
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Every node's client URL, comma-separated (as `nats.url` takes them).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    pub fn name(i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Waits until JetStream answers through the cluster (a meta leader
    /// is elected).
    pub async fn wait_jetstream(&self) -> Result<(), StackError> {
        let port = self.nodes[0].port;
        let deadline = tokio::time::Instant::now() + FORM_TIMEOUT;
        loop {
            if let Ok(client) = async_nats::connect(self.urls().as_slice()).await
                && jetstream_answers(&client).await
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(formed_too_late("a NATS JetStream cluster", port));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node that leads `stream`, and the nodes that hold its replicas.
    pub async fn stream_peers(
        &self,
        client: &async_nats::Client,
        stream: &str,
    ) -> Option<(usize, Vec<usize>)> {
        let js = jetstream::new(client.clone());
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        let cluster = info.cluster.clone()?;
        let index = |name: &str| (0..self.nodes.len()).find(|i| Self::name(*i) == name);
        let leader = index(cluster.leader.as_deref()?)?;
        let replicas = cluster
            .replicas
            .iter()
            .filter_map(|r| index(&r.name))
            .collect();
        Some((leader, replicas))
    }
}

/// Whether the JetStream API answers without an error (raw: this server
/// version's account info does not parse into the client's type).
async fn jetstream_answers(client: &async_nats::Client) -> bool {
    let Ok(reply) = client.request("$JS.API.INFO", "".into()).await else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .is_ok_and(|info| info.get("error").is_none() && info.get("type").is_some())
}

/// A free port for a Redis Cluster node whose bus port (port + 10,000) is
/// free too and, like the port, below the ephemeral range, so no client
/// socket takes it before the node binds it.
fn redis_node_port() -> u16 {
    loop {
        let port = free_port();
        if port < 22_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster: `masters` masters, each with one replica.
pub struct RedisCluster {
    pub nodes: Vec<LocalServer>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct RedisNode {
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// Slot ranges it serves (masters only).
    pub slots: Vec<(u16, u16)>,
}

async fn redis_cli(args: &[String]) -> Result<String, StackError> {
    let out = tokio::process::Command::new("redis-cli")
        .args(args)
        .output()
        .await
        .map_err(|cause| StackError::Spawn {
            what: "redis-cli",
            program: "redis-cli".into(),
            package: "redis-tools (with redis-server)",
            cause,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RedisCluster {
    pub async fn start(masters: usize) -> Result<Self, StackError> {
        let mut nodes = (0..masters * 2)
            .map(|_| {
                LocalServer::prepared(
                    "redis-server",
                    "redis-server",
                    "redis-server",
                    None,
                    redis_node_port(),
                    |dir, port| {
                        [
                            "--port",
                            &port.to_string(),
                            "--bind",
                            "127.0.0.1",
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            &dir.path().join("nodes.conf").display().to_string(),
                            // A dead master is replaced after 2 s.
                            "--cluster-node-timeout",
                            "2000",
                            // Replicas in sync at once, not after 5 s: a
                            // replica that never synced cannot take over.
                            "--repl-diskless-sync-delay",
                            "0",
                            // As a production cluster keeps its data: a
                            // restarted node comes back with what it had.
                            "--save",
                            "",
                            "--appendonly",
                            "yes",
                            "--dir",
                            &dir.path().display().to_string(),
                        ]
                        .map(String::from)
                        .to_vec()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        start_all(&mut nodes).await?;
        let mut create = vec!["--cluster".to_string(), "create".to_string()];
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        redis_cli(&create).await?;
        let cluster = Self { nodes };
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The cluster as node `via` sees it.
    pub async fn nodes_seen_by(&self, via: usize) -> Result<Vec<RedisNode>, StackError> {
        let text = redis_cli(&[
            "-p".into(),
            self.nodes[via].port.to_string(),
            "cluster".into(),
            "nodes".into(),
        ])
        .await?;
        Ok(text.lines().filter_map(parse_node).collect())
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_running())
    }

    /// Waits until every running node reports `cluster_state:ok` and sees
    /// every slot served by a master that has not failed, and every replica
    /// is in sync with its master (only then can it take over).
    pub async fn wait_ok(&self) -> Result<(), StackError> {
        let deadline = tokio::time::Instant::now() + FORM_TIMEOUT;
        loop {
            let mut ok = true;
            for i in self.live().collect::<Vec<_>>() {
                let info = redis_cli(&[
                    "-p".into(),
                    self.nodes[i].port.to_string(),
                    "cluster".into(),
                    "info".into(),
                ])
                .await?;
                let covered: u32 = self
                    .nodes_seen_by(i)
                    .await?
                    .iter()
                    .filter(|n| n.master && !n.failed)
                    .flat_map(|n| n.slots.iter())
                    .map(|(a, b)| u32::from(b - a) + 1)
                    .sum();
                let replication = redis_cli(&[
                    "-p".into(),
                    self.nodes[i].port.to_string(),
                    "info".into(),
                    "replication".into(),
                ])
                .await?;
                let synced = replication.contains("role:master")
                    || replication.contains("master_link_status:up");
                ok &= info.contains("cluster_state:ok") && covered == 16384 && synced;
            }
            if ok {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(formed_too_late("a Redis Cluster", self.nodes[0].port));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the running nodes see every slot served by masters
    /// other than `gone` (its replica has taken over).
    pub async fn wait_replaced(&self, gone: usize) -> Result<(), StackError> {
        let port = self.nodes[gone].port;
        let deadline = tokio::time::Instant::now() + FORM_TIMEOUT;
        loop {
            let mut replaced = true;
            for i in self.live().collect::<Vec<_>>() {
                let covered: u32 = self
                    .nodes_seen_by(i)
                    .await?
                    .iter()
                    .filter(|n| n.master && !n.failed && n.port != port)
                    .flat_map(|n| n.slots.iter())
                    .map(|(a, b)| u32::from(b - a) + 1)
                    .sum();
                replaced &= covered == 16384;
            }
            if replaced {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(formed_too_late("a Redis Cluster failover", port));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the master serving `key`.
    pub async fn master_of(&self, key: &str) -> Result<usize, StackError> {
        let via = self.live().next().expect("a running node");
        let slot: u16 = redis_cli(&[
            "-p".into(),
            self.nodes[via].port.to_string(),
            "cluster".into(),
            "keyslot".into(),
            key.into(),
        ])
        .await?
        .trim()
        .parse()
        .expect("CLUSTER KEYSLOT answers a number");
        let nodes = self.nodes_seen_by(via).await?;
        let port = nodes
            .iter()
            .find(|n| {
                n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .map(|n| n.port)
            .expect("every slot is served");
        Ok(self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster"))
    }
}

/// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots>...`
fn parse_node(line: &str) -> Option<RedisNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields
        .get(1)?
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|one| (one, one)),
        })
        .collect();
    Some(RedisNode {
        port,
        master: flags.contains("master"),
        failed: flags.contains("fail"),
        slots,
    })
}

/// etcd members (e1, e2, ...) forming one cluster.
pub struct EtcdCluster {
    pub members: Vec<LocalServer>,
}

impl EtcdCluster {
    pub async fn start(size: usize) -> Result<Self, StackError> {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{}=http://127.0.0.1:{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let initial = initial.clone();
                let peer = *peer;
                // /health answers 200 only once the member has a leader.
                LocalServer::prepared(
                    "etcd",
                    "etcd",
                    "etcd-server",
                    Some("/health"),
                    *client,
                    move |dir, port| {
                        let client = format!("http://127.0.0.1:{port}");
                        let peer = format!("http://127.0.0.1:{peer}");
                        [
                            "--name",
                            &format!("e{}", i + 1),
                            "--data-dir",
                            &dir.path().join("data").display().to_string(),
                            "--listen-client-urls",
                            &client,
                            "--advertise-client-urls",
                            &client,
                            "--listen-peer-urls",
                            &peer,
                            "--initial-advertise-peer-urls",
                            &peer,
                            "--initial-cluster",
                            &initial,
                            "--initial-cluster-state",
                            "new",
                            "--initial-cluster-token",
                            "resonance-test",
                        ]
                        .map(String::from)
                        .to_vec()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        start_all(&mut members).await?;
        Ok(Self { members })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.port))
            .collect()
    }

    /// The index of the member that leads, as a running member reports it.
    pub async fn leader(&self) -> Option<usize> {
        let http = crate::http_client().build().ok()?;
        let mut ids = Vec::new();
        let mut leader = None;
        for m in &self.members {
            if !m.is_running() {
                ids.push(None);
                continue;
            }
            let status: serde_json::Value = http
                .post(format!("http://127.0.0.1:{}/v3/maintenance/status", m.port))
                .body("{}")
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            ids.push(status["header"]["member_id"].as_str().map(String::from));
            leader = leader.or_else(|| status["leader"].as_str().map(String::from));
        }
        let leader = leader?;
        ids.iter()
            .position(|id| id.as_deref() == Some(leader.as_str()))
    }
}
