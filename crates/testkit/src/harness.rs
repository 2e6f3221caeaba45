//! Test harness: private `nats-server -js`, `etcd` and `redis-server`
//! processes on free loopback ports with their own temp dirs (so tests run
//! in parallel and can kill and restart them), SQL databases created per
//! test on SQLite, MariaDB and PostgreSQL, in-process task pods and
//! reference gateways.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use tempfile::TempDir;

use resonance_reference_gateway::{ReferenceGateway, ReferenceGatewayOptions};
use resonance_task::config::{Config, SecretUrl};
use resonance_task::proto::PushEvent;
use resonance_task::store::{Dialect, MemberStore, SessionSeed, connect_database, migrate};

/// Generous bound for anything a test waits on; a healthy run takes far less.
pub const PATIENCE: Duration = Duration::from_secs(60);

use crate::servers;
pub use crate::servers::{LocalServer, free_port};

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database created for one test.
pub struct TestDb {
    pub url: String,
    admin: Option<(Dialect, String, String)>,
    _dir: Option<TempDir>,
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("task.db").display());
        Self {
            url,
            admin: None,
            _dir: Some(dir),
        }
    }

    /// A fresh database of each dialect: SQLite, MariaDB, PostgreSQL.
    pub async fn every_dialect() -> [Self; 3] {
        [Self::sqlite(), Self::mysql().await, Self::postgres().await]
    }

    /// A fresh database on the machine's MariaDB (127.0.0.1:3306, root).
    pub async fn mysql() -> Self {
        Self::server(Dialect::MySql, "mysql://root@127.0.0.1:3306/test", |name| {
            format!("mysql://root@127.0.0.1:3306/{name}")
        })
        .await
    }

    /// A fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust).
    pub async fn postgres() -> Self {
        Self::server(
            Dialect::Postgres,
            "postgres://postgres@127.0.0.1:5432/test",
            |name| format!("postgres://postgres@127.0.0.1:5432/{name}"),
        )
        .await
    }

    async fn server(dialect: Dialect, admin_url: &str, url_of: impl Fn(&str) -> String) -> Self {
        let name = unique("rt");
        admin_exec(admin_url, &format!("CREATE DATABASE {name}")).await;
        Self {
            url: url_of(&name),
            admin: Some((dialect, admin_url.to_string(), name)),
            _dir: None,
        }
    }

    /// The same database reached through another port (a fault proxy).
    pub fn url_via(&self, port: u16) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("server URL");
        let (authority, path) = rest.split_once('/').expect("URL with a database");
        let (userinfo, _) = authority.rsplit_once('@').expect("URL with a user");
        format!("{scheme}://{userinfo}@127.0.0.1:{port}/{path}")
    }

    pub async fn member_store(&self) -> MemberStore {
        let mut cfg = Config::default().database;
        cfg.url = SecretUrl::new(self.url.clone());
        let (pool, dialect) = connect_database(&cfg)
            .await
            .expect("test database reachable");
        migrate(&pool, dialect, &cfg)
            .await
            .expect("migrations apply");
        MemberStore::new(pool, dialect)
    }

    /// Drops a server database (SQLite files go with their temp dir).
    pub async fn drop_database(mut self) {
        if let Some(admin) = self.admin.take() {
            drop_server_database(admin).await;
        }
    }
}

/// A database not dropped by the test (it failed, say) is dropped here, on
/// a thread of its own: `Drop` cannot wait inside the test's runtime.
impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(admin) = self.admin.take() {
            let dropped = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the drop")
                    .block_on(drop_server_database(admin));
            });
            let _ = dropped.join();
        }
    }
}

async fn drop_server_database((dialect, admin_url, name): (Dialect, String, String)) {
    let force = if dialect == Dialect::Postgres {
        " WITH (FORCE)"
    } else {
        ""
    };
    admin_exec(
        &admin_url,
        &format!("DROP DATABASE IF EXISTS {name}{force}"),
    )
    .await;
}

