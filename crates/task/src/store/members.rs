//! Session membership from `t_session_member` (contract section 5), read
//! with one indexed query per session and kept in a cache; and the writes
//! the seed tool and tests use to create sessions.
//!
//! The cache serves a session's list for `dispatch.member_cache_ttl` at
//! most. Once an entry is half that old, the next lookup still gets it but
//! starts a re-read in the background, which replaces the entry when it is
//! done; a session with steady traffic is thus never read on the hot path
//! after its first event. A membership-change message drops the entry at
//! once, and a re-read that started before the drop is thrown away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{AnyPool, AssertSqlSafe, Row, SqlSafeStr, SqlStr};

use super::database::Dialect;

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("reading members of session {session_id}: {cause}")]
    Query {
        session_id: String,
        #[source]
        cause: sqlx::Error,
    },
    /// A query shared by concurrent lookups of one session failed.
    #[error("{0}")]
    Shared(#[source] Arc<MemberError>),
    #[error("writing session {session_id}: {cause}")]
    Write {
        session_id: String,
        #[source]
        cause: sqlx::Error,
    },
}

/// A session to create, with its members (`seed` and tests).
#[derive(Debug, Clone)]
pub struct SessionSeed {
    pub session_id: String,
    /// 1 = single, 2 = group.
    pub kind: i16,
    pub name: String,
    pub owner: String,
    pub members: Vec<String>,
}

#[derive(Clone)]
pub struct MemberStore {
    pool: AnyPool,
    dialect: Dialect,
    select_members: SqlStr,
    cache: Option<MemberCache>,
    /// Rows read per session at most: one more than `limits.max_members`,
    /// so a group over the limit is seen without being read whole.
    max_rows: usize,
}

/// Session members kept in-process for a short TTL, bounded by the number
/// of members held; hits and misses feed the hit-ratio gauge.
#[derive(Clone)]
struct MemberCache {
    entries: moka::future::Cache<String, Arc<Cached>>,
    /// Age at which a lookup starts a background re-read.
    refresh_after: Duration,
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

/// One session's cached members.
struct Cached {
    members: Arc<Vec<String>>,
    loaded: Instant,
    /// A background re-read is under way.
    refreshing: AtomicBool,
}

impl Cached {
    fn new(members: Arc<Vec<String>>) -> Arc<Self> {
        Arc::new(Self {
            members,
            loaded: Instant::now(),
            refreshing: AtomicBool::new(false),
        })
    }
}

impl MemberCache {
    fn observe(&self, hit: bool) {
        let (h, m) = if hit {
            (
                self.hits.fetch_add(1, Ordering::Relaxed) + 1,
                self.misses.load(Ordering::Relaxed),
            )
        } else {
            (
                self.hits.load(Ordering::Relaxed),
                self.misses.fetch_add(1, Ordering::Relaxed) + 1,
            )
        };
        metrics::gauge!(crate::telemetry::metrics::MEMBER_CACHE_HIT_RATIO)
            .set(h as f64 / (h + m) as f64);
    }
}

/// Each name once, first occurrence kept (the primary key makes repeats
/// rare; deduplicating here, once per load, spares every event the work).
fn unique(members: Vec<String>) -> Vec<String> {
    let first: Vec<bool> = {
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        members.iter().map(|m| seen.insert(m.as_str())).collect()
    };
    if first.iter().all(|f| *f) {
        return members;
    }
    let mut keep = first.into_iter();
    let mut members = members;
    members.retain(|_| keep.next().unwrap_or(false));
    members
}

/// Rows per multi-row insert: below every dialect's bind-parameter limit.
const INSERT_ROWS: usize = 200;

impl MemberStore {
    pub fn new(pool: AnyPool, dialect: Dialect) -> Self {
        // Built from fixed text and placeholders only: no input reaches SQL.
        let select_members = AssertSqlSafe(format!(
            "SELECT username FROM t_session_member WHERE session_id = {}",
            dialect.placeholder(1)
        ))
        .into_sql_str();
        Self {
            pool,
            dialect,
            select_members,
            cache: None,
            max_rows: usize::MAX,
        }
    }

    /// Caches members for `ttl` (zero turns the cache off), holding at most
    /// `capacity` members over all sessions.
    pub fn with_cache(mut self, ttl: Duration, capacity: u64) -> Self {
        if ttl.is_zero() {
            self.cache = None;
            return self;
        }
        let entries = moka::future::Cache::builder()
            .time_to_live(ttl)
            .max_capacity(capacity)
            .weigher(|_, cached: &Arc<Cached>| {
                cached.members.len().clamp(1, u32::MAX as usize) as u32
            })
            .build();
        self.cache = Some(MemberCache {
            entries,
            refresh_after: ttl / 2,
            hits: Arc::default(),
            misses: Arc::default(),
        });
        self
    }

    /// Reads at most `max_members + 1` members of a session.
    pub fn with_max_members(mut self, max_members: usize) -> Self {
        self.max_rows = max_members.saturating_add(1);
        self
    }

    /// Cache hits and misses so far (`None` without a cache).
    pub fn cache_lookups(&self) -> Option<(u64, u64)> {
        let cache = self.cache.as_ref()?;
        Some((
            cache.hits.load(Ordering::Relaxed),
            cache.misses.load(Ordering::Relaxed),
        ))
    }

