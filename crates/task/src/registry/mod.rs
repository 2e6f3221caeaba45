//! Service registry: an etcd prefix watch kept as an in-memory map from
//! `gateway_id` to endpoint, so dispatch never makes an etcd round trip.
//!
//! One background task lists `{namespace}/{gateway_service_name}/`, then
//! watches from the listed revision. Every update publishes a new immutable
//! [`GatewayMap`] through a `tokio::sync::watch` channel. When etcd fails the
//! last map keeps serving while the task reconnects with backoff and lists
//! again; the list is also repeated every `registry.cache_expiration` as a
//! safety net. Neighbours: `gateway::GatewayPool` dials what this resolves;
//! gateways write their own keys (the reference gateway's `registration`).

mod instance;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use instance::{
    BATCH_V1, GATEWAY_ID_METADATA, GatewayEndpoint, PUSH_PROTOCOL_METADATA, PushProtocol,
    ServiceInstance, grpc_uri, instance_key, service_prefix,
};

use crate::config::{EtcdConfig, GatewayServiceName, RegistryConfig};
use crate::lifecycle::Lifecycle;
use crate::retry::{Backoff, pause_for};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {endpoints:?}: {cause}")]
    Etcd {
        endpoints: Vec<String>,
        #[source]
        cause: etcd_client::Error,
    },
    #[error("etcd watch on {prefix} ended")]
    WatchEnded { prefix: String },
    #[error("etcd watch on {prefix} cancelled (compacted at revision {compact_revision})")]
    WatchCancelled {
        prefix: String,
        compact_revision: i64,
    },
}

/// Connects to etcd with the configured endpoints, credentials and timeouts.
pub async fn connect(cfg: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(cfg.dial_timeout)
        .with_timeout(cfg.dial_timeout.max(Duration::from_secs(5)))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        options = options
            .with_user(user.clone(), password.expose().to_string())
            .with_auto_token_refresh(true);
    }
    let tls = cfg.tls.enabled || cfg.endpoints.iter().any(|e| e.starts_with("https://"));
    if !tls {
        return Client::connect(&cfg.endpoints, Some(options)).await;
    }
    // Read on every connect, so rotated files are used by the next one.
    let material = crate::tls::TlsMaterial::read("etcd.tls", &cfg.tls)
        .map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?;
    options = options.with_tls(material.client_config());
    // With TLS every endpoint is https, whatever it says.
    let endpoints: Vec<String> = cfg
        .endpoints
        .iter()
        .map(|e| {
            let host = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            format!("https://{host}")
        })
        .collect();
    Client::connect(&endpoints, Some(options)).await
}

/// [`connect`] plus one request, so refused credentials or certificates
/// show now rather than in the first watch.
pub async fn connect_checked(cfg: &EtcdConfig) -> Result<(), etcd_client::Error> {
    let mut client = connect(cfg).await?;
    client.status().await?;
    Ok(())
}

impl crate::refusal::Refusal for etcd_client::Error {
    fn refused(&self) -> bool {
        if let etcd_client::Error::GRpcStatus(status) = self
            && crate::refusal::status_refused(status)
        {
            return true;
        }
        crate::refusal::refused(self)
    }
}

/// One registered instance with the etcd revision that last wrote it.
#[derive(Debug, Clone)]
struct Entry {
    mod_revision: i64,
    instance: Option<ServiceInstance>,
}

/// An immutable snapshot of the registry.
#[derive(Debug, Clone, Default)]
pub struct GatewayMap {
    by_key: HashMap<String, Entry>,
    by_gateway: HashMap<String, GatewayEndpoint>,
    synced: bool,
}

impl GatewayMap {
    pub fn resolve(&self, gateway_id: &str) -> Option<&GatewayEndpoint> {
        self.by_gateway.get(gateway_id)
    }

    pub fn len(&self) -> usize {
        self.by_gateway.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_gateway.is_empty()
    }

    /// True once the prefix has been listed at least once.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn gateways(&self) -> impl Iterator<Item = &GatewayEndpoint> {
        self.by_gateway.values()
    }

    /// A synced map of exactly these gateways (no etcd behind it), for
    /// planning without I/O: property tests and the fuzz target.
    pub fn of_endpoints(endpoints: impl IntoIterator<Item = GatewayEndpoint>) -> Self {
        GatewayMap {
            by_gateway: endpoints
                .into_iter()
                .map(|e| (e.gateway_id.clone(), e))
                .collect(),
            synced: true,
            ..Default::default()
        }
    }

    fn from_list(kvs: &[KeyValue]) -> Self {
        let mut map = GatewayMap {
            synced: true,
            ..Default::default()
        };
        for kv in kvs {
            map.put(kv);
        }
        map.reindex();
        map
    }

    fn put(&mut self, kv: &KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        if self
            .by_key
            .get(key)
            .is_some_and(|e| e.mod_revision > kv.mod_revision())
        {
            return;
        }
        let instance = match serde_json::from_slice::<ServiceInstance>(kv.value()) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(key, error = %e, "registry record is not a service instance; ignored");
                None
            }
        };
        self.by_key.insert(
            key.to_string(),
            Entry {
                mod_revision: kv.mod_revision(),
                instance,
            },
        );
    }

    fn delete(&mut self, kv: &KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        if self
            .by_key
            .get(key)
            .is_some_and(|e| e.mod_revision <= kv.mod_revision())
        {
            self.by_key.remove(key);
        }
    }

    /// Rebuilds the gateway index. When two instances claim one gateway id,
    /// the most recently written one wins.
    fn reindex(&mut self) {
        let mut best: HashMap<String, (i64, GatewayEndpoint)> = HashMap::new();
        for entry in self.by_key.values() {
            let Some(endpoint) = entry.instance.as_ref().and_then(ServiceInstance::endpoint) else {
                continue;
            };
            match best.get(&endpoint.gateway_id) {
                Some((rev, _)) if *rev >= entry.mod_revision => {}
                _ => {
                    best.insert(endpoint.gateway_id.clone(), (entry.mod_revision, endpoint));
                }
            }
        }
        self.by_gateway = best.into_iter().map(|(k, (_, e))| (k, e)).collect();
    }
}