async fn admin_exec(admin_url: &str, sql: &str) {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {admin_url}: {e}"));
    conn.execute(sqlx::AssertSqlSafe(sql.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// NATS, etcd and Redis of one test, and its database.
pub struct Stack {
    pub nats: LocalServer,
    pub etcd: LocalServer,
    pub redis: LocalServer,
    pub db: TestDb,
}

impl Stack {
    pub async fn start() -> Self {
        Self::with_db(TestDb::sqlite()).await
    }

    pub async fn with_db(db: TestDb) -> Self {
        let (nats, etcd, redis) = tokio::join!(
            servers::nats_server(),
            servers::etcd_server(),
            servers::redis_server()
        );
        Self {
            nats: nats.expect("nats-server starts"),
            etcd: etcd.expect("etcd starts"),
            redis: redis.expect("redis-server starts"),
            db,
        }
    }

    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats.port)
    }

    /// Configuration of a pod wired to this stack, with short timeouts so
    /// failures show quickly.
    pub fn config(&self) -> Config {
        let mut c = quick_config(&self.db);
        crate::engines::wire_servers(&mut c, &self.nats, &self.etcd, &self.redis);
        c
    }

    /// A NATS client and an in-process pod that has bound its consumer.
    pub async fn pod(&self, config: &Config) -> (async_nats::Client, Pod) {
        let nats = self.nats().await;
        let pod = Pod::start(config.clone());
        wait_consuming(&nats, config).await;
        (nats, pod)
    }

    pub async fn nats(&self) -> async_nats::Client {
        async_nats::connect(self.nats_url())
            .await
            .expect("test NATS reachable")
    }

    pub fn gateway_options(&self, gateway_id: &str, users: &[&str]) -> ReferenceGatewayOptions {
        gateway_options(&self.config(), gateway_id, users)
    }

    pub async fn gateway(&self, gateway_id: &str, users: &[&str]) -> ReferenceGateway {
        ReferenceGateway::start(self.gateway_options(gateway_id, users))
            .await
            .expect("reference gateway starts")
    }

    /// A gateway that answers every push `reply_delay` after it arrived;
    /// per-user `PushService` only unless `batch`.
    pub async fn slow_gateway(
        &self,
        gateway_id: &str,
        users: &[&str],
        reply_delay: Duration,
        batch: bool,
    ) -> ReferenceGateway {
        let mut opts = self.gateway_options(gateway_id, users);
        opts.reply_delay = reply_delay;
        opts.batch = batch;
        ReferenceGateway::start(opts)
            .await
            .expect("reference gateway starts")
    }

    /// A gateway like the upstream ones: per-user `PushService` only, no
    /// batch-v1 advertised.
    pub async fn upstream_gateway(&self, gateway_id: &str, users: &[&str]) -> ReferenceGateway {
        let mut opts = self.gateway_options(gateway_id, users);
        opts.batch = false;
        ReferenceGateway::start(opts)
            .await
            .expect("reference gateway starts")
    }

    /// A gateway that task pods reach only through a fault proxy (its etcd
    /// record advertises the proxy's port).
    pub async fn gateway_behind_proxy(
        &self,
        gateway_id: &str,
        users: &[&str],
    ) -> (ReferenceGateway, crate::fault_proxy::FaultProxy) {
        let mut opts = self.gateway_options(gateway_id, users);
        let port = free_port();
        opts.grpc_listen = ([127, 0, 0, 1], port).into();
        let proxy = crate::fault_proxy::FaultProxy::start(([127, 0, 0, 1], port).into())
            .await
            .expect("proxy starts");
        opts.advertise_port = Some(proxy.addr.port());
        let gateway = ReferenceGateway::start(opts)
            .await
            .expect("reference gateway starts");
        (gateway, proxy)
    }

    pub async fn session(&self, store: &MemberStore, session_id: &str, members: &[&str]) {
        create_session(store, session_id, members).await;
    }
}

/// A reference gateway's options wired to `c`'s etcd and Redis.
pub fn gateway_options(c: &Config, gateway_id: &str, users: &[&str]) -> ReferenceGatewayOptions {
    let c = c.clone();
    ReferenceGatewayOptions {
        gateway_id: gateway_id.into(),
        instance_id: None,
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        advertise_host: "127.0.0.1".into(),
        advertise_port: None,
        http_listen: None,
        users: users.iter().map(|u| u.to_string()).collect(),
        write_routes: true,
        etcd: c.etcd,
        redis: c.redis,
        namespace: c.registry.namespace,
        service_name: c.gateway_service_name.0,
        lease_ttl: Duration::from_secs(10),
        reply_delay: Duration::ZERO,
        refuse_streams: 0,
        journal: None,
        batch: true,
        track_deliveries: true,
        tls: None,
    }
}

/// A session of `members` (one-to-one when there are two).
pub async fn create_session(store: &MemberStore, session_id: &str, members: &[&str]) {
    store
        .create_session(&SessionSeed {
            session_id: session_id.into(),
            kind: if members.len() == 2 { 1 } else { 2 },
            name: session_id.into(),
            owner: members[0].into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        })
        .await
        .expect("session created");
}

/// The settings every test stack shares: short timeouts so failures show
/// quickly, an admin port of the OS's choosing, the test's database.
fn quick_config(db: &TestDb) -> Config {
    let mut c = Config::default();
    c.database.url = SecretUrl::new(db.url.clone());
    c.database.migrate_on_start = Some(true);
    c.consumer.retry_interval = Duration::from_millis(500);
    c.consumer.ack_wait = Duration::from_secs(10);
    c.consumer.worker_count = 16;
    c.gateway.request_timeout = Duration::from_secs(2);
    c.gateway.max_backoff = Duration::from_millis(500);
    c.log.level = "info".into();
    c.admin.listen = ([127, 0, 0, 1], 0).into();
    c
}

/// The clustered stack: 3 NATS nodes with JetStream, a Redis Cluster of 3
/// masters and 3 replicas, 3 etcd members, and a database; pods use R3
/// streams.
pub struct ClusterStack {
    pub nats: crate::cluster::NatsCluster,
    pub redis: crate::cluster::RedisCluster,
    pub etcd: crate::cluster::EtcdCluster,
    pub db: TestDb,
}

impl ClusterStack {
    pub async fn start() -> Self {
        let (nats, redis, etcd) = tokio::join!(
            crate::cluster::NatsCluster::start(3),
            crate::cluster::RedisCluster::start(3),
            crate::cluster::EtcdCluster::start(3)
        );
        Self {
            nats: nats.expect("NATS cluster forms"),
            redis: redis.expect("Redis Cluster forms"),
            etcd: etcd.expect("etcd cluster forms"),
            db: TestDb::sqlite(),
        }
    }

    pub fn config(&self) -> Config {
        let mut c = quick_config(&self.db);
        crate::engines::wire_clusters(&mut c, &self.nats, &self.etcd, &self.redis);
        c
    }

    /// A NATS client that knows every node.
    pub async fn nats(&self) -> async_nats::Client {
        async_nats::connect(self.nats.urls().as_slice())
            .await
            .expect("test NATS cluster reachable")
    }

    /// A NATS client and an in-process pod that has bound its consumer.
    pub async fn pod(&self, config: &Config) -> (async_nats::Client, Pod) {
        let nats = self.nats().await;
        let pod = Pod::start(config.clone());
        wait_consuming(&nats, config).await;
        (nats, pod)
    }

    pub async fn gateway(&self, gateway_id: &str, users: &[&str]) -> ReferenceGateway {
        ReferenceGateway::start(gateway_options(&self.config(), gateway_id, users))
            .await
            .expect("reference gateway starts")
    }
}

/// A task pod running in-process.
pub struct Pod {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), resonance_task::RunError>>,
}

