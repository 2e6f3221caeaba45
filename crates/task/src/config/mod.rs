//! Typed configuration: defaults in code, then `config/task.yaml`, then
//! environment variables `RESONANCE_TASK__SECTION__KEY`.
//!
//! One file per section, each struct beside its own `validate`, which
//! reports into `Problems`: every problem is collected and a bad
//! configuration is refused once, listing them all (`checks` has the
//! shared checks, `secret` the secret types, `values` how durations and
//! lists may be written).
//!
//! Key names follow the Resonance task service (`log`, `nats`, `etcd`,
//! `redis`, `registry`, `gateway_service_name`, `consumer`) so an operator's
//! existing file keeps its meaning; `database`, `gateway` and `dispatch` are
//! ours. Everything is validated once at start-up by [`Config::load`]: an
//! unknown key or a bad value refuses to start and the error names the key.
//! Secrets are [`Secret`] values, redacted in `Debug` and when printed;
//! each can instead be read from a file named by the same key with a
//! `_file` suffix (`nats.password_file`), as Kubernetes mounts secrets.

mod checks;
mod consumer;
mod database;
mod dispatch;
mod etcd;
mod gateway;
mod nats;
mod notify;
mod offline;
mod redis;
mod secret;
mod service;
mod values;

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Serialize};

use self::checks::{
    Problems, check_tls, differs, nats_subject, non_empty, pair, positive, stream_name, within,
};
pub use self::consumer::{ConsumerConfig, ConsumerMode, DedupConfig, PriorityConfig};
pub use self::database::DatabaseConfig;
pub use self::dispatch::{DispatchConfig, IdCharset, LimitsConfig};
pub use self::etcd::{EtcdConfig, GatewayServiceName, RegistryConfig};
pub use self::gateway::{GatewayPoolConfig, PushProtocolChoice};
pub use self::nats::NatsConfig;
pub use self::notify::{ApnsConfig, FcmConfig, GetuiConfig, NotifyConfig, WebhookConfig};
pub use self::offline::OfflineConfig;
pub use self::redis::RedisConfig;
pub use self::secret::{Secret, SecretUrl};
pub use self::service::{AdminConfig, LogConfig, LogFormat, ServiceConfig};
pub use self::values::duration;
use self::values::string_list;
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
    Parse(#[source] Box<figment::Error>),
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
    /// More than one problem; each names its key.
    #[error("{} configuration problems:\n{}", .0.len(), list(.0))]
    Several(Vec<ConfigError>),
}

fn list(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
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

    /// Checks every section; all problems are reported at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.service.validate(&mut p);
        self.log.validate(&mut p);
        self.nats.validate(&mut p);
        self.etcd.validate(&mut p);
        self.redis.validate(&mut p);
        self.registry.validate(&mut p);
        self.gateway_service_name.validate(&mut p);
        self.consumer.validate(&mut p);
        self.dedup.validate(&self.consumer, &mut p);
        self.database.validate(&mut p);
        self.gateway.validate(&mut p);
        self.dispatch.validate(&mut p);
        self.offline.validate(&self.consumer, &mut p);
        self.notify.validate(&self.offline, &mut p);
        self.limits.validate(&mut p);
        self.priority.validate(&self.consumer, &mut p);
        p.into_result()
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

    /// The effective configuration as YAML, secrets redacted.
    pub fn to_redacted_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serializes to YAML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn every_problem_is_reported_at_once_each_naming_its_key() {
        let err = load_yaml(
            "consumer:\n  worker_count: 0\n  ack_wait: 0s\ngateway:\n  max_in_flight: 0\nredis:\n  db: -1\n",
        )
        .unwrap_err();
        let ConfigError::Several(problems) = &err else {
            panic!("expected several problems, got {err}");
        };
        let text = err.to_string();
        for key in [
            "consumer.worker_count",
            "consumer.ack_wait",
            "gateway.max_in_flight",
            "redis.db",
        ] {
            assert!(
                text.contains(&format!("`{key}`")),
                "{key} missing in: {text}"
            );
        }
        assert_eq!(problems.len(), 4, "{text}");
        // One problem alone is reported as itself.
        let one = load_yaml("redis:\n  db: -1\n").unwrap_err();
        assert!(
            matches!(&one, ConfigError::Invalid { key, .. } if key == "redis.db"),
            "{one}"
        );
    }

    #[test]
    fn fcm_and_apns_settings_are_checked_when_they_are_on() {
        let err = load_yaml(
            "notify:\n  fcm:\n    service_account_file: /nonexistent/sa.json\n    token_key: fcm\n    base_url: fcm.googleapis.com\n  apns:\n    key_file: /nonexistent/key.p8\n    key_id: short\n    team_id: TEAM123456\n    priority: 7\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "notify.fcm.service_account_file",
            "notify.fcm.token_key",
            "notify.fcm.base_url",
            "notify.apns.key_file",
            "notify.apns.key_id",
            "notify.apns.topic",
            "notify.apns.priority",
        ] {
            assert!(
                text.contains(&format!("`{key}`")),
                "{key} missing in: {text}"
            );
        }
        assert!(!text.contains("notify.apns.team_id"), "{text}");
        // Off (no key file): nothing else is looked at.
        load_yaml("notify:\n  apns:\n    key_id: short\n").unwrap();
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
