//! Typed configuration: defaults in code, then `config/task.yaml`, then
//! environment variables `RESONANCE_TASK__SECTION__KEY`.
//!
//! Key names follow the Resonance task service (`log`, `nats`, `etcd`,
//! `redis`, `registry`, `gateway_service_name`, `consumer`) so an operator's
//! existing file keeps its meaning; `database`, `gateway` and `dispatch` are
//! ours. Everything is validated once at start-up by [`Config::load`]: an
//! unknown key or a bad value refuses to start and the error names the key.
//! Secrets are [`Secret`] values, redacted in `Debug` and when printed;
//! each can instead be read from a file named by the same key with a
//! `_file` suffix (`nats.password_file`), as Kubernetes mounts secrets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::tls::TlsConfig;

/// Environment prefix; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "RESONANCE_TASK__";
/// Config file read when no `--config` is given (missing is fine).
pub const DEFAULT_CONFIG_PATH: &str = "config/task.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {cause}")]
    File {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("configuration: {0}")]
    Parse(Box<figment::Error>),
    #[error("configuration key `{key}`: {reason}")]
    Invalid {
        key: std::borrow::Cow<'static, str>,
        reason: String,
    },
    #[error("configuration key `{key}`: reading {path}: {cause}")]
    KeyFile {
        key: String,
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<std::borrow::Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub service: ServiceConfig,
    pub log: LogConfig,
    pub nats: NatsConfig,
    pub etcd: EtcdConfig,
    pub redis: RedisConfig,
    pub registry: RegistryConfig,
    pub gateway_service_name: GatewayServiceName,
    pub consumer: ConsumerConfig,
    pub database: DatabaseConfig,
    pub gateway: GatewayPoolConfig,
    pub dispatch: DispatchConfig,
    pub dedup: DedupConfig,
    pub offline: OfflineConfig,
    pub priority: PriorityConfig,
    pub notify: NotifyConfig,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
}

/// Bounds on what one event may carry; an event beyond them is
/// dead-lettered with the bound it broke.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Encoded `PushEvent` bytes.
    pub max_payload_bytes: usize,
    /// Bytes of `content`.
    pub max_content_bytes: usize,
    /// Members of one session; the member query reads one more at most.
    pub max_members: usize,
    /// Bytes of a username (`from_username`, `to_username`, members).
    pub max_username_bytes: usize,
    /// Bytes of `session_id`.
    pub max_session_id_bytes: usize,
    /// Characters allowed in usernames and session ids.
    pub id_charset: IdCharset,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_content_bytes: 64 * 1024,
            max_members: 100_000,
            max_username_bytes: 128,
            max_session_id_bytes: 128,
            id_charset: IdCharset::Printable,
        }
    }
}

/// `printable`: any character but control characters and whitespace.
/// `ascii`: letters, digits and `.`, `_`, `-`, `@`, `:`, `#`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdCharset {
    #[default]
    Printable,
    Ascii,
}

impl IdCharset {
    pub fn allows(self, c: char) -> bool {
        match self {
            Self::Printable => !c.is_control() && !c.is_whitespace(),
            Self::Ascii => {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':' | '#')
            }
        }
    }
}

/// The admin HTTP port: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ([0, 0, 0, 0], 9090).into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Names this pod's NATS connection; shows up in `nats server report`.
    pub name: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            name: "resonance-task".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Console,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `resonance_task=debug,info`); `RUST_LOG`
    /// wins when set.
    pub level: String,
    pub format: LogFormat,
    /// OTLP/HTTP endpoint spans are exported to (e.g.
    /// `http://otel-collector:4318/v1/traces`); unset exports nothing.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Console,
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// One server or a comma-separated list; `tls://` asks for TLS.
    pub url: SecretUrl,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    /// NKey seed (`SU...`) of the user.
    pub nkey: Option<Secret>,
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    pub tls: TlsConfig,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("nats://127.0.0.1:4222"),
            username: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            nkey: None,
            nkey_file: None,
            credentials_file: None,
            tls: TlsConfig::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    #[serde(deserialize_with = "string_list")]
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// `https://` endpoints ask for TLS.
    pub tls: TlsConfig,
    #[serde(with = "duration")]
    pub dial_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: None,
            password: None,
            password_file: None,
            tls: TlsConfig::default(),
            dial_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port` of a standalone server (ignored when `cluster_addrs` is
    /// set); `rediss://host:port` asks for TLS.
    pub addr: String,
    /// Seed nodes of a Redis Cluster; non-empty selects cluster mode.
    #[serde(deserialize_with = "string_list")]
    pub cluster_addrs: Vec<String>,
    /// ACL user; unset: `default`.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub tls: TlsConfig,
    pub db: i64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:6379".into(),
            cluster_addrs: Vec::new(),
            username: None,
            password: None,
            password_file: None,
            tls: TlsConfig::default(),
            db: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// etcd key prefix of the service registry.
    pub namespace: String,
    /// Lease TTL the reference gateway registers with.
    #[serde(with = "duration")]
    pub default_ttl: Duration,
    /// Accepted for compatibility: the registry is always a watched
    /// in-memory map, never a round trip per push.
    pub enable_cache: bool,
    /// How often the whole prefix is listed again as a safety net behind the
    /// watch.
    #[serde(with = "duration")]
    pub cache_expiration: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            namespace: "/resonance/services".into(),
            default_ttl: Duration::from_secs(30),
            enable_cache: true,
            cache_expiration: Duration::from_secs(300),
        }
    }
}

