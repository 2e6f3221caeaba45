//! TLS and credentials on every hop, on real servers: nats-server with
//! mutual TLS and users (password and NKey), redis-server with TLS and an
//! ACL user (the default user off), etcd with TLS and auth enabled, and
//! reference gateways serving mutual TLS. Certificates are generated here,
//! per test; no key is kept anywhere but a temp dir.

use std::path::PathBuf;
use std::time::Duration;

use resonance_reference_gateway::{ReferenceGateway, ServerTls};
use resonance_task::config::{Config, Secret, SecretUrl, TlsConfig};
use resonance_task::gateway::{GatewayPool, PushOutcome};
use resonance_task::lifecycle::Lifecycle;
use resonance_task::proto::PushMessage;
use resonance_task::registry::{GatewayEndpoint, PushProtocol};
use resonance_testkit::certs::{self, Ca, DevPki};
use tempfile::TempDir;

use resonance_testkit::harness::*;

const NATS_PASSWORD: &str = "nats-pw-7d1f0c";
const REDIS_PASSWORD: &str = "redis-pw-52ab9e";
const ETCD_PASSWORD: &str = "etcd-pw-c0ffee";

/// The development set (a CA, a server certificate for localhost and
/// 127.0.0.1, a client certificate it signed) plus `rogue`, a client
/// certificate of another CA.
struct Pki {
    dev: DevPki,
    _dir: TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dev = DevPki::create(dir.path()).unwrap();
        let rogue = Ca::new("somebody else's CA")
            .unwrap()
            .leaf("rogue", false)
            .unwrap();
        certs::write(dir.path(), "rogue", &rogue.cert, Some(&rogue.key)).unwrap();
        Self { dev, _dir: dir }
    }

    /// A directory for one server's files, removed with the certificates.
    fn server_dir(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dev.path(name)
    }

    /// Client TLS with our CA and the named client identity.
    fn client(&self, identity: &str) -> TlsConfig {
        self.dev.client_tls_as(identity)
    }

    /// Replaces the client identity files with `identity`'s, as a
    /// certificate rotation would.
    fn rotate_client_to(&self, identity: &str) {
        for ext in ["pem", "key"] {
            std::fs::copy(
                self.path(&format!("{identity}.{ext}")),
                self.path(&format!("client-live.{ext}")),
            )
            .unwrap();
        }
    }

    fn gateway_tls(&self) -> ServerTls {
        self.dev.server_tls().unwrap()
    }
}

fn quoted(p: PathBuf) -> String {
    format!("{:?}", p.display().to_string())
}

/// `program` started with `args` (naming its config file), listening on
/// `port`.
async fn from_conf(program: &'static str, args: Vec<String>, port: u16) -> LocalServer {
    LocalServer::process(program, program, args, vec![], port)
        .await
        .unwrap_or_else(|e| panic!("{program} with TLS starts: {e}"))
}

