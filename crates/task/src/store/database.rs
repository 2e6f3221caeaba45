//! One sqlx `AnyPool` for SQLite, MySQL/MariaDB and PostgreSQL, the SQL
//! dialect of its URL, the embedded migrations of `migrations/`, and the
//! probe that keeps readiness current.
//!
//! The `Any` driver passes placeholders through untouched, so callers ask
//! [`Dialect::placeholder`] for `?` or `$n` instead of hard-coding either.

use std::str::FromStr;
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::lifecycle::Readiness;

static SQLITE: Migrator = sqlx::migrate!("../../migrations/sqlite");
static MYSQL: Migrator = sqlx::migrate!("../../migrations/mysql");
static POSTGRES: Migrator = sqlx::migrate!("../../migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("database {url}: unsupported URL scheme")]
    Scheme { url: String },
    #[error("database {url}: database.password cannot be set on this URL")]
    Password { url: String },
    #[error("database {url}: {cause}")]
    Connect { url: String, cause: sqlx::Error },
    #[error("migrating database {url}: {cause}")]
    Migrate {
        url: String,
        #[source]
        cause: sqlx::migrate::MigrateError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
    Postgres,
}

impl Dialect {
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Self::Sqlite),
            "mysql" | "mariadb" => Some(Self::MySql),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }

    /// The `n`th (1-based) bind placeholder.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Self::Postgres => format!("${n}"),
            Self::Sqlite | Self::MySql => "?".to_string(),
        }
    }

    /// A multi-row `INSERT` of `rows` rows that leaves existing rows alone.
    pub fn insert_ignore(self, table: &str, columns: &[&str], rows: usize) -> String {
        let mut n = 0;
        let tuples: Vec<String> = (0..rows)
            .map(|_| {
                let row: Vec<String> = columns
                    .iter()
                    .map(|_| {
                        n += 1;
                        self.placeholder(n)
                    })
                    .collect();
                format!("({})", row.join(", "))
            })
            .collect();
        let (verb, tail) = match self {
            Self::MySql => ("INSERT IGNORE", ""),
            Self::Sqlite => ("INSERT OR IGNORE", ""),
            Self::Postgres => ("INSERT", " ON CONFLICT DO NOTHING"),
        };
        format!(
            "{verb} INTO {table} ({}) VALUES {}{tail}",
            columns.join(", "),
            tuples.join(", ")
        )
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Self::Sqlite => &SQLITE,
            Self::MySql => &MYSQL,
            Self::Postgres => &POSTGRES,
        }
    }
}

/// Opens the pool. SQLite gets WAL and a busy timeout so concurrent pods and
/// tools can share one file.
/// The URL to connect with: `database.password`, when set, replaces the
/// URL's own. `None` when the URL cannot hold a password.
fn with_password(cfg: &DatabaseConfig) -> Option<zeroize::Zeroizing<String>> {
    let url = cfg.url.expose();
    let Some(password) = &cfg.password else {
        return Some(zeroize::Zeroizing::new(url.to_string()));
    };
    let mut parsed = url::Url::parse(url).ok()?;
    parsed.set_password(Some(password.expose())).ok()?;
    Some(zeroize::Zeroizing::new(parsed.into()))
}

pub async fn connect_database(cfg: &DatabaseConfig) -> Result<(AnyPool, Dialect), DatabaseError> {
    static DRIVERS: Once = Once::new();
    DRIVERS.call_once(sqlx::any::install_default_drivers);
    let shown = cfg.url.to_string();
    let url = with_password(cfg).ok_or_else(|| DatabaseError::Password { url: shown.clone() })?;
    let url = url.as_str();
    let dialect =
        Dialect::of_url(url).ok_or_else(|| DatabaseError::Scheme { url: shown.clone() })?;
    let options = AnyConnectOptions::from_str(url).map_err(|cause| DatabaseError::Connect {
        url: shown.clone(),
        cause,
    })?;
    let pool = AnyPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(cfg.acquire_timeout)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                match dialect {
                    Dialect::Sqlite => {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    }
                    // Members are read a page per row with GROUP_CONCAT,
                    // which MySQL would cut at 1,024 bytes by default.
                    Dialect::MySql => {
                        conn.execute("SET SESSION group_concat_max_len = 67108864")
                            .await?;
                    }
                    Dialect::Postgres => {}
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|cause| DatabaseError::Connect {
            url: shown.clone(),
            cause,
        })?;
    Ok((pool, dialect))
}

/// Applies the migrations of the pool's dialect. Tables are created with
/// `IF NOT EXISTS`, so this is safe on a database the upstream services
/// already created.
pub async fn migrate(
    pool: &AnyPool,
    dialect: Dialect,
    cfg: &DatabaseConfig,
) -> Result<(), DatabaseError> {
    let started = std::time::Instant::now();
    dialect
        .migrator()
        .run(pool)
        .await
        .map_err(|cause| DatabaseError::Migrate {
            url: cfg.url.to_string(),
            cause,
        })?;
    tracing::info!(database = %cfg.url, elapsed = ?started.elapsed(), "migrations applied");
    Ok(())
}

impl crate::refusal::Refusal for DatabaseError {
    fn refused(&self) -> bool {
        match self {
            Self::Connect { cause, .. } => crate::refusal::refused(cause),
            Self::Password { .. } => true,
            Self::Scheme { .. } | Self::Migrate { .. } => false,
        }
    }
}

/// Keeps `readiness.database_reachable` current with a cheap query every
/// few seconds.
pub async fn watch_reachability(
    pool: sqlx::AnyPool,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let probe = sqlx::query("SELECT 1").execute(&pool);
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Ok(_))
        );
        Readiness::set(&readiness.database_reachable, up);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_and_placeholders() {
        assert_eq!(Dialect::of_url("sqlite://a.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("mysql://r@h/db"), Some(Dialect::MySql));
        assert_eq!(
            Dialect::of_url("postgresql://h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::of_url("oracle://h"), None);
        assert_eq!(Dialect::Postgres.placeholder(2), "$2");
        assert_eq!(Dialect::MySql.placeholder(2), "?");
        assert_eq!(
            Dialect::Postgres.insert_ignore("t", &["a", "b"], 2),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            Dialect::Sqlite.insert_ignore("t", &["a"], 1),
            "INSERT OR IGNORE INTO t (a) VALUES (?)"
        );
    }
}