/// The etcd service name of gateways (`gateway-service`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct GatewayServiceName(pub String);

impl Default for GatewayServiceName {
    fn default() -> Self {
        Self("gateway-service".into())
    }
}

impl fmt::Display for GatewayServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerMode {
    /// Shared durable JetStream consumer, explicit acks (no loss).
    #[default]
    Jetstream,
    /// Plain queue-group subscription, at-most-once (legacy behaviour).
    Core,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    pub mode: ConsumerMode,
    pub topic: String,
    /// Queue group (core mode) and durable consumer name (JetStream mode).
    pub queue_group: String,
    /// Events in flight per pod.
    pub worker_count: usize,
    /// In-process retries of a failed fan-out (only the recipients that
    /// failed) before the event is handed back to NATS.
    pub max_retry: u32,
    /// Delay before a failed event is first redelivered (integer seconds or
    /// `5s`); it doubles with each further delivery.
    #[serde(with = "duration")]
    pub retry_interval: Duration,
    /// Cap of the doubling redelivery delay.
    #[serde(with = "duration")]
    pub retry_backoff_max: Duration,
    /// On shutdown, how long events in flight get to finish before they are
    /// handed back to NATS.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// JetStream stream that captures `topic`.
    pub stream: String,
    /// Redelivery after this long without an ack.
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Failed attempts before an event is dead-lettered. Counted by the
    /// service in Redis: a handback (shutdown, another handler holding the
    /// event, an ack_wait that ran out while it waited) is not a failure.
    pub max_deliver: i64,
    /// JetStream's own limit on deliveries of one message, whatever their
    /// cause (failures, handbacks, crashed pods, lost acks). A message that
    /// reaches it is moved to the dead letters as `max deliveries reached`.
    pub delivery_ceiling: i64,
    /// Oldest unconsumed event the stream keeps.
    #[serde(with = "duration")]
    pub stream_max_age: Duration,
    pub dead_letter_topic: String,
    /// JetStream stream that keeps dead letters for inspection and replay.
    pub dead_letter_stream: String,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            mode: ConsumerMode::Jetstream,
            topic: "resonance.push.event.v1".into(),
            queue_group: "task-service".into(),
            worker_count: 64,
            max_retry: 3,
            retry_interval: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(30),
            stream: "RESONANCE_PUSH".into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            delivery_ceiling: 100,
            stream_max_age: Duration::from_secs(7 * 24 * 3600),
            dead_letter_topic: "resonance.push.dead.v1".into(),
            dead_letter_stream: "RESONANCE_PUSH_DEAD".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// sqlx URL: `sqlite://file.db`, `mysql://user:pw@host/db`,
    /// `postgres://user:pw@host/db`.
    pub url: SecretUrl,
    /// Replaces the password in `url`, so the URL itself holds none.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub max_connections: u32,
    #[serde(with = "duration")]
    pub acquire_timeout: Duration,
    /// Apply `migrations/` at start; unset means yes for SQLite only.
    pub migrate_on_start: Option<bool>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl("sqlite://resonance-task.db?mode=rwc".into()),
            password: None,
            password_file: None,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            migrate_on_start: None,
        }
    }
}

impl DatabaseConfig {
    pub fn migrates_on_start(&self) -> bool {
        self.migrate_on_start
            .unwrap_or_else(|| self.url.expose().starts_with("sqlite:"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayPoolConfig {
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// A push not answered within this is failed and its stream reopened.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// A stream with nothing to send for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Pushes awaiting a response on one gateway stream.
    pub max_in_flight: usize,
    /// Upper bound of the reconnect backoff.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// Which push service to call on gateways that advertise batch-v1.
    pub push_protocol: PushProtocolChoice,
    /// TLS to gateways: used for `grpcs://` endpoints, or for all when
    /// `enabled`; a client certificate makes it mutual.
    pub tls: TlsConfig,
}

/// `auto`: batch-v1 where a gateway advertises it, per-user `PushService`
/// elsewhere. `per-user`: `PushService` everywhere.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PushProtocolChoice {
    #[default]
    Auto,
    PerUser,
}

impl Default for GatewayPoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_in_flight: 2048,
            max_backoff: Duration::from_secs(10),
            push_protocol: PushProtocolChoice::Auto,
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Push to the sender's own other devices too (upstream behaviour).
    pub push_to_sender: bool,
    /// Route keys per Redis MGET.
    pub route_chunk_size: usize,
    /// MGET chunks in flight per event.
    pub route_concurrency: usize,
    /// Recipients per push to one gateway over per-user `PushService`;
    /// each chunk's deliveries are recorded as soon as it is answered.
    pub push_chunk_size: usize,
    /// Recipients per batch-v1 request (one frame) to one gateway.
    pub batch_size: usize,
    /// How long session members are cached in-process (0 = no cache).
    #[serde(with = "duration")]
    pub member_cache_ttl: Duration,
    /// Members the cache holds at most, over all sessions.
    pub member_cache_capacity: u64,
    /// Core-NATS subject whose messages (a session id as UTF-8) drop that
    /// session from the member cache at once; empty: no subscription.
    pub session_changed_topic: String,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            push_to_sender: true,
            route_chunk_size: 500,
            route_concurrency: 4,
            push_chunk_size: 64,
            batch_size: 512,
            member_cache_ttl: Duration::from_secs(2),
            member_cache_capacity: 1_000_000,
            session_changed_topic: "resonance.session.changed.v1".into(),
        }
    }
}