/// nats-server with JetStream, mutual TLS and two users: one with a
/// password, one with an NKey.
async fn secure_nats(pki: &Pki, nkey_public: &str) -> LocalServer {
    let port = free_port();
    let dir = pki.server_dir("nats");
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {} }}\ntls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n  timeout: 5\n}}\nauthorization {{\n  users: [\n    {{ user: task, password: \"{NATS_PASSWORD}\" }}\n    {{ nkey: {nkey_public} }}\n  ]\n}}\n",
            quoted(dir.join("js")),
            quoted(pki.path("server.pem")),
            quoted(pki.path("server.key")),
            quoted(pki.path("ca.pem")),
        ),
    )
    .unwrap();
    from_conf(
        "nats-server",
        vec!["-c".into(), conf.display().to_string()],
        port,
    )
    .await
}

/// redis-server on a TLS port only, client certificates required, the
/// default user off and one ACL user.
async fn secure_redis(pki: &Pki) -> LocalServer {
    let port = free_port();
    let dir = pki.server_dir("redis");
    let conf = dir.join("redis.conf");
    std::fs::write(
        &conf,
        format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients yes\nsave \"\"\nappendonly no\ndir {}\nuser default off\nuser task on >{REDIS_PASSWORD} ~* &* +@all\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("ca.pem").display(),
            dir.display(),
        ),
    )
    .unwrap();
    from_conf("redis-server", vec![conf.display().to_string()], port).await
}

/// etcd serving clients over mutual TLS, with auth enabled and a root
/// user.
async fn secure_etcd(pki: &Pki) -> LocalServer {
    let port = free_port();
    let peer = format!("http://127.0.0.1:{}", free_port());
    let client = format!("https://127.0.0.1:{port}");
    let dir = pki.server_dir("etcd");
    let s = |p: PathBuf| p.display().to_string();
    let mut args = resonance_testkit::servers::etcd_args(&dir.join("data"), &client, &peer);
    args.extend([
        "--cert-file".into(),
        s(pki.path("server.pem")),
        "--key-file".into(),
        s(pki.path("server.key")),
        "--trusted-ca-file".into(),
        s(pki.path("ca.pem")),
        "--client-cert-auth".into(),
    ]);
    let etcd = LocalServer::process("etcd", "etcd", args, vec![], port)
        .await
        .expect("etcd with TLS starts");
    // Enable auth as an operator would: a root user with the root role.
    let mut setup = resonance_task::config::EtcdConfig {
        endpoints: vec![format!("https://127.0.0.1:{port}")],
        tls: pki.client("client"),
        ..Default::default()
    };
    setup.dial_timeout = Duration::from_secs(2);
    eventually("etcd auth enabled", || {
        let setup = setup.clone();
        async move {
            let Ok(mut c) = resonance_task::registry::connect(&setup).await else {
                return false;
            };
            if c.user_add("root", ETCD_PASSWORD, None).await.is_err() {
                // Added by an earlier attempt whose enable failed.
                let _ = c.user_change_password("root", ETCD_PASSWORD).await;
            }
            c.user_grant_role("root", "root").await.is_ok() && c.auth_enable().await.is_ok()
        }
    })
    .await;
    etcd
}

/// Every server of a pipeline with TLS and credentials, and the files a
/// pod reads its secrets from.
struct SecureStack {
    stack: Stack,
    pki: Pki,
    nkey_seed: String,
    secrets: TempDir,
}

impl SecureStack {
    async fn start() -> Self {
        let pki = Pki::new();
        pki.rotate_client_to("client");
        let nkey = nkeys::KeyPair::new_user();
        let nkey_public = nkey.public_key();
        let (nats, redis, etcd) = tokio::join!(
            secure_nats(&pki, &nkey_public),
            secure_redis(&pki),
            secure_etcd(&pki)
        );
        let secrets = tempfile::tempdir().unwrap();
        for (name, value) in [
            ("redis-password", REDIS_PASSWORD),
            ("etcd-password", ETCD_PASSWORD),
        ] {
            std::fs::write(secrets.path().join(name), format!("{value}\n")).unwrap();
        }
        Self {
            stack: Stack {
                nats,
                etcd,
                redis,
                db: TestDb::sqlite(),
            },
            pki,
            nkey_seed: nkey.seed().unwrap(),
            secrets,
        }
    }

    /// A pod's configuration: TLS everywhere with the live client
    /// identity, secrets in memory.
    fn config(&self) -> Config {
        let mut c = self.stack.config();
        let live = self.pki.client("client-live");
        c.nats.url = SecretUrl::new(format!("tls://127.0.0.1:{}", self.stack.nats.port));
        c.nats.username = Some("task".into());
        c.nats.password = Some(Secret::new(NATS_PASSWORD));
        c.nats.tls = live.clone();
        c.redis.addr = format!("rediss://127.0.0.1:{}", self.stack.redis.port);
        c.redis.username = Some("task".into());
        c.redis.password = Some(Secret::new(REDIS_PASSWORD));
        c.redis.tls = live.clone();
        c.etcd.endpoints = vec![format!("https://127.0.0.1:{}", self.stack.etcd.port)];
        c.etcd.username = Some("root".into());
        c.etcd.password = Some(Secret::new(ETCD_PASSWORD));
        c.etcd.tls = live.clone();
        c.gateway.tls = live;
        c
    }

    /// The same, as a pod process reads it: Redis and etcd passwords from
    /// files, the NATS password left to the environment.
    fn process_config(&self) -> Config {
        let mut c = self.config();
        c.nats.password = None;
        c.redis.password = None;
        c.redis.password_file = Some(self.secrets.path().join("redis-password"));
        c.etcd.password = None;
        c.etcd.password_file = Some(self.secrets.path().join("etcd-password"));
        c
    }

    async fn nats(&self) -> async_nats::Client {
        let mut cfg = self.config().nats;
        cfg.username = None;
        cfg.password = None;
        cfg.nkey = Some(Secret::new(self.nkey_seed.clone()));
        resonance_task::nats::connect(&cfg, "security-test")
            .await
            .expect("the NKey user connects")
    }

    async fn gateway(&self, gateway_id: &str, users: &[&str]) -> ReferenceGateway {
        let c = self.config();
        let mut opts = self.stack.gateway_options(gateway_id, users);
        opts.etcd = c.etcd;
        opts.redis = c.redis;
        opts.tls = Some(self.pki.gateway_tls());
        ReferenceGateway::start(opts)
            .await
            .expect("gateway with mutual TLS starts")
    }
}

fn pod_process(config: &Config, nats_password: &str) -> PodProcess {
    PodProcess::spawn_with_env(
        config,
        &[("RESONANCE_TASK__NATS__PASSWORD", nats_password.to_string())],
    )
}

const SECRETS: [&str; 3] = [NATS_PASSWORD, REDIS_PASSWORD, ETCD_PASSWORD];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

/// The whole pipeline with TLS and credentials on every hop: events reach
/// the gateways exactly once, and neither the pod's log nor check-config
/// shows a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hop_encrypted_and_authenticated_delivers_and_keeps_secrets() {
    let secure = SecureStack::start().await;
    let store = secure.stack.db.member_store().await;
    secure
        .stack
        .session(&store, "group-1", &["alice", "bob", "carol", "dave"])
        .await;
    let g1 = secure.gateway("gateway-001", &["alice", "bob"]).await;
    let g2 = secure.gateway("gateway-002", &["carol"]).await;

    // Nobody gets in without credentials, or without a client certificate.
    let mut anonymous = secure.config().nats;
    anonymous.username = None;
    anonymous.password = None;
    assert!(
        resonance_task::nats::connect(&anonymous, "anonymous")
            .await
            .is_err()
    );
    let mut no_cert = secure.config().nats;
    no_cert.tls.cert_file = None;
    no_cert.tls.key_file = None;
    assert!(
        resonance_task::nats::connect(&no_cert, "no-cert")
            .await
            .is_err()
    );

    let config = secure.process_config();
    let nats = secure.nats().await;
    let pod = pod_process(&config, NATS_PASSWORD);
    wait_consuming(&nats, &config).await;
    for id in 1..=20 {
        publish(
            &nats,
            &config.consumer.topic,
            &event(id, "group-1", "alice"),
        )
        .await;
    }
    let count = |u: &str, id: i64| g1.ledger.count(u, id) + g2.ledger.count(u, id);
    eventually("every online member got every message", || async {
        (1..=20).all(|id| ["alice", "bob", "carol"].iter().all(|u| count(u, id) >= 1))
    })
    .await;
    wait_settled(&nats, &config).await;
    for id in 1..=20 {
        for u in ["alice", "bob", "carol"] {
            assert_eq!(count(u, id), 1, "{u} got msg {id} once");
        }
        assert_eq!(count("dave", id), 0, "dave is offline");
    }

    pod.signal("TERM");
    let (status, log) = pod.wait_with_log().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("NATS connected"), "{log}");
    assert_no_secret("the pod log", &log);

    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-task"))
        .arg("check-config")
        .env("RESONANCE_TASK__NATS__PASSWORD", NATS_PASSWORD)
        .env("RESONANCE_TASK__NATS__USERNAME", "task")
        .env("RESONANCE_TASK__REDIS__PASSWORD", REDIS_PASSWORD)
        .env("RESONANCE_TASK__REDIS__USERNAME", "task")
        .env(
            "RESONANCE_TASK__DATABASE__URL",
            format!("mysql://root:{ETCD_PASSWORD}@127.0.0.1/test"),
        )
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{printed}");
    assert!(printed.contains("<redacted>"), "{printed}");
    assert_no_secret("check-config", &printed);

    g1.stop().await;
    g2.stop().await;
}

