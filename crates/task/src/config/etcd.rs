//! `etcd` (where the registry is, with credentials and TLS), `registry`
//! (the key prefix and how often it is listed again) and
//! `gateway_service_name` (whose instances are gateways).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, Secret, TlsConfig, check_tls, non_empty, pair, positive};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    #[serde(deserialize_with = "super::string_list")]
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// `https://` endpoints ask for TLS.
    pub tls: TlsConfig,
    #[serde(with = "super::duration")]
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
pub struct RegistryConfig {
    /// etcd key prefix of the service registry.
    pub namespace: String,
    /// Lease TTL the reference gateway registers with.
    #[serde(with = "super::duration")]
    pub default_ttl: Duration,
    /// Accepted for compatibility: the registry is always a watched
    /// in-memory map, never a round trip per push.
    pub enable_cache: bool,
    /// How often the whole prefix is listed again as a safety net behind the
    /// watch.
    #[serde(with = "super::duration")]
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

impl EtcdConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if self.endpoints.is_empty() {
            p.invalid("etcd.endpoints", "needs at least one endpoint");
        }
        for e in &self.endpoints {
            p.check(non_empty("etcd.endpoints", e));
            if let Some((scheme, _)) = e.split_once("://")
                && !["http", "https"].contains(&scheme)
            {
                p.invalid(
                    "etcd.endpoints",
                    format!("`{e}`: use host:port, http:// or https://"),
                );
            }
        }
        p.check(positive("etcd.dial_timeout", self.dial_timeout));
        p.check(pair(
            "etcd.username",
            &self.username,
            "etcd.password",
            &self.password,
        ));
        check_tls(p, "etcd.tls", &self.tls, true);
    }
}

impl RegistryConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if !self.namespace.starts_with('/') {
            p.invalid(
                "registry.namespace",
                format!("`{}` must start with `/`", self.namespace),
            );
        }
        p.check(positive("registry.default_ttl", self.default_ttl));
        p.check(positive("registry.cache_expiration", self.cache_expiration));
    }
}

impl GatewayServiceName {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(non_empty("gateway_service_name", &self.0));
        if self.0.contains('/') {
            p.invalid("gateway_service_name", "must not contain `/`");
        }
    }
}
