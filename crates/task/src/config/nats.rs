//! `nats`: where NATS is and who this service is to it (one credential at
//! most), with TLS.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, Problems, Secret, SecretUrl, TlsConfig, check_tls, non_empty, pair, positive,
};

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
    #[serde(with = "super::duration")]
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

impl NatsConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        let url = self.url.expose();
        for one in url.split(',') {
            if !["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| one.trim().starts_with(s))
                && one.contains("://")
            {
                p.invalid(
                    "nats.url",
                    format!("`{}` has an unknown scheme", SecretUrl::new(one)),
                );
            }
        }
        p.check(non_empty("nats.url", url));
        p.check(positive("nats.connect_timeout", self.connect_timeout));
        let methods = [
            ("nats.password", self.password.is_some()),
            ("nats.token", self.token.is_some()),
            ("nats.nkey", self.nkey.is_some()),
            ("nats.credentials_file", self.credentials_file.is_some()),
        ];
        let chosen: Vec<&str> = methods.iter().filter(|m| m.1).map(|m| m.0).collect();
        if chosen.len() > 1 {
            p.invalid(
                chosen[1],
                format!("set one NATS credential, not {}", chosen.join(" and ")),
            );
        }
        p.check(pair(
            "nats.username",
            &self.username,
            "nats.password",
            &self.password,
        ));
        if let Some(path) = &self.credentials_file
            && let Err(cause) = std::fs::metadata(path)
        {
            p.push(ConfigError::KeyFile {
                key: "nats.credentials_file".into(),
                path: path.clone(),
                cause,
            });
        }
        check_tls(p, "nats.tls", &self.tls, false);
    }
}