/// A pod given a wrong credential for one dependency exits at start-up,
/// naming that dependency, and without printing the wrong value either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_stop_the_pod_naming_the_dependency() {
    let secure = SecureStack::start().await;
    let right = secure.process_config();
    let wrong_password = "wrong-pw-0b5e55ed";
    let wrong_file = secure.secrets.path().join("wrong");
    std::fs::write(&wrong_file, wrong_password).unwrap();

    let mut redis = right.clone();
    redis.redis.password_file = Some(wrong_file.clone());
    let mut etcd = right.clone();
    etcd.etcd.password_file = Some(wrong_file.clone());
    let mut rogue_nats_cert = right.clone();
    rogue_nats_cert.nats.tls = secure.pki.client("rogue");
    for (config, nats_password, dependency) in [
        (&redis, NATS_PASSWORD, "redis refused"),
        (&etcd, NATS_PASSWORD, "etcd refused"),
        (&right, wrong_password, "nats refused"),
        (&rogue_nats_cert, NATS_PASSWORD, "nats refused"),
    ] {
        let (status, log) = pod_process(config, nats_password).wait_with_log().await;
        assert!(!status.success(), "{log}");
        assert!(log.contains(dependency), "{dependency}: {log}");
        assert_no_secret("a refused pod's log", &log);
        assert!(!log.contains(wrong_password), "{log}");
    }
}