/// Redelivery without duplicates: per-event progress in Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Track which recipients each event reached, so a redelivery or a
    /// duplicate publish pushes to nobody twice.
    pub enabled: bool,
    /// How long an unsettled event's progress is kept.
    #[serde(with = "duration")]
    pub progress_ttl: Duration,
    /// How long a settled msg_id is remembered (duplicates within it are
    /// acked without pushing).
    #[serde(with = "duration")]
    pub window: Duration,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            progress_ttl: Duration::from_secs(3600),
            window: Duration::from_secs(600),
        }
    }
}

/// Recipients who are not connected: parked messages and offline notices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OfflineConfig {
    /// Park the message in Redis for each offline recipient, until drained.
    pub park: bool,
    /// Parked messages kept per user; the lowest seq_id go first.
    pub max_messages: usize,
    /// A user's parked messages expire this long after the last one parked.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Sessions with more members than this are not parked per member:
    /// their members read history from the message store (0: always park).
    pub read_path_above: usize,
    /// Publish an offline notice for mobile push.
    pub notice: bool,
    pub notice_topic: String,
    /// JetStream stream that keeps notices for `resonance-task notify`.
    pub notice_stream: String,
    /// At most one notice per user per interval (0: one per message).
    #[serde(with = "duration")]
    pub notice_interval: Duration,
    /// Recipients per notice message.
    pub notice_batch: usize,
    /// Characters of the message text copied into a notice.
    pub preview_chars: usize,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        Self {
            park: true,
            max_messages: 1000,
            ttl: Duration::from_secs(7 * 24 * 3600),
            read_path_above: 5000,
            notice: true,
            notice_topic: "resonance.push.offline.v1".into(),
            notice_stream: "RESONANCE_OFFLINE".into(),
            notice_interval: Duration::from_secs(30),
            notice_batch: 100,
            preview_chars: 64,
        }
    }
}

/// Two lanes: high-priority events are dispatched before normal ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PriorityConfig {
    /// Events a pod takes from NATS ahead of its workers and orders by
    /// lane: how far a high-priority event can overtake a backlog.
    pub prefetch: usize,
    /// Bytes those waiting events may hold at most (pull requests ask for
    /// no more); one message larger than this is still taken when nothing
    /// waits.
    pub prefetch_bytes: usize,
    /// Event `type` values that are high priority.
    pub high_types: Vec<String>,
    /// One-to-one sessions (session_type 1) are high priority.
    pub one_to_one_high: bool,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            prefetch: 4096,
            prefetch_bytes: 64 << 20,
            high_types: Vec::new(),
            one_to_one_high: false,
        }
    }
}

/// `resonance-task notify`: offline notices to mobile-push providers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Durable consumer shared by every notify worker.
    pub queue_group: String,
    /// Notices in flight per worker process.
    pub worker_count: usize,
    /// In-process retries of a provider's transient failure.
    pub max_retry: u32,
    /// First redelivery delay of a notice that could not be sent; doubles.
    #[serde(with = "duration")]
    pub retry_interval: Duration,
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Deliveries before a notice is dead-lettered.
    pub max_deliver: i64,
    pub dead_letter_topic: String,
    pub dead_letter_stream: String,
    /// One HTTP request to a provider.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    pub webhook: WebhookConfig,
    pub getui: GetuiConfig,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            queue_group: "notify-service".into(),
            worker_count: 32,
            max_retry: 3,
            retry_interval: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            dead_letter_topic: "resonance.push.offline.dead.v1".into(),
            dead_letter_stream: "RESONANCE_OFFLINE_DEAD".into(),
            request_timeout: Duration::from_secs(5),
            webhook: WebhookConfig::default(),
            getui: GetuiConfig::default(),
        }
    }
}

/// A generic webhook: a signed JSON POST per offline recipient.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Empty: no webhook.
    pub url: String,
    /// HMAC-SHA256 key of the signature header.
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
}

/// Getui (个推) REST API v2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GetuiConfig {
    /// API root; the app id is appended.
    pub base_url: String,
    /// Empty: Getui off.
    pub app_id: String,
    pub app_key: String,
    pub master_secret: Option<Secret>,
    pub master_secret_file: Option<PathBuf>,
    /// Redis key holding a user's Getui client id (`{username}` replaced).
    pub cid_key: String,
    /// How long Getui keeps the notification for an offline phone.
    #[serde(with = "duration")]
    pub ttl: Duration,
}

impl Default for GetuiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://restapi.getui.com/v2".into(),
            app_id: String::new(),
            app_key: String::new(),
            master_secret: None,
            master_secret_file: None,
            cid_key: "resonance:getui:cid:{username}".into(),
            ttl: Duration::from_secs(2 * 3600),
        }
    }
}