impl Pod {
    pub fn start(config: Config) -> Self {
        resonance_task::telemetry::init(&config.log);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(resonance_task::run(config, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Graceful shutdown; panics if the pod failed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task)
            .await
            .expect("pod task")
            .expect("pod ran cleanly");
    }

    /// Aborts the pod without any shutdown work (like SIGKILL).
    pub fn abort(self) {
        self.task.abort();
    }
}

pub fn event(msg_id: i64, session_id: &str, from: &str) -> PushEvent {
    PushEvent {
        msg_id,
        seq_id: msg_id,
        session_id: session_id.into(),
        from_username: from.into(),
        content: format!("message {msg_id}"),
        r#type: "text".into(),
        timestamp: resonance_task::clock::now_ms(),
        session_type: 2,
        ..Default::default()
    }
}

/// Publishes like the logic service: plain core NATS.
pub async fn publish(nats: &async_nats::Client, subject: &str, event: &PushEvent) {
    nats.publish(subject.to_string(), event.encode_to_vec().into())
        .await
        .expect("publish");
    nats.flush().await.expect("flush");
}

/// Polls `check` until it holds; panics with `what` after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until a dead letter matching `found` is stored.
pub async fn wait_dead_lettered(
    nats: &async_nats::Client,
    config: &Config,
    what: &str,
    found: impl Fn(&resonance_task::consumer::dlq::DeadLetter) -> bool,
) {
    let js = jetstream::new(nats.clone());
    eventually(what, || async {
        resonance_task::consumer::dlq::list(&js, &config.consumer)
            .await
            .is_ok_and(|letters| letters.iter().any(&found))
    })
    .await;
}

/// Waits until the durable consumer has nothing pending or unacked: every
/// published event was settled.
pub async fn wait_settled(nats: &async_nats::Client, config: &Config) {
    let js = jetstream::new(nats.clone());
    eventually("all events acked", || {
        let js = js.clone();
        async move {
            let Ok(stream) = js.get_stream(&config.consumer.stream).await else {
                return false;
            };
            let Ok(mut consumer) = stream
                .get_consumer::<jetstream::consumer::pull::Config>(&config.consumer.queue_group)
                .await
            else {
                return false;
            };
            match consumer.info().await {
                Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
                Err(_) => false,
            }
        }
    })
    .await;
}

/// Waits until the pod's registry-facing readiness is observable: the
/// stream and durable consumer exist.
pub async fn wait_consuming(nats: &async_nats::Client, config: &Config) {
    let js = jetstream::new(nats.clone());
    eventually("pod bound its consumer", || {
        let js = js.clone();
        async move {
            match js.get_stream(&config.consumer.stream).await {
                Ok(stream) => stream
                    .get_consumer::<jetstream::consumer::pull::Config>(&config.consumer.queue_group)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
}

/// The `resonance-task` binary beside the running test's: cargo builds a
/// package's binaries before its integration tests, into the directory
/// above the tests' `deps`. `RESONANCE_TASK_BIN` overrides it.
pub fn pod_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("RESONANCE_TASK_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test binary has a path");
    let mut dir = exe.parent().expect("the test binary is in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps is in the profile directory");
    }
    let binary = dir.join("resonance-task");
    assert!(
        binary.exists(),
        "{} is missing: run the tests of the command-line package (cargo test -p resonance-task-cli)",
        binary.display()
    );
    binary
}

/// A task pod running as its own process (the real binary), for signals.
pub struct PodProcess {
    child: std::process::Child,
    _config: tempfile::NamedTempFile,
    pub log: std::path::PathBuf,
    _log_dir: TempDir,
}

impl PodProcess {
    pub fn spawn(config: &Config) -> Self {
        Self::spawn_with_env(config, &[])
    }

    /// [`PodProcess::spawn`] with extra environment variables (secrets the
    /// written configuration cannot carry: it is printed redacted).
    pub fn spawn_with_env(config: &Config, env: &[(&str, String)]) -> Self {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(serde_yaml::to_string(config).unwrap().as_bytes())
            .unwrap();
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("pod.log");
        let child = std::process::Command::new(pod_binary())
            .arg("--config")
            .arg(file.path())
            .arg("run")
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("pod binary starts");
        Self {
            child,
            _config: file,
            log,
            _log_dir: log_dir,
        }
    }

    pub fn signal(&self, signal: &str) {
        crate::servers::signal(self.child.id(), signal).expect("signal the pod");
    }

    /// Waits for the process to exit; its status and everything it logged.
    pub async fn wait_with_log(mut self) -> (std::process::ExitStatus, String) {
        let status = self.wait_in_place().await;
        (status, self.log_text())
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        self.wait_in_place().await
    }

    async fn wait_in_place(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pod did not exit; log: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared durable consumer's state.
pub async fn consumer_info(
    nats: &async_nats::Client,
    config: &Config,
) -> jetstream::consumer::Info {
    let js = jetstream::new(nats.clone());
    let mut consumer = js
        .get_stream(&config.consumer.stream)
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>(&config.consumer.queue_group)
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}
