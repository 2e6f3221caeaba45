//! NATS, etcd and Redis for a run of the tools or tests: single private
//! servers or clusters of them, and a pod's configuration pointed at them.

use resonance_task::config::{Config, SecretUrl};

use crate::cluster::{EtcdCluster, NatsCluster, RedisCluster};
use crate::servers::{self, LocalServer, StackError};

/// Points `config` at single servers.
pub fn wire_servers(
    config: &mut Config,
    nats: &LocalServer,
    etcd: &LocalServer,
    redis: &LocalServer,
) {
    config.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{}", nats.port));
    config.etcd.endpoints = vec![format!("http://127.0.0.1:{}", etcd.port)];
    config.redis.addr = format!("127.0.0.1:{}", redis.port);
}

/// Points `config` at clusters; every stream is replicated three times.
pub fn wire_clusters(
    config: &mut Config,
    nats: &NatsCluster,
    etcd: &EtcdCluster,
    redis: &RedisCluster,
) {
    config.nats.url = SecretUrl::new(nats.url());
    config.etcd.endpoints = etcd.endpoints();
    config.redis.cluster_addrs = redis.addrs();
    config.consumer.stream_replicas = 3;
}

/// One NATS with JetStream, one etcd, one Redis.
pub struct SingleServers {
    pub nats: LocalServer,
    pub etcd: LocalServer,
    pub redis: LocalServer,
}

/// 3 NATS nodes, a Redis Cluster of 3 masters and 3 replicas, 3 etcd
/// members.
pub struct Clusters {
    pub nats: NatsCluster,
    pub etcd: EtcdCluster,
    pub redis: RedisCluster,
}

/// The engines of a run.
pub enum Engines {
    Single(Box<SingleServers>),
    Cluster(Box<Clusters>),
}

impl Engines {
    /// Clusters when `cluster`, else single servers, whose Redis keeps its
    /// data across a restart when `persistent_redis` (cluster nodes always
    /// do).
    pub async fn start(cluster: bool, persistent_redis: bool) -> Result<Self, StackError> {
        Ok(if cluster {
            let (nats, etcd, redis) = tokio::try_join!(
                NatsCluster::start(3),
                EtcdCluster::start(3),
                RedisCluster::start(3)
            )?;
            Self::Cluster(Box::new(Clusters { nats, etcd, redis }))
        } else {
            let redis = async {
                if persistent_redis {
                    servers::redis_server_persistent().await
                } else {
                    servers::redis_server().await
                }
            };
            let (nats, etcd, redis) =
                tokio::try_join!(servers::nats_server(), servers::etcd_server(), redis)?;
            Self::Single(Box::new(SingleServers { nats, etcd, redis }))
        })
    }

    /// Points `config` at these engines.
    pub fn wire(&self, config: &mut Config) {
        match self {
            Self::Single(s) => wire_servers(config, &s.nats, &s.etcd, &s.redis),
            Self::Cluster(c) => wire_clusters(config, &c.nats, &c.etcd, &c.redis),
        }
    }
}