fn non_empty(key: &'static str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(())
}
fn positive(key: &'static str, v: Duration) -> Result<(), ConfigError> {
    if v.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(())
}
fn nats_subject(key: &'static str, v: &str) -> Result<(), ConfigError> {
    non_empty(key, v)?;
    if v.contains(char::is_whitespace) || v.split('.').any(str::is_empty) {
        return Err(ConfigError::invalid(
            key,
            format!("`{v}` is not a valid NATS subject"),
        ));
    }
    Ok(())
}

/// A user name and its password come together.
fn pair(
    user_key: &'static str,
    user: &Option<String>,
    password_key: &'static str,
    password: &Option<Secret>,
) -> Result<(), ConfigError> {
    match (user, password) {
        (Some(_), None) => Err(ConfigError::invalid(
            password_key,
            format!("is required with {user_key}"),
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            user_key,
            format!("is required with {password_key}"),
        )),
        _ => Ok(()),
    }
}

/// `v` must lie in `range`.
fn within(
    key: &'static str,
    v: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<(), ConfigError> {
    if !range.contains(&v) {
        return Err(ConfigError::invalid(
            key,
            format!("must be between {} and {}", range.start(), range.end()),
        ));
    }
    Ok(())
}

/// `v` must not equal `other`, the value of `other_key`.
fn differs(key: &'static str, v: &str, other_key: &str, other: &str) -> Result<(), ConfigError> {
    if v == other {
        return Err(ConfigError::invalid(
            key,
            format!("must differ from {other_key}"),
        ));
    }
    Ok(())
}

/// A JetStream stream or consumer name.
fn stream_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    non_empty(key, name)?;
    if name.contains(['.', '*', '>', ' ', '/', '\\']) {
        return Err(ConfigError::invalid(
            key,
            format!("`{name}` may not contain `.`, `*`, `>`, `/`, `\\` or spaces"),
        ));
    }
    Ok(())
}