    /// Forgets the cached members of `session_id`, so the next event reads
    /// them from SQL. Returns whether a cache is in use.
    pub async fn invalidate(&self, session_id: &str) -> bool {
        match &self.cache {
            Some(cache) => {
                cache.entries.invalidate(session_id).await;
                true
            }
            None => false,
        }
    }

    /// Usernames of every member of `session_id` (empty if none), from the
    /// cache when it has them.
    pub async fn members(&self, session_id: &str) -> Result<Vec<String>, MemberError> {
        Ok(self.shared(session_id).await?.as_ref().clone())
    }

    /// As [`MemberStore::members`], shared with the cache instead of copied.
    pub async fn shared(&self, session_id: &str) -> Result<Arc<Vec<String>>, MemberError> {
        if let Some(hit) = self.cached(session_id).await {
            return Ok(hit);
        }
        let Some(cache) = &self.cache else {
            return Ok(Arc::new(self.query_members(session_id).await?));
        };
        // Concurrent misses for one session share a single query: a burst
        // of events to a large group reads its members once.
        cache
            .entries
            .try_get_with(session_id.to_string(), async {
                self.query_members(session_id)
                    .await
                    .map(|m| Cached::new(Arc::new(m)))
            })
            .await
            .map(|c| c.members.clone())
            .map_err(MemberError::Shared)
    }

    /// The cached members of `session_id`, if the cache holds them (no
    /// SQL); a miss is counted, and an entry past half its TTL is re-read
    /// in the background.
    pub async fn cached(&self, session_id: &str) -> Option<Arc<Vec<String>>> {
        let cache = self.cache.as_ref()?;
        let Some(hit) = cache.entries.get(session_id).await else {
            cache.observe(false);
            return None;
        };
        cache.observe(true);
        if hit.loaded.elapsed() >= cache.refresh_after
            && !hit.refreshing.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(self.clone().refresh(session_id.to_string(), hit.clone()));
        }
        Some(hit.members.clone())
    }

    /// Re-reads a session in the background and replaces `old` with the
    /// result, unless the entry was dropped (a membership change) or
    /// replaced meanwhile.
    async fn refresh(self, session_id: String, old: Arc<Cached>) {
        let Some(cache) = &self.cache else {
            return;
        };
        let members = match self.query_members(&session_id).await {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::debug!(%session_id, error = %e, "background re-read of members failed; the entry stays until its TTL");
                old.refreshing.store(false, Ordering::Release);
                metrics::counter!(crate::telemetry::metrics::MEMBER_CACHE_REFRESHES, "outcome" => "failed").increment(1);
                return;
            }
        };
        let replaced = cache
            .entries
            .entry(session_id)
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if Arc::ptr_eq(entry.value(), &old) => {
                        moka::ops::compute::Op::Put(Cached::new(members))
                    }
                    _ => moka::ops::compute::Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        let outcome = match replaced {
            moka::ops::compute::CompResult::ReplacedWith(_) => "replaced",
            _ => "discarded",
        };
        metrics::counter!(crate::telemetry::metrics::MEMBER_CACHE_REFRESHES, "outcome" => outcome)
            .increment(1);
    }

    async fn query_members(&self, session_id: &str) -> Result<Vec<String>, MemberError> {
        use futures::TryStreamExt;
        let err = |cause| MemberError::Query {
            session_id: session_id.to_string(),
            cause,
        };
        // Rows are streamed and only the name kept, so a large group never
        // has all its rows in memory at once.
        let mut rows = sqlx::query(self.select_members.clone())
            .bind(session_id)
            .fetch(&self.pool);
        let mut members = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(err)? {
            members.push(row.try_get::<String, _>(0).map_err(err)?);
            if members.len() >= self.max_rows {
                break;
            }
        }
        Ok(unique(members))
    }

    /// Creates the session and adds its members; existing rows are kept.
    pub async fn create_session(&self, seed: &SessionSeed) -> Result<(), MemberError> {
        let err = |cause| MemberError::Write {
            session_id: seed.session_id.clone(),
            cause,
        };
        let mut tx = self.pool.begin().await.map_err(err)?;
        let insert_session = self.dialect.insert_ignore(
            "t_session",
            &["session_id", "type", "name", "owner_username"],
            1,
        );
        sqlx::query(AssertSqlSafe(insert_session))
            .bind(&seed.session_id)
            .bind(seed.kind)
            .bind(&seed.name)
            .bind(&seed.owner)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        for chunk in seed.members.chunks(INSERT_ROWS) {
            let sql = self.dialect.insert_ignore(
                "t_session_member",
                &["session_id", "username", "role"],
                chunk.len(),
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for member in chunk {
                let role: i16 = if *member == seed.owner { 1 } else { 0 };
                q = q.bind(&seed.session_id).bind(member).bind(role);
            }
            q.execute(&mut *tx).await.map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// Every session id, oldest first (used by the workload tool).
    pub async fn session_ids(&self) -> Result<Vec<String>, MemberError> {
        let rows = sqlx::query("SELECT session_id FROM t_session ORDER BY session_id")
            .fetch_all(&self.pool)
            .await
            .map_err(|cause| MemberError::Query {
                session_id: "*".into(),
                cause,
            })?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()
            .map_err(|cause| MemberError::Query {
                session_id: "*".into(),
                cause,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_members_are_kept_once_in_order() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unique(names(&["a", "b", "a", "c", "b"])),
            names(&["a", "b", "c"])
        );
        assert_eq!(unique(names(&["a", "b"])), names(&["a", "b"]));
    }
}
