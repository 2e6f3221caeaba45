//! The state dispatch reads and writes: session members from SQL
//! ([`MemberStore`]), user routes from Redis ([`RouteStore`]), each
//! event's delivery progress in Redis ([`ProgressStore`]) and messages
//! parked for offline users ([`OfflineStore`]); `membership` keeps the
//! member cache in step with membership-change messages. Neighbours: `dispatch` calls them
//! per event; the reference gateway and the tools write through the same
//! types so key and table layouts live in one place.

mod database;
mod members;
mod membership;
mod offline;
mod progress;
mod redis;
mod routes;

pub use database::{DatabaseError, Dialect, connect_database, migrate, watch_reachability};
pub use members::{MemberError, MemberStore, MemberStream, Members, SessionSeed};
pub use membership::follow_changes as follow_membership_changes;
pub use offline::{OfflineStore, Parked, notice_key, offline_key};
pub use progress::{Progress, ProgressStore, SETTLED, delivered_key, lease_key, settled_key};
pub use redis::{RedisClient, RedisError};
pub use routes::{ROUTE_KEY_PREFIX, ROUTE_TTL, Route, RouteStore, route_key};