impl Config {
    /// Defaults, then the YAML file, then the environment. An explicit path
    /// must exist; the default path may be absent.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(path, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn load_from(path: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|cause| ConfigError::File {
                    path: p.to_path_buf(),
                    cause,
                })?;
                figment = figment.merge(Yaml::string(&text));
            }
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                figment = figment.merge(Yaml::file(DEFAULT_CONFIG_PATH));
            }
            None => {}
        }
        let mut config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;
        non_empty("service.name", &self.service.name)?;
        for url in self.nats.url.expose().split(',') {
            if !["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| url.trim().starts_with(s))
                && url.contains("://")
            {
                return Err(ConfigError::invalid(
                    "nats.url",
                    format!("`{}` has an unknown scheme", SecretUrl::new(url)),
                ));
            }
        }
        non_empty("nats.url", self.nats.url.expose())?;
        positive("nats.connect_timeout", self.nats.connect_timeout)?;
        if self.etcd.endpoints.is_empty() {
            return Err(ConfigError::invalid(
                "etcd.endpoints",
                "needs at least one endpoint",
            ));
        }
        for e in &self.etcd.endpoints {
            non_empty("etcd.endpoints", e)?;
        }
        positive("etcd.dial_timeout", self.etcd.dial_timeout)?;
        if self.redis.cluster_addrs.is_empty() {
            non_empty("redis.addr", &self.redis.addr)?;
        }
        if self.redis.db < 0 {
            return Err(ConfigError::invalid("redis.db", "must be 0 or more"));
        }
        if !self.redis.cluster_addrs.is_empty() && self.redis.db != 0 {
            return Err(ConfigError::invalid(
                "redis.db",
                "Redis Cluster only has database 0",
            ));
        }
        if !self.registry.namespace.starts_with('/') {
            return Err(ConfigError::invalid(
                "registry.namespace",
                format!("`{}` must start with `/`", self.registry.namespace),
            ));
        }
        positive("registry.default_ttl", self.registry.default_ttl)?;
        positive("registry.cache_expiration", self.registry.cache_expiration)?;
        non_empty("gateway_service_name", &self.gateway_service_name.0)?;
        if self.gateway_service_name.0.contains('/') {
            return Err(ConfigError::invalid(
                "gateway_service_name",
                "must not contain `/`",
            ));
        }
        nats_subject("consumer.topic", &self.consumer.topic)?;
        nats_subject(
            "consumer.dead_letter_topic",
            &self.consumer.dead_letter_topic,
        )?;
        if self.consumer.topic == self.consumer.dead_letter_topic {
            return Err(ConfigError::invalid(
                "consumer.dead_letter_topic",
                "must differ from consumer.topic",
            ));
        }
        for (key, name) in [
            ("consumer.queue_group", &self.consumer.queue_group),
            ("consumer.stream", &self.consumer.stream),
            (
                "consumer.dead_letter_stream",
                &self.consumer.dead_letter_stream,
            ),
        ] {
            stream_name(key, name)?;
        }
        if self.consumer.stream == self.consumer.dead_letter_stream {
            return Err(ConfigError::invalid(
                "consumer.dead_letter_stream",
                "must differ from consumer.stream",
            ));
        }
        within(
            "consumer.worker_count",
            self.consumer.worker_count,
            1..=100_000,
        )?;
        positive("consumer.retry_interval", self.consumer.retry_interval)?;
        if self.consumer.retry_backoff_max < self.consumer.retry_interval {
            return Err(ConfigError::invalid(
                "consumer.retry_backoff_max",
                "must be at least consumer.retry_interval",
            ));
        }
        positive("consumer.shutdown_grace", self.consumer.shutdown_grace)?;
        positive("dedup.progress_ttl", self.dedup.progress_ttl)?;
        positive("dedup.window", self.dedup.window)?;
        if self.consumer.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "consumer.ack_wait",
                "must be at least 1s",
            ));
        }
        if self.consumer.max_deliver < 1 {
            return Err(ConfigError::invalid(
                "consumer.max_deliver",
                "must be at least 1",
            ));
        }
        if self.consumer.delivery_ceiling < self.consumer.max_deliver {
            return Err(ConfigError::invalid(
                "consumer.delivery_ceiling",
                "must be at least consumer.max_deliver",
            ));
        }
        // An unsettled event's progress must outlive its last redelivery,
        // or that redelivery pushes again to recipients already reached.
        let horizon = self
            .consumer
            .retry_backoff_max
            .saturating_mul(self.consumer.max_deliver.clamp(1, u32::MAX as i64) as u32)
            .saturating_add(self.consumer.ack_wait);
        if self.dedup.enabled && self.dedup.progress_ttl < horizon {
            return Err(ConfigError::invalid(
                "dedup.progress_ttl",
                format!(
                    "must be at least consumer.max_deliver x consumer.retry_backoff_max + consumer.ack_wait ({})",
                    humantime::format_duration(horizon)
                ),
            ));
        }
        positive("consumer.stream_max_age", self.consumer.stream_max_age)?;
        let url = self.database.url.expose();
        if ![
            "sqlite:",
            "mysql://",
            "mariadb://",
            "postgres://",
            "postgresql://",
        ]
        .iter()
        .any(|s| url.starts_with(s))
        {
            return Err(ConfigError::invalid(
                "database.url",
                format!(
                    "`{}` must start with sqlite:, mysql://, mariadb://, postgres:// or postgresql://",
                    self.database.url
                ),
            ));
        }
        if url.starts_with("sqlite::memory:") || url.contains("mode=memory") {
            return Err(ConfigError::invalid(
                "database.url",
                "an in-memory SQLite database is private to one connection; use a file",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::invalid(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        positive("database.acquire_timeout", self.database.acquire_timeout)?;
        positive("gateway.connect_timeout", self.gateway.connect_timeout)?;
        positive("gateway.request_timeout", self.gateway.request_timeout)?;
        positive("gateway.idle_timeout", self.gateway.idle_timeout)?;
        positive("gateway.max_backoff", self.gateway.max_backoff)?;
        if self.gateway.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "gateway.max_in_flight",
                "must be at least 1",
            ));
        }
        within(
            "dispatch.route_chunk_size",
            self.dispatch.route_chunk_size,
            1..=10_000,
        )?;
        within(
            "dispatch.push_chunk_size",
            self.dispatch.push_chunk_size,
            1..=100_000,
        )?;
        within("dispatch.batch_size", self.dispatch.batch_size, 1..=100_000)?;
        if self
            .dispatch
            .session_changed_topic
            .chars()
            .any(char::is_whitespace)
        {
            return Err(ConfigError::invalid(
                "dispatch.session_changed_topic",
                "a NATS subject has no whitespace",
            ));
        }
        if self.dispatch.route_concurrency == 0 {
            return Err(ConfigError::invalid(
                "dispatch.route_concurrency",
                "must be at least 1",
            ));
        }
        self.validate_offline()?;
        self.validate_notify()?;
        self.validate_security()?;
        self.validate_limits()?;
        within("priority.prefetch", self.priority.prefetch, 1..=100_000)?;
        within(
            "priority.prefetch_bytes",
            self.priority.prefetch_bytes,
            (64 << 10)..=(16 << 30),
        )?;
        Ok(())
    }

    /// Credentials and TLS of every connection.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let n = &self.nats;
        let methods = [
            ("nats.password", n.password.is_some()),
            ("nats.token", n.token.is_some()),
            ("nats.nkey", n.nkey.is_some()),
            ("nats.credentials_file", n.credentials_file.is_some()),
        ];
        let chosen: Vec<&str> = methods.iter().filter(|m| m.1).map(|m| m.0).collect();
        if chosen.len() > 1 {
            return Err(ConfigError::invalid(
                chosen[1],
                format!("set one NATS credential, not {}", chosen.join(" and ")),
            ));
        }
        pair("nats.username", &n.username, "nats.password", &n.password)?;
        if let Some(path) = &n.credentials_file {
            std::fs::metadata(path).map_err(|cause| ConfigError::KeyFile {
                key: "nats.credentials_file".into(),
                path: path.clone(),
                cause,
            })?;
        }
        pair(
            "etcd.username",
            &self.etcd.username,
            "etcd.password",
            &self.etcd.password,
        )?;
        if self.redis.username.is_some() && self.redis.password.is_none() {
            return Err(ConfigError::invalid(
                "redis.password",
                "is required with redis.username",
            ));
        }
        for (key, addr) in std::iter::once(("redis.addr", &self.redis.addr)).chain(
            self.redis
                .cluster_addrs
                .iter()
                .map(|a| ("redis.cluster_addrs", a)),
        ) {
            if addr.contains('@') {
                return Err(ConfigError::invalid(
                    key,
                    "carries credentials; set redis.username and redis.password instead",
                ));
            }
            if let Some((scheme, _)) = addr.split_once("://")
                && !["redis", "rediss"].contains(&scheme)
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("`{addr}`: use host:port, redis://host:port or rediss://host:port"),
                ));
            }
        }
        for e in &self.etcd.endpoints {
            if let Some((scheme, _)) = e.split_once("://")
                && !["http", "https"].contains(&scheme)
            {
                return Err(ConfigError::invalid(
                    "etcd.endpoints",
                    format!("`{e}`: use host:port, http:// or https://"),
                ));
            }
        }
        if self.database.password.is_some() && self.database.url.expose().starts_with("sqlite:") {
            return Err(ConfigError::invalid(
                "database.password",
                "SQLite has no password",
            ));
        }
        for (section, tls, names_server) in [
            ("nats.tls", &self.nats.tls, false),
            ("etcd.tls", &self.etcd.tls, true),
            ("redis.tls", &self.redis.tls, false),
            ("gateway.tls", &self.gateway.tls, true),
        ] {
            if let Some(name) = &tls.server_name {
                let key = format!("{section}.server_name");
                if !names_server {
                    return Err(ConfigError::invalid(
                        key,
                        "is not supported here; address the server by a name its certificate carries",
                    ));
                }
                if name.trim().is_empty() {
                    return Err(ConfigError::invalid(key, "must not be empty"));
                }
            }
            crate::tls::TlsMaterial::read(section, tls).map_err(|e| {
                ConfigError::invalid(e.key, format!("{}: {}", e.path.display(), e.reason))
            })?;
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        within(
            "limits.max_payload_bytes",
            l.max_payload_bytes,
            64..=64 * 1024 * 1024,
        )?;
        within(
            "limits.max_content_bytes",
            l.max_content_bytes,
            1..=l.max_payload_bytes,
        )?;
        within("limits.max_members", l.max_members, 1..=10_000_000)?;
        within("limits.max_username_bytes", l.max_username_bytes, 1..=4096)?;
        within(
            "limits.max_session_id_bytes",
            l.max_session_id_bytes,
            1..=4096,
        )?;
        Ok(())
    }

    /// Reads each secret set as a `*_file` path into its key. Setting both
    /// the key and its file is refused; a trailing newline is dropped.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let slots: [(&'static str, &mut Option<Secret>, &Option<PathBuf>); 8] = [
            (
                "nats.password",
                &mut self.nats.password,
                &self.nats.password_file,
            ),
            ("nats.token", &mut self.nats.token, &self.nats.token_file),
            ("nats.nkey", &mut self.nats.nkey, &self.nats.nkey_file),
            (
                "etcd.password",
                &mut self.etcd.password,
                &self.etcd.password_file,
            ),
            (
                "redis.password",
                &mut self.redis.password,
                &self.redis.password_file,
            ),
            (
                "database.password",
                &mut self.database.password,
                &self.database.password_file,
            ),
            (
                "notify.webhook.secret",
                &mut self.notify.webhook.secret,
                &self.notify.webhook.secret_file,
            ),
            (
                "notify.getui.master_secret",
                &mut self.notify.getui.master_secret,
                &self.notify.getui.master_secret_file,
            ),
        ];
        for (key, value, file) in slots {
            let Some(path) = file else { continue };
            if value.is_some() {
                return Err(ConfigError::invalid(
                    key,
                    format!("set {key} or {key}_file, not both"),
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::KeyFile {
                key: format!("{key}_file"),
                path: path.clone(),
                cause,
            })?;
            *value = Some(Secret::new(text.trim_end_matches(['\n', '\r'])));
        }
        Ok(())
    }

    fn validate_offline(&self) -> Result<(), ConfigError> {
        let o = &self.offline;
        if o.park && o.max_messages == 0 {
            return Err(ConfigError::invalid(
                "offline.max_messages",
                "must be at least 1",
            ));
        }
        if o.park {
            positive("offline.ttl", o.ttl)?;
        }
        if o.notice {
            nats_subject("offline.notice_topic", &o.notice_topic)?;
            stream_name("offline.notice_stream", &o.notice_stream)?;
            differs(
                "offline.notice_topic",
                &o.notice_topic,
                "consumer.topic",
                &self.consumer.topic,
            )?;
            differs(
                "offline.notice_stream",
                &o.notice_stream,
                "consumer.stream",
                &self.consumer.stream,
            )?;
            within("offline.notice_batch", o.notice_batch, 1..=10_000)?;
        }
        Ok(())
    }

    fn validate_notify(&self) -> Result<(), ConfigError> {
        let n = &self.notify;
        stream_name("notify.queue_group", &n.queue_group)?;
        stream_name("notify.dead_letter_stream", &n.dead_letter_stream)?;
        nats_subject("notify.dead_letter_topic", &n.dead_letter_topic)?;
        differs(
            "notify.dead_letter_topic",
            &n.dead_letter_topic,
            "offline.notice_topic",
            &self.offline.notice_topic,
        )?;
        within("notify.worker_count", n.worker_count, 1..=10_000)?;
        positive("notify.retry_interval", n.retry_interval)?;
        positive("notify.request_timeout", n.request_timeout)?;
        if n.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "notify.ack_wait",
                "must be at least 1s",
            ));
        }
        if n.max_deliver < 1 {
            return Err(ConfigError::invalid(
                "notify.max_deliver",
                "must be at least 1",
            ));
        }
        let http = |key: &'static str, url: &str| -> Result<(), ConfigError> {
            if url.starts_with("http://") || url.starts_with("https://") {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key,
                    format!("`{url}` is not an http:// or https:// URL"),
                ))
            }
        };
        if !n.webhook.url.is_empty() {
            http("notify.webhook.url", &n.webhook.url)?;
            if n.webhook
                .secret
                .as_ref()
                .is_none_or(|s| s.expose().is_empty())
            {
                return Err(ConfigError::invalid(
                    "notify.webhook.secret",
                    "is required when notify.webhook.url is set",
                ));
            }
        }
        if !n.getui.app_id.is_empty() {
            http("notify.getui.base_url", &n.getui.base_url)?;
            non_empty("notify.getui.app_key", &n.getui.app_key)?;
            if n.getui
                .master_secret
                .as_ref()
                .is_none_or(|s| s.expose().is_empty())
            {
                return Err(ConfigError::invalid(
                    "notify.getui.master_secret",
                    "is required when notify.getui.app_id is set",
                ));
            }
            if !n.getui.cid_key.contains("{username}") {
                return Err(ConfigError::invalid(
                    "notify.getui.cid_key",
                    "must contain `{username}`",
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as YAML, secrets redacted.
    pub fn to_redacted_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serializes to YAML")
    }
}

/// A password or token: never shown by `Debug`, `Display` or serialization.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

const REDACTED: &str = "<redacted>";

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A URL that may carry a password (`mysql://user:pw@host/db`): shown with
/// the password replaced.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Each URL of a comma-separated list with its password (or a NATS
    /// token standing alone before `@`) and any password-like query value
    /// replaced.
    fn redacted(&self) -> String {
        self.0
            .split(',')
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn redact_one_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let tail = redact_query_password(tail);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let masked = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}"),
                // `nats://TOKEN@host`: the lone part is the secret.
                None if ["nats", "tls", "ws", "wss"].contains(&scheme.trim()) => {
                    REDACTED.to_string()
                }
                None => userinfo.to_string(),
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _))
                if ["password", "sslpassword", "pass", "token", "secret"]
                    .iter()
                    .any(|p| k.eq_ignore_ascii_case(p)) =>
            {
                format!("{k}={REDACTED}")
            }
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Accepts a YAML list or one comma-separated string (handy in env vars).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// Durations as integer seconds (the upstream form) or humantime strings
/// (`500ms`, `5s`, `5m`); written back as humantime strings.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => {
                if let Ok(secs) = t.trim().parse::<u64>() {
                    return Ok(Duration::from_secs(secs));
                }
                humantime::parse_duration(t.trim()).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not a duration (use seconds or e.g. `500ms`, `5s`, `2m`): {e}"
                    ))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("resonance-config-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load_yaml(yaml: &str) -> Result<Config, ConfigError> {
        let dir = Scratch::new();
        let path = dir.path().join("task.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load_from(Some(&path), Env::prefixed("RESONANCE_TASK_TEST_NONE__"))
    }

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.consumer.topic, "resonance.push.event.v1");
        assert_eq!(c.consumer.queue_group, "task-service");
        assert_eq!(c.consumer.dead_letter_topic, "resonance.push.dead.v1");
        assert_eq!(c.registry.namespace, "/resonance/services");
        assert_eq!(c.registry.default_ttl, Duration::from_secs(30));
        assert_eq!(c.gateway_service_name.0, "gateway-service");
        assert_eq!(c.gateway.idle_timeout, Duration::from_secs(300));
        assert!(c.dispatch.push_to_sender);
        assert!(c.database.migrates_on_start());
    }

    #[test]
    fn upstream_style_file_loads() {
        let c = load_yaml(
            "consumer:\n  topic: resonance.push.event.v1\n  queue_group: task-service\n  worker_count: 10\n  max_retry: 3\n  retry_interval: 2\nregistry:\n  namespace: /resonance/services\n  default_ttl: 30s\n  enable_cache: true\n  cache_expiration: 1m\ngateway_service_name: gateway-service\n",
        )
        .unwrap();
        assert_eq!(c.consumer.worker_count, 10);
        assert_eq!(c.consumer.retry_interval, Duration::from_secs(2));
        assert_eq!(c.registry.cache_expiration, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_yaml("consumer:\n  wroker_count: 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wroker_count"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = load_yaml("consumer:\n  worker_count: lots\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker_count"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = load_yaml("consumer:\n  worker_count: 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("consumer.worker_count"), "{err}");
        let err = load_yaml("database:\n  url: oracle://x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url"), "{err}");
        let err = load_yaml("consumer:\n  retry_interval: soon\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry_interval"), "{err}");
        let err = load_yaml("consumer:\n  topic: 'a..b'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("consumer.topic"), "{err}");
    }

    #[test]
    fn progress_must_outlive_the_redelivery_horizon() {
        let err = load_yaml("dedup:\n  progress_ttl: 10m\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dedup.progress_ttl") && err.contains("consumer.retry_backoff_max"),
            "{err}"
        );
        load_yaml("dedup:\n  progress_ttl: 10m\nconsumer:\n  max_deliver: 4\n").unwrap();
        let err = load_yaml("consumer:\n  delivery_ceiling: 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("consumer.delivery_ceiling"), "{err}");
        let err = load_yaml("priority:\n  prefetch_bytes: 1000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("priority.prefetch_bytes"), "{err}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/task.yaml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/task.yaml"));
    }

    #[test]
    // The closure's error type is figment's own.
    #[allow(clippy::result_large_err)]
    fn env_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("task.yaml", "consumer:\n  worker_count: 5\n")?;
            jail.set_env("RESONANCE_TASK__CONSUMER__WORKER_COUNT", "7");
            jail.set_env(
                "RESONANCE_TASK__ETCD__ENDPOINTS",
                "http://a:2379,http://b:2379",
            );
            let c = Config::load(Some(Path::new("task.yaml"))).expect("loads");
            assert_eq!(c.consumer.worker_count, 7);
            assert_eq!(c.etcd.endpoints, vec!["http://a:2379", "http://b:2379"]);
            Ok(())
        });
    }

    #[test]
    fn secrets_are_redacted_everywhere() {
        let mut c = Config::default();
        c.redis.password = Some(Secret::new("hunter2"));
        c.nats.password = Some(Secret::new("natspw"));
        c.database.url = SecretUrl::new("mysql://root:dbpw@127.0.0.1:3306/test?password=q");
        let yaml = c.to_redacted_yaml();
        let debug = format!("{c:?}");
        for shown in [&yaml, &debug] {
            for secret in ["hunter2", "natspw", "dbpw", "=q"] {
                assert!(!shown.contains(secret), "{secret} leaked: {shown}");
            }
        }
        assert!(yaml.contains("mysql://root:<redacted>@127.0.0.1:3306/test"));
    }

    #[test]
    fn secrets_come_from_files_and_never_from_both() {
        let dir = Scratch::new();
        let file = dir.path().join("redis-password");
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        let c = load_yaml(&format!(
            "redis:\n  username: task\n  password_file: {}\n",
            file.display()
        ))
        .unwrap();
        assert_eq!(
            c.redis.password.as_ref().unwrap().expose(),
            "s3cret-from-file"
        );
        assert!(!c.to_redacted_yaml().contains("s3cret-from-file"));

        let err = load_yaml(&format!(
            "redis:\n  password: x\n  password_file: {}\n",
            file.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("redis.password"), "{err}");
        let err = load_yaml("nats:\n  token_file: /nonexistent/token\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nats.token_file") && err.contains("/nonexistent/token"),
            "{err}"
        );
    }

    #[test]
    fn credentials_are_checked_and_named() {
        for (yaml, key) in [
            ("nats:\n  token: a\n  nkey: b\n", "nats.nkey"),
            ("nats:\n  username: u\n", "nats.password"),
            ("etcd:\n  password: p\n", "etcd.username"),
            ("redis:\n  username: u\n", "redis.password"),
            ("redis:\n  addr: redis://u:p@h:6379\n", "redis.addr"),
            ("redis:\n  addr: http://h:6379\n", "redis.addr"),
            ("etcd:\n  endpoints: ftp://h:2379\n", "etcd.endpoints"),
            ("database:\n  password: p\n", "database.password"),
            (
                "gateway:\n  tls:\n    cert_file: /nonexistent.pem\n",
                "gateway.tls.key_file",
            ),
            (
                "nats:\n  tls:\n    server_name: x\n",
                "nats.tls.server_name",
            ),
            (
                "etcd:\n  tls:\n    server_name: ' '\n",
                "etcd.tls.server_name",
            ),
            ("limits:\n  max_members: 0\n", "limits.max_members"),
            (
                "limits:\n  max_content_bytes: 99999999\n",
                "limits.max_content_bytes",
            ),
        ] {
            let err = load_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
            assert!(!err.contains("u:p@"), "{err}");
        }
    }

    #[test]
    fn urls_are_redacted_in_lists_and_tokens() {
        let url = SecretUrl::new("nats://tok3n@a:4222,nats://u:pw1@b:4222,tls://c:4222");
        let shown = url.to_string();
        assert_eq!(
            shown,
            "nats://<redacted>@a:4222,nats://u:<redacted>@b:4222,tls://c:4222"
        );
        let url = SecretUrl::new("postgres://u@h/db?sslmode=require&password=pw2");
        assert_eq!(
            url.to_string(),
            "postgres://u@h/db?sslmode=require&password=<redacted>"
        );
    }

    #[test]
    fn durations_accept_seconds_and_humantime() {
        let c = load_yaml("gateway:\n  request_timeout: 750ms\n  idle_timeout: 60\n").unwrap();
        assert_eq!(c.gateway.request_timeout, Duration::from_millis(750));
        assert_eq!(c.gateway.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn shipped_example_is_valid_and_shows_the_defaults() {
        // The example lives at the repository root, two levels up.
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(DEFAULT_CONFIG_PATH);
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(load_yaml(&text).unwrap(), Config::default());
    }

    #[test]
    fn printed_config_loads_back() {
        let c = Config::default();
        let again = load_yaml(&c.to_redacted_yaml()).unwrap();
        assert_eq!(c, again);
    }
}
