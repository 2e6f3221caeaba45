//! `redis`: one server or a Redis Cluster, with an ACL user and TLS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Problems, Secret, TlsConfig, check_tls, non_empty};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port` of a standalone server (ignored when `cluster_addrs` is
    /// set); `rediss://host:port` asks for TLS.
    pub addr: String,
    /// Seed nodes of a Redis Cluster; non-empty selects cluster mode.
    #[serde(deserialize_with = "super::string_list")]
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

impl RedisConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if self.cluster_addrs.is_empty() {
            p.check(non_empty("redis.addr", &self.addr));
        }
        if self.db < 0 {
            p.invalid("redis.db", "must be 0 or more");
        }
        if !self.cluster_addrs.is_empty() && self.db != 0 {
            p.invalid("redis.db", "Redis Cluster only has database 0");
        }
        if self.username.is_some() && self.password.is_none() {
            p.invalid("redis.password", "is required with redis.username");
        }
        let addrs = std::iter::once(("redis.addr", &self.addr)).chain(
            self.cluster_addrs
                .iter()
                .map(|a| ("redis.cluster_addrs", a)),
        );
        for (key, addr) in addrs {
            if addr.contains('@') {
                p.invalid(
                    key,
                    "carries credentials; set redis.username and redis.password instead",
                );
            }
            if let Some((scheme, _)) = addr.split_once("://")
                && !["redis", "rediss"].contains(&scheme)
            {
                p.invalid(
                    key,
                    format!("`{addr}`: use host:port, redis://host:port or rediss://host:port"),
                );
            }
        }
        check_tls(p, "redis.tls", &self.tls, false);
    }
}
