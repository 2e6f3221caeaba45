//! Session membership from `t_session_member` (contract section 5), read
//! with indexed page queries and kept in a cache; and the writes the seed
//! tool and tests use to create sessions. The first pages of sessions read
//! cold at the same time go to the database together, one statement for
//! many sessions ([`FirstPages`]).
//!
//! The cache serves a session's list for `dispatch.member_cache_ttl` at
//! most. Once an entry is half that old, the next lookup still gets it but
//! starts a re-read in the background, which replaces the entry when it is
//! done; a session with steady traffic is thus never read on the hot path
//! after its first event. A membership-change message drops the entry at
//! once, and a re-read that started before the drop is thrown away.
//!
//! A session read cold is read once however many events ask for it at the
//! same time, and its rows are handed out window by window as they arrive
//! ([`Members::Streaming`]): an event to a 100,000-member group pushes its
//! first window while SQL is still sending the rest, instead of waiting for
//! the whole list. The finished list goes into the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// The first page of a session's members, and each page after a key.
    first_page: SqlStr,
    next_page: SqlStr,
    count_members: SqlStr,
    cache: Option<MemberCache>,
    /// Cold reads under way, by session: a lookup that misses the cache
    /// joins the read already running for its session.
    loads: Arc<Mutex<HashMap<String, Arc<Loading>>>>,
    /// Rows read per session at most: one more than `limits.max_members`,
    /// so a group over the limit is seen without being read whole.
    max_rows: usize,
    /// Reads first pages together (started at the first read).
    first_pages: Arc<OnceLock<FirstPages>>,
}

/// A page of members: its last name, and its names joined (see
/// [`page_sql`]); both `None` for a session without members.
type Page = (Option<String>, Option<String>);

/// Sessions read by one first-pages statement at most.
const FIRST_PAGES_AT_ONCE: usize = 64;
// Their positions are written with two digits (`first_pages_sql`).
const _: () = assert!(FIRST_PAGES_AT_ONCE <= 100);

/// First-pages statements running at once at most.
const FIRST_PAGE_STATEMENTS: usize = 4;

/// Reads the first pages of cold sessions. A session asked for while
/// [`FIRST_PAGE_STATEMENTS`] statements are running waits for one to end,
/// and every session that waited meanwhile is read by the next statement
/// ([`first_pages_sql`], up to [`FIRST_PAGES_AT_ONCE`] sessions): when many
/// events miss the cache at once (one-to-one traffic spread over more
/// conversations than stay cached), the database runs one statement for
/// many sessions and the pool hands out one connection, where each session
/// cost both. A session asked for alone is read at once.
struct FirstPages {
    asks: tokio::sync::mpsc::UnboundedSender<PageAsk>,
}

struct PageAsk {
    session_id: String,
    reply: tokio::sync::oneshot::Sender<Result<Page, Arc<MemberError>>>,
}

impl FirstPages {
    fn start(pool: AnyPool, dialect: Dialect) -> Self {
        let (asks, waiting) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(read_first_pages(pool, dialect, waiting));
        Self { asks }
    }

    /// The first page of `session_id`; `None` when the reader is gone
    /// (its runtime ended), so the caller reads alone.
    async fn read(&self, session_id: &str) -> Option<Result<Page, MemberError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = PageAsk {
            session_id: session_id.to_string(),
            reply,
        };
        self.asks.send(ask).ok()?;
        Some(answer.await.ok()?.map_err(MemberError::Shared))
    }
}

/// Takes the sessions asked for, as many as are waiting, into one statement
/// whenever fewer than [`FIRST_PAGE_STATEMENTS`] are running.
async fn read_first_pages(
    pool: AnyPool,
    dialect: Dialect,
    mut waiting: tokio::sync::mpsc::UnboundedReceiver<PageAsk>,
) {
    let statements = Arc::new(tokio::sync::Semaphore::new(FIRST_PAGE_STATEMENTS));
    loop {
        let Ok(statement) = statements.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut asks = vec![first];
        while asks.len() < FIRST_PAGES_AT_ONCE {
            match waiting.try_recv() {
                Ok(ask) => asks.push(ask),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            answer_first_pages(&pool, dialect, asks).await;
            drop(statement);
        });
    }
}