/// Read side of the registry; cheap to clone.
#[derive(Clone)]
pub struct GatewayRegistry {
    map: watch::Receiver<Arc<GatewayMap>>,
}

impl GatewayRegistry {
    /// Starts the watch of `service`'s instances under
    /// `registry.namespace`; it stops with `life`.
    pub fn spawn(
        etcd: &EtcdConfig,
        registry: &RegistryConfig,
        service: &GatewayServiceName,
        life: &Lifecycle,
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(GatewayMap::default()));
        let watcher = Watcher {
            etcd: etcd.clone(),
            prefix: service_prefix(&registry.namespace, &service.0),
            resync: registry.cache_expiration,
            tx,
        };
        life.spawn(watcher.run(life.stop.clone()));
        Self { map: rx }
    }

    /// The current map; hold it for one event rather than per lookup.
    pub fn snapshot(&self) -> Arc<GatewayMap> {
        self.map.borrow().clone()
    }

    /// Resolves once the prefix has been listed at least once.
    pub async fn wait_synced(&self) {
        let mut rx = self.map.clone();
        // The sender lives as long as the watch task; if it is gone the
        // service is shutting down and there is nothing left to wait for.
        let _ = rx.wait_for(|m| m.is_synced()).await;
    }

    /// Waits until the map satisfies `pred` (used by tests and tools).
    pub async fn wait_for(&self, pred: impl Fn(&GatewayMap) -> bool) {
        let mut rx = self.map.clone();
        let _ = rx.wait_for(|m| pred(m)).await;
    }
}

struct Watcher {
    etcd: EtcdConfig,
    prefix: String,
    resync: Duration,
    tx: watch::Sender<Arc<GatewayMap>>,
}

impl Watcher {
    fn publish(&self, map: &GatewayMap) {
        metrics::gauge!(crate::telemetry::metrics::REGISTRY_GATEWAYS).set(map.len() as f64);
        self.tx.send_replace(Arc::new(map.clone()));
    }

    async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.list_and_watch(&mut backoff) => r,
            };
            let delay = backoff.next_delay();
            match result {
                Ok(()) => tracing::debug!(prefix = %self.prefix, "registry re-listing"),
                Err(e) => {
                    metrics::counter!(crate::telemetry::metrics::RECONNECTS, "dependency" => "etcd").increment(1);
                    tracing::warn!(
                    prefix = %self.prefix,
                    error = %e,
                    gateways = self.tx.borrow().len(),
                    retry_in = ?delay,
                    "registry watch failed; serving the last known gateways"
                    )
                }
            }
            if !pause_for(&stop, delay).await {
                return;
            }
        }
    }

    /// Lists the prefix, then applies watch events until the watch fails or
    /// the resync period elapses (`Ok`).
    async fn list_and_watch(&self, backoff: &mut Backoff) -> Result<(), RegistryError> {
        let etcd_err = |cause| RegistryError::Etcd {
            endpoints: self.etcd.endpoints.clone(),
            cause,
        };
        let mut client = connect(&self.etcd).await.map_err(etcd_err)?;
        let listed = client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err)?;
        let revision = listed.header().map_or(0, |h| h.revision());
        let mut map = GatewayMap::from_list(listed.kvs());
        tracing::info!(prefix = %self.prefix, revision, gateways = map.len(), "registry listed");
        self.publish(&map);

        let mut stream = client
            .watch(
                self.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(etcd_err)?;
        backoff.reset();
        let resync = tokio::time::sleep(self.resync);
        tokio::pin!(resync);
        loop {
            let response = tokio::select! {
                _ = &mut resync => return Ok(()),
                r = stream.message() => r.map_err(etcd_err)?,
            };
            let Some(response) = response else {
                return Err(RegistryError::WatchEnded {
                    prefix: self.prefix.clone(),
                });
            };
            if response.canceled() {
                return Err(RegistryError::WatchCancelled {
                    prefix: self.prefix.clone(),
                    compact_revision: response.compact_revision(),
                });
            }
            if response.events().is_empty() {
                continue;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => map.put(kv),
                    EventType::Delete => map.delete(kv),
                }
            }
            map.reindex();
            tracing::info!(prefix = %self.prefix, gateways = map.len(), "registry updated");
            self.publish(&map);
        }
    }
}
