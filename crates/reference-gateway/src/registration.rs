//! Writer side of the registry: keeps one instance record alive under an
//! etcd lease, as a gateway does. The task service only reads the registry
//! (`resonance_task::registry`), whose key layout this follows.
//!
//! The record is put under a fresh lease and kept alive at a third of the
//! TTL. If etcd becomes unreachable long enough for the lease to expire, the
//! loop grants a new lease and puts the record again. On shutdown the lease is
//! revoked so the key vanishes at once instead of after the TTL.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio_util::sync::CancellationToken;

use resonance_task::config::EtcdConfig;
use resonance_task::registry::{ServiceInstance, connect};
use resonance_task::retry::{Backoff, pause};

/// How long the first registration retries a failing etcd before giving up,
/// so a gateway started alongside etcd does not lose the race.
const FIRST_REGISTRATION_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("registering {key} in etcd: {cause}")]
    Etcd {
        key: String,
        #[source]
        cause: etcd_client::Error,
    },
    #[error("lease keep-alive for {key} ended")]
    KeepAliveEnded { key: String },
}

pub struct Registration {
    etcd: EtcdConfig,
    key: String,
    value: String,
    ttl: Duration,
}

impl Registration {
    pub fn new(etcd: EtcdConfig, key: String, instance: &ServiceInstance, ttl: Duration) -> Self {
        Self {
            etcd,
            key,
            value: serde_json::to_string(instance).expect("instance serializes"),
            ttl: ttl.max(Duration::from_secs(2)),
        }
    }

    /// Registers once and returns, so a caller knows the record is visible;
    /// then keeps it alive until `cancel` fires, and revokes it.
    pub async fn register(
        self,
        stop: CancellationToken,
    ) -> Result<impl Future<Output = ()>, RegistrationError> {
        let deadline = tokio::time::Instant::now() + FIRST_REGISTRATION_PATIENCE;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            match self.connect_and_put().await {
                Ok((client, lease)) => return Ok(self.keep_alive(client, lease, stop)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "registering failed; retrying");
                    if !pause(&stop, &mut backoff).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn connect_and_put(&self) -> Result<(Client, i64), RegistrationError> {
        let mut client = connect(&self.etcd).await.map_err(|e| self.err(e))?;
        let lease = self.put(&mut client).await?;
        Ok((client, lease))
    }

    fn err(&self, cause: etcd_client::Error) -> RegistrationError {
        RegistrationError::Etcd {
            key: self.key.clone(),
            cause,
        }
    }

    async fn put(&self, client: &mut Client) -> Result<i64, RegistrationError> {
        let lease = client
            .lease_grant(self.ttl.as_secs() as i64, None)
            .await
            .map_err(|e| self.err(e))?
            .id();
        client
            .put(
                self.key.as_str(),
                self.value.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.err(e))?;
        tracing::info!(key = %self.key, lease, "registered in etcd");
        Ok(lease)
    }

    async fn keep_alive(self, mut client: Client, mut lease: i64, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), self.ttl / 3);
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.refresh(&mut client, lease) => r,
            };
            if let Err(e) = result {
                tracing::warn!(key = %self.key, error = %e, "etcd lease keep-alive failed; re-registering");
                loop {
                    if !pause(&stop, &mut backoff).await {
                        return;
                    }
                    match self.connect_and_put().await {
                        Ok((c, l)) => {
                            client = c;
                            lease = l;
                            backoff.reset();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(key = %self.key, error = %e, "re-registering failed")
                        }
                    }
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await {
            Ok(Ok(_)) => tracing::info!(key = %self.key, "deregistered from etcd"),
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %e, "lease revoke failed; the key expires with its TTL")
            }
            Err(_) => {
                tracing::warn!(key = %self.key, "lease revoke timed out; the key expires with its TTL")
            }
        }
    }

    /// Keeps the lease alive until the keep-alive stream fails or the lease
    /// is found expired.
    async fn refresh(&self, client: &mut Client, lease: i64) -> Result<(), RegistrationError> {
        let (mut keeper, mut responses) = client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| self.err(e))?;
        let mut tick = tokio::time::interval(self.ttl / 3);
        loop {
            tick.tick().await;
            keeper.keep_alive().await.map_err(|e| self.err(e))?;
            let response = tokio::time::timeout(self.ttl / 3, responses.message())
                .await
                .map_err(|_| RegistrationError::KeepAliveEnded {
                    key: self.key.clone(),
                })?
                .map_err(|e| self.err(e))?;
            match response {
                Some(r) if r.ttl() > 0 => {}
                _ => {
                    return Err(RegistrationError::KeepAliveEnded {
                        key: self.key.clone(),
                    });
                }
            }
        }
    }
}