/// Reads the first pages of `asks` in one statement and answers each.
async fn answer_first_pages(pool: &AnyPool, dialect: Dialect, asks: Vec<PageAsk>) {
    let sql = first_pages_sql(dialect, asks.len());
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for ask in &asks {
        query = query.bind(ask.session_id.clone());
    }
    let pages = query.fetch_all(pool).await.and_then(|rows| {
        let mut pages: Vec<Option<Page>> = vec![None; asks.len()];
        for row in rows {
            let at: String = row.try_get(0)?;
            let slot = at
                .parse::<usize>()
                .ok()
                .and_then(|at| pages.get_mut(at))
                .ok_or_else(|| {
                    sqlx::Error::Decode(format!("a first page for no session asked: {at:?}").into())
                })?;
            *slot = Some((row.try_get(1)?, row.try_get(2)?));
        }
        Ok(pages)
    });
    let pages = match pages {
        Ok(pages) => pages,
        Err(cause) => {
            let error = Arc::new(MemberError::Query {
                session_id: sessions_named(&asks),
                cause,
            });
            for ask in asks {
                let _ = ask.reply.send(Err(error.clone()));
            }
            return;
        }
    };
    for (ask, page) in asks.into_iter().zip(pages) {
        let answer = page.ok_or_else(|| {
            Arc::new(MemberError::Query {
                session_id: ask.session_id.clone(),
                cause: sqlx::Error::RowNotFound,
            })
        });
        let _ = ask.reply.send(answer);
    }
}

/// The sessions of one statement, for an error: the first few by name.
fn sessions_named(asks: &[PageAsk]) -> String {
    const NAMED: usize = 3;
    let named: Vec<&str> = asks
        .iter()
        .take(NAMED)
        .map(|a| a.session_id.as_str())
        .collect();
    match asks.len().saturating_sub(NAMED) {
        0 => named.join(", "),
        more => format!("{} and {more} more", named.join(", ")),
    }
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
        crate::telemetry::metrics::event_series()
            .member_cache_hit_ratio
            .set(h as f64 / (h + m) as f64);
    }
}

/// Members one SQL page holds at most.
const PAGE_ROWS: usize = 2000;

/// One page of a session's members, read in the member key's order from
/// `after` on (exclusive; from the start when `None`): a single row with
/// the page's last name and its names concatenated, each as
/// `<byte length>:<name>`, so any name splits back exactly. One row per
/// page instead of one per member is what makes a 100,000-member read
/// cheap: a row costs the driver far more than its bytes do.
///
/// The LIMIT is written into the text, never bound: SQLite plans a bound
/// LIMIT by its value, so it compiles such a statement again at every
/// execution and the prepared-statement cache saves nothing.
fn page_sql(dialect: Dialect, after: bool) -> String {
    page_select(dialect, "", 1, after.then_some(2), "page")
}

/// The page query of [`page_sql`] with `first_columns` selected before the
/// page's columns, the session bound at placeholder `session` and the key
/// (if any) at `key`, the page's table named `alias`.
fn page_select(
    dialect: Dialect,
    first_columns: &str,
    session: usize,
    key: Option<usize>,
    alias: &str,
) -> String {
    let key = key
        .map(|n| format!(" AND username > {}", dialect.placeholder(n)))
        .unwrap_or_default();
    let names = match dialect {
        Dialect::Sqlite => "group_concat(length(CAST(username AS BLOB)) || ':' || username, '')",
        Dialect::MySql => "GROUP_CONCAT(CONCAT(LENGTH(username), ':', username) SEPARATOR '')",
        Dialect::Postgres => "string_agg(octet_length(username) || ':' || username, '')",
    };
    format!(
        "SELECT {first_columns}MAX(username), {names} FROM (SELECT username FROM t_session_member \
         WHERE session_id = {}{key} ORDER BY username LIMIT {PAGE_ROWS}) AS {alias}",
        dialect.placeholder(session)
    )
}

