//! One Redis handle for a standalone server or a Redis Cluster, chosen by
//! `redis.cluster_addrs`. Both variants multiplex many concurrent commands
//! on few connections and reconnect on their own; a command issued while
//! Redis is down fails fast instead of queueing without bound.
//!
//! On a cluster, a command that times out or loses its connection (a
//! master died and its replica is taking over) also has the cluster
//! connection rebuilt from the configured nodes, at most once a second:
//! the client library's own recovery can stay stuck on the dead master.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionAddr, FromRedisValue, IntoConnectionInfo, Pipeline};

use crate::config::RedisConfig;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis address `{addr}` is not host:port")]
    Address { addr: String },
    #[error("redis {addr}: {cause}")]
    Redis {
        addr: String,
        #[source]
        cause: redis::RedisError,
    },
    #[error("redis TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl crate::refusal::Refusal for RedisError {
    fn refused(&self) -> bool {
        match self {
            Self::Redis { cause, .. } => crate::refusal::refused(cause),
            Self::Tls(_) => true,
            Self::Address { .. } => false,
        }
    }
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A cluster connection that can be replaced by a fresh one.
struct Cluster {
    client: redis::cluster::ClusterClient,
    current: std::sync::RwLock<ClusterConnection>,
    /// When it was last rebuilt; one rebuild at a time.
    rebuilt: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Which master serves which slots, for reads of many keys.
    slots: std::sync::RwLock<Option<Arc<SlotMap>>>,
}

/// `CLUSTER SLOTS`: (first slot, last slot, master host, master port).
type SlotMap = Vec<(u16, u16, String, u16)>;

/// The hash slot of `key` (CRC16-XMODEM of its hash tag, or of the whole
/// key without one).
fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|b| *b == b'}')
                .filter(|close| *close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

/// The keys of an `MGET` of more than one key.
fn mget_keys(cmd: &Cmd) -> Option<Vec<Vec<u8>>> {
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(bytes) => bytes,
        _ => &[],
    });
    if !args.next()?.eq_ignore_ascii_case(b"MGET") {
        return None;
    }
    let keys: Vec<Vec<u8>> = args.map(<[u8]>::to_vec).collect();
    (keys.len() > 1).then_some(keys)
}

fn parse_slots(value: redis::Value) -> Option<SlotMap> {
    use redis::Value;
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let Value::Array(ranges) = value else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let Value::Array(master) = parts.get(2)? else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            Some((
                int(parts.first()?)?,
                int(parts.get(1)?)?,
                host,
                int(master.get(1)?)?,
            ))
        })
        .collect()
}

/// Rebuilds at most this often.
const REBUILD_INTERVAL: Duration = Duration::from_secs(1);

impl Cluster {
    async fn slot_map(&self) -> Option<Arc<SlotMap>> {
        if let Some(map) = self
            .slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            return Some(map);
        }
        let mut ask = redis::cmd("CLUSTER");
        ask.arg("SLOTS");
        let answer = self
            .connection()
            .route_command(
                ask,
                redis::cluster_routing::RoutingInfo::SingleNode(
                    redis::cluster_routing::SingleNodeRoutingInfo::Random,
                ),
            )
            .await
            .ok()?;
        let map = Arc::new(parse_slots(answer)?);
        *self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(map.clone());
        Some(map)
    }

    fn forget_slots(&self) {
        *self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The values of `keys` in one pipeline per master, instead of the
    /// client library's one command per slot (keys without a shared hash
    /// tag, like routes, spread over as many slots as there are keys).
    /// `None` when the slot map is stale or a node answered otherwise: the
    /// caller then reads them the library's way.
    async fn mget(&self, keys: &[Vec<u8>]) -> Option<redis::Value> {
        let map = self.slot_map().await?;
        let mut by_node: std::collections::HashMap<(&str, u16), Vec<usize>> =
            std::collections::HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let slot = slot_of(key);
            let (_, _, host, port) = map.iter().find(|(a, b, ..)| (*a..=*b).contains(&slot))?;
            by_node.entry((host.as_str(), *port)).or_default().push(i);
        }
        let reads = by_node.into_iter().map(|((host, port), indices)| {
            let mut pipe = redis::pipe();
            for &i in &indices {
                pipe.cmd("GET").arg(&keys[i]);
            }
            let route = redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                host: host.to_string(),
                port,
            };
            let mut conn = self.connection();
            async move {
                let count = indices.len();
                let values = conn.route_pipeline(pipe, 0, count, route).await;
                (indices, values)
            }
        });
        let mut out = vec![redis::Value::Nil; keys.len()];
        for (indices, values) in futures::future::join_all(reads).await {
            let values = values.ok()?;
            if values.len() != indices.len()
                || values
                    .iter()
                    .any(|v| matches!(v, redis::Value::ServerError(_)))
            {
                self.forget_slots();
                return None;
            }
            for (i, v) in indices.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Some(redis::Value::Array(out))
    }

    fn connection(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After `error`: a new connection (fresh slot map, fresh sockets) when
    /// the error says the node is gone or silent.
    async fn recover(&self, error: &redis::RedisError) {
        if !(error.is_timeout() || error.is_io_error() || error.is_connection_dropped()) {
            return;
        }
        let mut rebuilt = self.rebuilt.lock().await;
        if rebuilt.is_some_and(|at| at.elapsed() < REBUILD_INTERVAL) {
            return;
        }
        *rebuilt = Some(tokio::time::Instant::now());
        match tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_connection()).await {
            Ok(Ok(fresh)) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                tracing::warn!(%error, "Redis Cluster connection rebuilt");
                metrics::counter!(crate::telemetry::metrics::RECONNECTS, "dependency" => "redis")
                    .increment(1);
            }
            Ok(Err(e)) => {
                tracing::warn!(%error, rebuild_error = %e, "Redis Cluster connection not rebuilt; trying again")
            }
            Err(_) => {
                tracing::warn!(%error, "Redis Cluster connection not rebuilt in time; trying again")
            }
        }
    }
}

