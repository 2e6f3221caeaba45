//! Private servers for the tools that need a whole local stack (chaos run,
//! benchmark) and for the integration tests: `nats-server -js`, `etcd` and
//! `redis-server` processes on free loopback ports, each with its own
//! temporary directory, that can be killed (SIGKILL), stopped for a while
//! (SIGSTOP) and restarted on the same port with the same data.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// How long a server gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("starting {what} ({program}): {cause}; it comes from: {package}")]
    Spawn {
        what: &'static str,
        program: String,
        package: &'static str,
        cause: std::io::Error,
    },
    #[error("{what} exited before listening on port {port}: {status}")]
    Exited {
        what: &'static str,
        port: u16,
        status: std::process::ExitStatus,
    },
    #[error("{what} did not serve on port {port} within {START_TIMEOUT:?}")]
    Timeout { what: &'static str, port: u16 },
    #[error("temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
}

/// Ports `free_port` picks from: below Linux's ephemeral range (32768 and
/// up), which the OS hands to every outgoing connection and `bind(0)`, so
/// a port picked here is not taken by a client socket of another test
/// before its server binds it; and low enough that a Redis Cluster bus
/// (port + 10,000) stays a valid port.
const PICKED_PORTS: std::ops::Range<u16> = 15_000..32_000;

/// A free loopback port, picked at random and checked by binding it (it is
/// free when this returns; concurrent tests seldom pick the same one).
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    // Never the same port twice from one process.
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = rand::random_range(PICKED_PORTS);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A server process owned by the caller; killed when dropped.
pub struct LocalServer {
    what: &'static str,
    program: String,
    package: &'static str,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// The port it listens on; 0 for a process that listens on nothing.
    pub port: u16,
    /// An HTTP path on `port` that answers 200 once the server serves
    /// requests; without one, accepting a TCP connection counts as ready.
    health: Option<&'static str>,
    child: Option<Child>,
    dir: TempDir,
}

impl LocalServer {
    async fn spawn(
        what: &'static str,
        program: &'static str,
        package: &'static str,
        args: impl FnOnce(&TempDir, u16) -> Vec<String>,
    ) -> Result<Self, StackError> {
        Self::spawn_checked(what, program, package, None, args).await
    }

    async fn spawn_checked(
        what: &'static str,
        program: &'static str,
        package: &'static str,
        health: Option<&'static str>,
        args: impl FnOnce(&TempDir, u16) -> Vec<String>,
    ) -> Result<Self, StackError> {
        let mut server = Self::prepared(what, program, package, health, free_port(), args)?;
        server.start().await?;
        Ok(server)
    }

    /// A server on `port`, set up but not started: members of a cluster
    /// must all know each other's ports before any of them starts.
    pub(crate) fn prepared(
        what: &'static str,
        program: &'static str,
        package: &'static str,
        health: Option<&'static str>,
        port: u16,
        args: impl FnOnce(&TempDir, u16) -> Vec<String>,
    ) -> Result<Self, StackError> {
        let dir = tempfile::tempdir().map_err(StackError::TempDir)?;
        Ok(Self {
            what,
            program: program.to_string(),
            package,
            args: args(&dir, port),
            envs: Vec::new(),
            port,
            health,
            child: None,
            dir,
        })
    }

    /// Whether the process was started and not killed or stopped since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Any program, e.g. this project's own binary as a pod or gateway;
    /// waits for `port` to listen unless it is 0.
    pub async fn process(
        what: &'static str,
        program: impl Into<String>,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        port: u16,
    ) -> Result<Self, StackError> {
        let mut server = Self {
            what,
            program: program.into(),
            package: "(this project)",
            args,
            envs,
            port,
            health: None,
            child: None,
            dir: tempfile::tempdir().map_err(StackError::TempDir)?,
        };
        server.start().await?;
        Ok(server)
    }