/// The first pages of `sessions` sessions in one statement: the page query
/// once per session, `UNION ALL`ed, each row led by its session's position
/// since a union's rows come in no promised order. The position is text
/// of two digits in every member of the union (at most
/// [`FIRST_PAGES_AT_ONCE`] of them), so no dialect types the column by its
/// first member and cuts the others short.
fn first_pages_sql(dialect: Dialect, sessions: usize) -> String {
    (0..sessions)
        .map(|i| {
            page_select(
                dialect,
                &format!("'{i:02}', "),
                i + 1,
                None,
                &format!("page{i}"),
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Counts a session's members up to `at_most` (one query that stops
/// there; the bound is in the text for the reason `page_sql` gives).
fn count_sql(dialect: Dialect, at_most: usize) -> String {
    format!(
        "SELECT COUNT(*) FROM (SELECT 1 FROM t_session_member WHERE session_id = {} LIMIT {}) AS m",
        dialect.placeholder(1),
        i64::try_from(at_most).unwrap_or(i64::MAX)
    )
}

/// Splits `<byte length>:<name>` runs back into names.
fn split_page(page: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut rest = page;
    while !rest.is_empty() {
        let (len, tail) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        names.push(tail.get(..len)?.to_string());
        rest = &tail[len..];
    }
    Some(names)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Drops `session_id`'s cache entry if it is still `entry`.
async fn drop_entry_if(cache: &MemberCache, session_id: &str, entry: &Arc<Cached>) {
    cache
        .entries
        .entry(session_id.to_string())
        .and_compute_with(|current| {
            std::future::ready(match current {
                Some(c) if Arc::ptr_eq(c.value(), entry) => moka::ops::compute::Op::Remove,
                _ => moka::ops::compute::Op::Nop,
            })
        })
        .await;
}

/// A session's members, as [`MemberStore::lookup`] finds them.
pub enum Members {
    /// Every member: cached, or read whole before the first window filled.
    Whole(Arc<Vec<String>>),
    /// A session wider than one window, still being read from SQL.
    Streaming(Box<MemberStream>),
}

/// One cold read of a session, shared by every lookup that joins it.
struct Loading {
    state: Mutex<LoadState>,
    /// Bumped whenever rows arrive or the read ends.
    changed: tokio::sync::watch::Sender<()>,
    /// The session was dropped from the cache while being read: the
    /// result is handed out but not cached.
    stale: AtomicBool,
    /// The session's size, counted once for every event reading it.
    size: tokio::sync::OnceCell<Result<usize, Arc<MemberError>>>,
}

enum LoadState {
    Reading(Vec<String>),
    Done(Arc<Vec<String>>),
    Failed(Arc<MemberError>),
}

impl Loading {
    fn new() -> Self {
        Self {
            state: Mutex::new(LoadState::Reading(Vec::new())),
            changed: tokio::sync::watch::Sender::new(()),
            stale: AtomicBool::new(false),
            size: tokio::sync::OnceCell::new(),
        }
    }

    fn append(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        if let LoadState::Reading(read) = &mut *lock(&self.state) {
            read.extend(names);
        }
        self.changed.send_replace(());
    }

    fn finish(&self) -> Arc<Vec<String>> {
        let all = {
            let mut state = lock(&self.state);
            let all = match &mut *state {
                LoadState::Reading(read) => Arc::new(std::mem::take(read)),
                LoadState::Done(all) => all.clone(),
                LoadState::Failed(_) => Arc::default(),
            };
            *state = LoadState::Done(all.clone());
            all
        };
        self.changed.send_replace(());
        all
    }

    fn fail(&self, error: MemberError) -> Arc<MemberError> {
        let error = Arc::new(error);
        *lock(&self.state) = LoadState::Failed(error.clone());
        self.changed.send_replace(());
        error
    }
}

/// A session's members handed out window by window while SQL still sends
/// them; every window is each name once, in the order read.
pub struct MemberStream {
    load: Arc<Loading>,
    changes: tokio::sync::watch::Receiver<()>,
    store: MemberStore,
    session_id: String,
    /// Members handed out so far.
    next: usize,
}

/// What a stream can see of its read.
enum Seen {
    /// The rows asked for.
    Rows(Vec<String>),
    /// Fewer than wanted so far; more to come.
    Waiting,
    /// Every member, read to the end.
    All(Arc<Vec<String>>),
}

impl MemberStream {
    fn new(load: Arc<Loading>, store: MemberStore, session_id: &str) -> Self {
        let mut changes = load.changed.subscribe();
        changes.mark_changed();
        Self {
            load,
            changes,
            store,
            session_id: session_id.to_string(),
            next: 0,
        }
    }

    fn look(&self, from: usize, to: usize) -> Result<Seen, MemberError> {
        match &*lock(&self.load.state) {
            LoadState::Reading(read) if read.len() >= to => Ok(Seen::Rows(read[from..to].to_vec())),
            LoadState::Reading(_) => Ok(Seen::Waiting),
            LoadState::Done(all) => Ok(Seen::All(all.clone())),
            LoadState::Failed(e) => Err(MemberError::Shared(e.clone())),
        }
    }

    /// Waits until `rows` members are read or the read ends: the whole
    /// list if it ended, `None` while it goes on.
    async fn wait_for(&mut self, rows: usize) -> Result<Option<Arc<Vec<String>>>, MemberError> {
        loop {
            let _ = self.changes.changed().await;
            match &*lock(&self.load.state) {
                LoadState::Reading(read) if read.len() >= rows => return Ok(None),
                LoadState::Reading(_) => {}
                LoadState::Done(all) => return Ok(Some(all.clone())),
                LoadState::Failed(e) => return Err(MemberError::Shared(e.clone())),
            }
        }
    }

    /// Waits for the read to end and returns every member.
    async fn whole(mut self) -> Result<Arc<Vec<String>>, MemberError> {
        loop {
            if let Some(all) = self.wait_for(usize::MAX).await? {
                return Ok(all);
            }
        }
    }

    /// The next `n` members (fewer at the end), as soon as they are read;
    /// `None` once every member was handed out.
    pub async fn next_window(&mut self, n: usize) -> Option<Result<Vec<String>, MemberError>> {
        let (from, to) = (self.next, self.next.saturating_add(n.max(1)));
        loop {
            let seen = match self.look(from, to) {
                Ok(seen) => seen,
                Err(e) => return Some(Err(e)),
            };
            let window = match seen {
                Seen::Rows(rows) => rows,
                Seen::All(all) if from >= all.len() => return None,
                Seen::All(all) => all[from..to.min(all.len())].to_vec(),
                Seen::Waiting => {
                    let _ = self.changes.changed().await;
                    continue;
                }
            };
            self.next += window.len();
            return Some(Ok(window));
        }
    }

    /// Members handed out so far (every member once the stream ended).
    pub fn handed_out(&self) -> usize {
        self.next
    }

    /// The session's members counted up to the rows a read takes at most
    /// (one more than `limits.max_members`) by one query shared with every
    /// event reading this session now (a limit is checked before anything
    /// is pushed, without waiting for the whole list).
    pub async fn count(&self) -> Result<usize, MemberError> {
        self.load
            .size
            .get_or_init(|| async { self.store.count(&self.session_id).await.map_err(Arc::new) })
            .await
            .clone()
            .map_err(MemberError::Shared)
    }
}

/// Turns a failed query about `session_id` into the error that names it.
fn query_error(session_id: &str) -> impl Fn(sqlx::Error) -> MemberError + Copy + '_ {
    move |cause| MemberError::Query {
        session_id: session_id.to_string(),
        cause,
    }
}

/// Rows per multi-row insert: below every dialect's bind-parameter limit.
const INSERT_ROWS: usize = 200;

impl MemberStore {
    pub fn new(pool: AnyPool, dialect: Dialect) -> Self {
        // Built from fixed text, placeholders and numbers only: no input
        // reaches SQL.
        let first_page = AssertSqlSafe(page_sql(dialect, false)).into_sql_str();
        let next_page = AssertSqlSafe(page_sql(dialect, true)).into_sql_str();
        let count_members = AssertSqlSafe(count_sql(dialect, usize::MAX)).into_sql_str();
        Self {
            pool,
            dialect,
            first_page,
            next_page,
            count_members,
            cache: None,
            loads: Arc::default(),
            max_rows: usize::MAX,
            first_pages: Arc::default(),
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
        // A read another store started would not fill this cache.
        self.loads = Arc::default();
        self
    }

    /// Reads at most `max_members + 1` members of a session.
    pub fn with_max_members(mut self, max_members: usize) -> Self {
        self.max_rows = max_members.saturating_add(1);
        self.count_members = AssertSqlSafe(count_sql(self.dialect, self.max_rows)).into_sql_str();
        // Reads under way elsewhere were made with another bound.
        self.loads = Arc::default();
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
        let load = lock(&self.loads).remove(session_id);
        if let Some(load) = load {
            load.stale.store(true, Ordering::Release);
        }
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
        self.load(session_id).whole().await
    }

    /// The members of `session_id`: from the cache, or read from SQL. A
    /// session read cold that turns out wider than `window` members comes
    /// back as a stream as soon as its first window is in, and the rest
    /// arrives while the caller works through it.
    pub async fn lookup(&self, session_id: &str, window: usize) -> Result<Members, MemberError> {
        if let Some(hit) = self.cached(session_id).await {
            return Ok(Members::Whole(hit));
        }
        let mut stream = self.load(session_id);
        match stream.wait_for(window.saturating_add(1)).await? {
            Some(all) => Ok(Members::Whole(all)),
            None => Ok(Members::Streaming(Box::new(stream))),
        }
    }

    /// Joins the read of `session_id` under way, or starts one.
    fn load(&self, session_id: &str) -> MemberStream {
        let mut loads = lock(&self.loads);
        if let Some(load) = loads.get(session_id) {
            return MemberStream::new(load.clone(), self.clone(), session_id);
        }
        let load = Arc::new(Loading::new());
        loads.insert(session_id.to_string(), load.clone());
        drop(loads);
        // A task of its own: the read finishes and fills the cache even if
        // the event that started it is dropped.
        tokio::spawn(
            self.clone()
                .read_into_cache(session_id.to_string(), load.clone()),
        );
        MemberStream::new(load, self.clone(), session_id)
    }

    /// Reads `session_id` into `load` batch by batch, then caches the whole
    /// list unless the session was dropped from the cache meanwhile.
    async fn read_into_cache(self, session_id: String, load: Arc<Loading>) {
        let read = self
            .read_rows(&session_id, |batch| load.append(batch))
            .await;
        let outcome = match read {
            Ok(()) => {
                let all = load.finish();
                self.cache_loaded(&session_id, &load, all).await;
                Ok(())
            }
            Err(e) => Err(load.fail(e)),
        };
        {
            let mut loads = lock(&self.loads);
            if loads
                .get(&session_id)
                .is_some_and(|l| Arc::ptr_eq(l, &load))
            {
                loads.remove(&session_id);
            }
        }
        if let Err(e) = outcome {
            tracing::debug!(%session_id, error = %e, "reading members failed");
        }
    }

    /// Puts a finished read in the cache; if the session was dropped while
    /// it was read, the entry is taken out again (only this one: a newer
    /// read may have replaced it).
    async fn cache_loaded(&self, session_id: &str, load: &Loading, all: Arc<Vec<String>>) {
        let Some(cache) = &self.cache else {
            return;
        };
        if load.stale.load(Ordering::Acquire) {
            return;
        }
        let entry = Cached::new(all);
        cache
            .entries
            .insert(session_id.to_string(), entry.clone())
            .await;
        if load.stale.load(Ordering::Acquire) {
            drop_entry_if(cache, session_id, &entry).await;
        }
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
        let mut read = Vec::new();
        let members = match self
            .read_rows(&session_id, |batch| read.extend(batch))
            .await
        {
            Ok(()) => Arc::new(read),
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

    /// Reads the members of `session_id`, at most `max_rows`, page by page
    /// in the member key's order, handing each page to `batch` as it
    /// arrives. Each name comes once: every page starts past the last one.
    async fn read_rows(
        &self,
        session_id: &str,
        mut batch: impl FnMut(Vec<String>),
    ) -> Result<(), MemberError> {
        let err = query_error(session_id);
        let mut read = 0;
        let mut after: Option<String> = None;
        while read < self.max_rows {
            let (last, joined) = match &after {
                None => self.first_page(session_id).await?,
                Some(key) => self.page(session_id, Some(key)).await?,
            };
            let mut names = split_page(joined.as_deref().unwrap_or_default()).ok_or_else(|| {
                err(sqlx::Error::Decode(
                    format!("a page of members that does not split into names: {joined:?}").into(),
                ))
            })?;
            let full = names.len() == PAGE_ROWS;
            names.truncate(self.max_rows - read);
            read += names.len();
            batch(names);
            match last {
                Some(last) if full => after = Some(last),
                _ => break,
            }
        }
        Ok(())
    }

    /// The first page of `session_id`'s members, read together with the
    /// first pages other reads ask for meanwhile ([`FirstPages`]).
    async fn first_page(&self, session_id: &str) -> Result<Page, MemberError> {
        let pages = self
            .first_pages
            .get_or_init(|| FirstPages::start(self.pool.clone(), self.dialect));
        match pages.read(session_id).await {
            Some(page) => page,
            None => self.page(session_id, None).await,
        }
    }

    /// One page of `session_id`'s members, read alone: from the start, or
    /// past `after`.
    async fn page(&self, session_id: &str, after: Option<&str>) -> Result<Page, MemberError> {
        let err = query_error(session_id);
        let query = match after {
            None => sqlx::query(self.first_page.clone()).bind(session_id),
            Some(key) => sqlx::query(self.next_page.clone())
                .bind(session_id)
                .bind(key.to_string()),
        };
        let row = query.fetch_one(&self.pool).await.map_err(err)?;
        Ok((row.try_get(0).map_err(err)?, row.try_get(1).map_err(err)?))
    }

    /// Members of `session_id`, counted up to `max_rows` (one query that
    /// stops there).
    async fn count(&self, session_id: &str) -> Result<usize, MemberError> {
        let err = query_error(session_id);
        let row = sqlx::query(self.count_members.clone())
            .bind(session_id)
            .fetch_one(&self.pool)
            .await
            .map_err(err)?;
        let n = row.try_get::<i64, _>(0).map_err(err)?;
        Ok(usize::try_from(n).unwrap_or(0))
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
    fn pages_split_back_into_the_names_they_joined() {
        let names = ["a", "b:c", "12:x", "", "ünï", "d\ne"];
        let joined: String = names.iter().map(|n| format!("{}:{n}", n.len())).collect();
        assert_eq!(split_page(&joined).unwrap(), names);
        assert_eq!(split_page("").unwrap(), Vec::<String>::new());
        assert!(split_page("3:ab").is_none(), "short name");
        assert!(split_page("x:ab").is_none(), "no length");
        assert!(split_page("1:ü").is_none(), "length inside a character");
    }

    #[tokio::test]
    async fn a_stream_hands_out_windows_as_rows_arrive() {
        let load = Arc::new(Loading::new());
        let names = |r: std::ops::Range<usize>| r.map(|i| format!("u{i}")).collect::<Vec<_>>();
        load.append(names(0..3));
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect_lazy("sqlite::memory:").expect("lazy pool");
        let store = MemberStore::new(pool, Dialect::Sqlite);
        let mut stream = MemberStream::new(load.clone(), store, "s");
        assert_eq!(
            stream.wait_for(2).await.unwrap(),
            None,
            "3 rows, still reading"
        );
        assert_eq!(stream.next_window(2).await.unwrap().unwrap(), names(0..2));
        let later = {
            let load = load.clone();
            tokio::spawn(async move {
                load.append(names(3..5));
                load.finish();
            })
        };
        assert_eq!(stream.next_window(2).await.unwrap().unwrap(), names(2..4));
        later.await.unwrap();
        assert_eq!(stream.next_window(2).await.unwrap().unwrap(), names(4..5));
        assert!(stream.next_window(2).await.is_none(), "all handed out");
        assert_eq!(stream.handed_out(), 5);
    }
}
