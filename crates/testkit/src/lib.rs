//! What tests and developer tools stand on: private `nats-server -js`,
//! `etcd` and `redis-server` processes on free loopback ports in their own
//! temp dirs (`servers`), the same clustered (`cluster`: 3 NATS nodes, a
//! Redis Cluster of 3 masters and 3 replicas, 3 etcd members), a TCP proxy that cuts, stalls or resets the
//! connections through it (`fault_proxy`), development certificates
//! (`certs`), and the integration harness (`harness`): per-test SQL
//! databases on SQLite, MariaDB and PostgreSQL, a whole stack of servers,
//! gateways and pods. Nothing here is part of a pod; the service crate does
//! not depend on it.
//!
//! Every fixture stops what it started when dropped.

#![forbid(unsafe_code)]

pub mod certs;
pub mod cluster;
pub mod engines;
pub mod fault_proxy;
pub mod harness;
pub mod servers;

/// An HTTP client (health probes, gateways' `/stats`) that can speak HTTPS.
pub fn http_client() -> reqwest::ClientBuilder {
    resonance_task::tls::install_provider();
    reqwest::Client::builder()
}