    /// Where the process writes its stderr.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.log", self.what))
    }

    /// Starts the process (again) with the same port and data directory and
    /// waits until it listens.
    pub async fn start(&mut self) -> Result<(), StackError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(StackError::TempDir)?;
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|cause| StackError::Spawn {
                what: self.what,
                program: self.program.clone(),
                package: self.package,
                cause,
            })?;
        if self.port == 0 {
            self.child = Some(child);
            return Ok(());
        }
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if self.serves(addr).await {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StackError::Exited {
                    what: self.what,
                    port: self.port,
                    status,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                return Err(StackError::Timeout {
                    what: self.what,
                    port: self.port,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    async fn serves(&self, addr: SocketAddr) -> bool {
        let Some(path) = self.health else {
            return tokio::net::TcpStream::connect(addr).await.is_ok();
        };
        let probe = crate::http_client()
            .build()
            .expect("HTTP client builds")
            .get(format!("http://{addr}{path}"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        matches!(probe, Ok(r) if r.status().is_success())
    }

    /// SIGKILLs the process; its data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the process and waits for it to exit (SIGKILL after 10 s).
    pub async fn stop(&mut self) {
        self.stop_within(Duration::from_secs(10)).await;
    }

    /// SIGTERMs the process and waits up to `patience` for it to exit;
    /// `false` when it had to be SIGKILLed.
    pub async fn stop_within(&mut self, patience: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = signal(c.id(), "TERM");
        let deadline = tokio::time::Instant::now() + patience;
        let mut exited = true;
        while c.try_wait().ok().flatten().is_none() {
            if tokio::time::Instant::now() >= deadline {
                let _ = c.kill();
                exited = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.wait();
        exited
    }

    pub async fn restart(&mut self) -> Result<(), StackError> {
        self.kill();
        self.start().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn nats_server() -> Result<LocalServer, StackError> {
    LocalServer::spawn("nats-server", "nats-server", "nats-server", |dir, port| {
        vec![
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-sd".into(),
            dir.path().join("jetstream").display().to_string(),
        ]
    })
    .await
}

pub async fn etcd_server() -> Result<LocalServer, StackError> {
    let peer = free_port();
    // etcd accepts connections before it has a leader and drops requests
    // made then; /health answers 200 only once it serves.
    LocalServer::spawn_checked(
        "etcd",
        "etcd",
        "etcd-server",
        Some("/health"),
        move |dir, port| {
            etcd_args(
                &dir.path().join("data"),
                &format!("http://127.0.0.1:{port}"),
                &format!("http://127.0.0.1:{peer}"),
            )
        },
    )
    .await
}

/// Arguments of a one-member etcd cluster serving clients on `client` (an
/// `http://` or `https://` URL) and its peer on `peer`.
pub fn etcd_args(data_dir: &std::path::Path, client: &str, peer: &str) -> Vec<String> {
    [
        "--name",
        "local",
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        &format!("local={peer}"),
    ]
    .map(String::from)
    .to_vec()
}

pub async fn redis_server() -> Result<LocalServer, StackError> {
    redis_with(false).await
}

/// A Redis that keeps its data across a graceful restart (append-only file).
pub async fn redis_server_persistent() -> Result<LocalServer, StackError> {
    redis_with(true).await
}

async fn redis_with(persistent: bool) -> Result<LocalServer, StackError> {
    LocalServer::spawn(
        "redis-server",
        "redis-server",
        "redis-server",
        move |dir, port| {
            vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                if persistent { "yes" } else { "no" }.into(),
                "--dir".into(),
                dir.path().display().to_string(),
            ]
        },
    )
    .await
}

/// A private Prometheus (Debian's `prometheus` package; the packaged
/// service is never used) with `config` as its configuration file, its
/// data in the server's temp dir; ready once `/-/ready` answers.
pub async fn prometheus_server(config: &str) -> Result<LocalServer, StackError> {
    let config = config.to_string();
    LocalServer::spawn_checked(
        "prometheus",
        "prometheus",
        "prometheus",
        Some("/-/ready"),
        move |dir, port| {
            let file = dir.path().join("prometheus.yml");
            std::fs::write(&file, config).expect("the temp dir takes the configuration");
            vec![
                format!("--config.file={}", file.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ]
        },
    )
    .await
}

/// Pauses (SIGSTOP) or resumes (SIGCONT) a process: a stalled server keeps
/// its connections open but answers nothing.
pub fn signal(pid: u32, signal: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{signal} {pid}: {status}"
        )))
    }
}
