//! `database`: the SQL server holding the session tables.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, Secret, SecretUrl, positive};

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
    #[serde(with = "super::duration")]
    pub acquire_timeout: Duration,
    /// Apply `migrations/` at start; unset means yes for SQLite only.
    pub migrate_on_start: Option<bool>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("sqlite://resonance-task.db?mode=rwc"),
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

impl DatabaseConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        let url = self.url.expose();
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
            p.invalid(
                "database.url",
                format!(
                    "`{}` must start with sqlite:, mysql://, mariadb://, postgres:// or postgresql://",
                    self.url
                ),
            );
        }
        if url.starts_with("sqlite::memory:") || url.contains("mode=memory") {
            p.invalid(
                "database.url",
                "an in-memory SQLite database is private to one connection; use a file",
            );
        }
        if self.max_connections == 0 {
            p.invalid("database.max_connections", "must be at least 1");
        }
        p.check(positive("database.acquire_timeout", self.acquire_timeout));
        if self.password.is_some() && url.starts_with("sqlite:") {
            p.invalid("database.password", "SQLite has no password");
        }
    }
}