#[derive(Clone)]
pub struct RedisClient {
    connection: Connection,
    /// For error messages.
    addr: String,
}

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Single-key pipelines in flight at once on a cluster (see `per_key`).
const CLUSTER_GROUPS_IN_FLIGHT: usize = 64;

/// The address of `addr` (`host:port`, `redis://host:port` or
/// `rediss://host:port`), with TLS when it says `rediss://` or `tls`.
fn connection_addr(addr: &str, tls: bool) -> Result<ConnectionAddr, RedisError> {
    let tls = tls || addr.trim().starts_with("rediss://");
    let (host, port) = host_port(addr)?;
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    })
}

/// The CA bundle and client identity of `redis.tls`, for the client.
fn certificates(cfg: &RedisConfig) -> Result<redis::TlsCertificates, RedisError> {
    crate::tls::install_provider();
    let material = crate::tls::TlsMaterial::read("redis.tls", &cfg.tls)?;
    Ok(redis::TlsCertificates {
        client_tls: match (&material.cert, &material.key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: cert.to_vec(),
                client_key: key.to_vec(),
            }),
            _ => None,
        },
        root_cert: material.ca.as_deref().map(<[u8]>::to_vec),
    })
}

fn host_port(addr: &str) -> Result<(String, u16), RedisError> {
    let addr = addr
        .trim()
        .trim_start_matches("redis://")
        .trim_start_matches("rediss://")
        .trim_end_matches('/');
    let bad = || RedisError::Address {
        addr: addr.to_string(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

impl RedisClient {
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, RedisError> {
        if cfg.cluster_addrs.is_empty() {
            Self::connect_standalone(cfg).await
        } else {
            Self::connect_cluster(cfg).await
        }
    }

    async fn connect_standalone(cfg: &RedisConfig) -> Result<Self, RedisError> {
        let addr = cfg.addr.clone();
        let err = |cause| RedisError::Redis {
            addr: addr.clone(),
            cause,
        };
        let addr_info = connection_addr(&cfg.addr, cfg.tls.enabled)?;
        let tls = matches!(addr_info, ConnectionAddr::TcpTls { .. });
        let info = addr_info.into_connection_info().map_err(err)?;
        let mut settings = info.redis_settings().clone().set_db(cfg.db);
        if let Some(user) = &cfg.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &cfg.password {
            settings = settings.set_password(password.expose());
        }
        let info = info.set_redis_settings(settings);
        let client = if tls {
            redis::Client::build_with_tls(info, certificates(cfg)?).map_err(err)?
        } else {
            redis::Client::open(info).map_err(err)?
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(err)?;
        Ok(Self {
            connection: Connection::Standalone(manager),
            addr,
        })
    }

    async fn connect_cluster(cfg: &RedisConfig) -> Result<Self, RedisError> {
        let addr = cfg.cluster_addrs.join(",");
        let err = |cause| RedisError::Redis {
            addr: addr.clone(),
            cause,
        };
        let mut nodes = Vec::new();
        let mut tls = false;
        for a in &cfg.cluster_addrs {
            let addr = connection_addr(a, cfg.tls.enabled)?;
            tls |= matches!(addr, ConnectionAddr::TcpTls { .. });
            nodes.push(addr.into_connection_info().map_err(err)?);
        }
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT);
        if tls {
            builder = builder
                .tls(redis::TlsMode::Secure)
                .certs(certificates(cfg)?);
        }
        if let Some(user) = &cfg.username {
            builder = builder.username(user);
        }
        if let Some(password) = &cfg.password {
            builder = builder.password(password.expose());
        }
        let client = builder.build().map_err(err)?;
        let conn = client.get_async_connection().await.map_err(err)?;
        Ok(Self {
            connection: Connection::Cluster(Arc::new(Cluster {
                client,
                current: std::sync::RwLock::new(conn),
                rebuilt: tokio::sync::Mutex::new(None),
                slots: std::sync::RwLock::new(None),
            })),
            addr,
        })
    }

    fn err(&self, cause: redis::RedisError) -> RedisError {
        RedisError::Redis {
            addr: self.addr.clone(),
            cause,
        }
    }

    /// Runs one command. Multi-key commands (MGET) on a cluster are split by
    /// slot and merged by the cluster client.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        let result = match &self.connection {
            Connection::Standalone(c) => cmd.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => {
                if let Some(keys) = mget_keys(cmd)
                    && let Some(values) = c.mget(&keys).await
                {
                    return self.parse(values);
                }
                let result = cmd.query_async(&mut c.connection()).await;
                if let Err(e) = &result {
                    c.forget_slots();
                    c.recover(e).await;
                }
                result
            }
        };
        result.map_err(|e| self.err(e))
    }

    /// Runs groups of commands, each group about one key, and returns each
    /// group's first answer (the rest are ignored). See
    /// [`RedisClient::per_key_all`].
    pub async fn per_key(&self, groups: Vec<Vec<Cmd>>) -> Result<Vec<redis::Value>, RedisError> {
        Ok(self
            .per_key_all(groups)
            .await?
            .into_iter()
            .map(|answers| answers.into_iter().next().unwrap_or(redis::Value::Nil))
            .collect())
    }

    /// Runs groups of commands, each group about one key, and returns every
    /// answer, group by group. On a standalone server all groups go in one
    /// pipelined round trip; on a cluster each group is its own pipeline
    /// (its key decides the node), many in flight at once.
    pub async fn per_key_all(
        &self,
        groups: Vec<Vec<Cmd>>,
    ) -> Result<Vec<Vec<redis::Value>>, RedisError> {
        fn pipeline_of(groups: impl IntoIterator<Item = Vec<Cmd>>) -> Pipeline {
            let mut pipe = redis::pipe();
            for cmd in groups.into_iter().flatten() {
                pipe.add_command(cmd);
            }
            pipe
        }
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        match &self.connection {
            Connection::Standalone(_) => {
                let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
                let flat: Vec<redis::Value> = self.pipeline(&pipeline_of(groups)).await?;
                let mut flat = flat.into_iter();
                Ok(sizes
                    .into_iter()
                    .map(|n| flat.by_ref().take(n).collect())
                    .collect())
            }
            Connection::Cluster(_) => {
                use futures::StreamExt;
                futures::stream::iter(groups)
                    .map(|group| async move { self.pipeline(&pipeline_of([group])).await })
                    .buffered(CLUSTER_GROUPS_IN_FLIGHT)
                    .collect::<Vec<Result<_, RedisError>>>()
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    /// Runs the `first` commands (about keys of one slot) and the `rest`
    /// (any keys; multi-key commands allowed) and returns the answers of
    /// each: on a standalone server in one pipelined round trip, on a
    /// cluster `first` as one pipeline and each of `rest` on its own, all
    /// at once.
    pub async fn together(
        &self,
        first: Vec<Cmd>,
        rest: Vec<Cmd>,
    ) -> Result<(Vec<redis::Value>, Vec<redis::Value>), RedisError> {
        let split = first.len();
        match &self.connection {
            Connection::Standalone(_) => {
                let mut pipe = redis::pipe();
                for cmd in first.into_iter().chain(rest) {
                    pipe.add_command(cmd);
                }
                let mut answers: Vec<redis::Value> = self.pipeline(&pipe).await?;
                let rest = answers.split_off(split.min(answers.len()));
                Ok((answers, rest))
            }
            Connection::Cluster(_) => {
                let mut pipe = redis::pipe();
                for cmd in first {
                    pipe.add_command(cmd);
                }
                let rest = futures::future::try_join_all(
                    rest.iter().map(|cmd| self.query::<redis::Value>(cmd)),
                );
                let (first, rest) = futures::try_join!(self.pipeline(&pipe), rest)?;
                Ok((first, rest))
            }
        }
    }

    /// An answer of [`RedisClient::together`] as `T`.
    pub fn parse<T: FromRedisValue>(&self, value: redis::Value) -> Result<T, RedisError> {
        redis::from_redis_value(value).map_err(|e| self.err(e.into()))
    }

    /// Runs a pipeline; on a cluster every key of it must share one slot.
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, RedisError> {
        let result = match &self.connection {
            Connection::Standalone(c) => pipe.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => {
                let result = pipe.query_async(&mut c.connection()).await;
                if let Err(e) = &result {
                    c.recover(e).await;
                }
                result
            }
        };
        result.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags_like_the_server() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(
            slot_of(b"foo{}{bar}"),
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % 16384
        );
        assert_eq!(
            slot_of(b"{}bar"),
            crc16::State::<crc16::XMODEM>::calculate(b"{}bar") % 16384
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            host_port("127.0.0.1:6379").unwrap(),
            ("127.0.0.1".into(), 6379)
        );
        assert_eq!(host_port("redis://h:1/").unwrap(), ("h".into(), 1));
        assert_eq!(host_port("[::1]:7000").unwrap(), ("::1".into(), 7000));
        assert!(host_port("nohost").is_err());
        assert!(host_port(":1").is_err());
        assert!(host_port("h:port").is_err());
    }
}