/// The gateway refuses a client certificate from another CA; once the
/// pod's certificate files are replaced by good ones, the next connection
/// uses them and pushes go through, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_mtls_refuses_unknown_certificates_and_picks_up_rotated_files() {
    let stack = Stack::start().await;
    let pki = Pki::new();
    pki.rotate_client_to("rogue");
    let mut opts = stack.gateway_options("gateway-001", &["alice"]);
    opts.tls = Some(pki.gateway_tls());
    let gateway = ReferenceGateway::start(opts).await.unwrap();

    let mut cfg = stack.config().gateway;
    cfg.tls = pki.client("client-live");
    cfg.tls.enabled = false;
    let pool = GatewayPool::new(cfg, &Lifecycle::new());
    let endpoint = GatewayEndpoint {
        gateway_id: "gateway-001".into(),
        instance_id: "gateway-service-gateway-001".into(),
        uri: format!("https://{}", gateway.grpc_addr),
        protocol: PushProtocol::BatchV1,
    };
    let push = |msg_id: i64| {
        let pool = pool.clone();
        let endpoint = endpoint.clone();
        async move {
            let message = PushMessage {
                msg_id,
                session_id: "s".into(),
                ..Default::default()
            };
            pool.push(&endpoint, message, vec!["alice".into()], Default::default())
                .await
                .outcomes
                .remove(0)
        }
    };
    // The handshake may complete on the client's side before the gateway
    // sends its alert, so the failure shows either at connect or on the
    // stream; either way nothing is delivered.
    let refused = push(1).await;
    assert!(
        matches!(refused, PushOutcome::Failed(_)),
        "a rogue client certificate was accepted: {refused:?}"
    );
    assert_eq!(gateway.ledger.count("alice", 1), 0);

    pki.rotate_client_to("client");
    eventually(
        "a push goes through with the rotated certificate",
        || async { push(2).await == PushOutcome::Delivered },
    )
    .await;
    assert_eq!(gateway.ledger.count("alice", 2), 1);
    assert_eq!(gateway.ledger.count("alice", 1), 0);
    gateway.stop().await;
}

/// SQL credentials: `database.password` replaces the URL's, a wrong one is
/// a refusal (not a wait), and neither shows in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_password_is_applied_and_a_wrong_one_refused() {
    use resonance_task::refusal::Refusal;
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let user = format!("rt_sec_{}", std::process::id());
    let password = "sql-pw-9e1d";
    let mut admin =
        <sqlx::AnyConnection as sqlx::Connection>::connect("mysql://root@127.0.0.1:3306/test")
            .await
            .expect("MariaDB reachable as root");
    for sql in [
        format!("DROP USER IF EXISTS '{user}'@'%'"),
        format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"),
        format!("GRANT SELECT ON test.* TO '{user}'@'%'"),
    ] {
        admin.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
    }
    let mut cfg = Config::default().database;
    cfg.url = SecretUrl::new(format!("mysql://{user}:placeholder@127.0.0.1:3306/test"));
    cfg.password = Some(Secret::new(password));
    let (pool, _) = resonance_task::store::connect_database(&cfg)
        .await
        .expect("the password from database.password is used");
    pool.close().await;

    cfg.password = Some(Secret::new("not-the-password"));
    let err = resonance_task::store::connect_database(&cfg)
        .await
        .expect_err("a wrong password is refused");
    assert!(err.refused(), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("not-the-password") && !shown.contains(password),
        "{shown}"
    );
    assert!(shown.contains(&user), "{shown}");
    admin
        .execute(sqlx::AssertSqlSafe(format!("DROP USER '{user}'@'%'")))
        .await
        .unwrap();
}

/// `resonance-task certs` writes a CA, server and client certificates the
/// TLS settings accept.
#[test]
fn the_certs_command_writes_usable_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-task"))
        .args(["certs", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pki = DevPki {
        dir: dir.path().to_path_buf(),
    };
    let material = resonance_task::tls::TlsMaterial::read("gateway.tls", &pki.client_tls())
        .expect("client files are valid PEM");
    assert!(material.ca.is_some() && material.cert.is_some() && material.key.is_some());
    let server = pki.server_tls().unwrap();
    assert!(String::from_utf8_lossy(&server.cert).contains("BEGIN CERTIFICATE"));
}
