//! resonance-task: the write fan-out of Resonance IM.
//!
//! A `PushEvent` arrives on NATS (`consumer`), its session's members are read
//! from SQL and their routes from Redis (`store`), the routes are grouped per
//! gateway (`dispatch`), each gateway's address comes from a watched etcd
//! registry (`registry`), and the pushes go over pooled long-lived gRPC
//! streams (`gateway`). [`run`] wires these together; the command line lives
//! in its own crate.
//!
//! # Layout
//!
//! The data path, in the order an event takes it:
//!
//! - `consumer`: JetStream (or core NATS) intake, priority lanes, the ack
//!   policy, dead letters and their replay (`consumer::dlq`).
//! - `dispatch`: one event's fan-out: members, routes, the plan per gateway,
//!   session order, offline parking and notices.
//! - `store`: SQL members, Redis routes, delivery progress, offline messages.
//! - `registry`: the etcd watch that says where each gateway is.
//! - `gateway`: the pool of long-lived push streams and their correlation.
//!
//! Around it: `config` (the typed tree, each section validating itself),
//! `telemetry` (logs, traces, metrics, the admin port), `lifecycle` (stop,
//! abort, the task tracker, readiness), `retry` (backoff, pauses, waiting for
//! a dependency), `refusal` (a refused credential told from an outage),
//! `nats` (connecting with the configured identity), `tls` (certificate
//! files), `clock` and `proto` (the wire types). This file only wires.

#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod consumer;
pub mod dispatch;
pub mod gateway;
pub mod lifecycle;
pub mod nats;
pub mod proto;
pub mod refusal;
pub mod registry;
pub mod retry;
pub mod store;
pub mod streams;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use crate::config::{Config, ConsumerMode};
use crate::consumer::{EventHandler, EventTotals, LaneRules, RetryPolicy};
use crate::dispatch::Dispatcher;
use crate::dispatch::offline::OfflineDelivery;
use crate::gateway::GatewayPool;
use crate::lifecycle::{Lifecycle, Readiness};
use crate::registry::GatewayRegistry;
use crate::retry::{Refused, until_ready};
use crate::store::{MemberStore, OfflineStore, ProgressStore, RedisClient, RouteStore};

/// A cause kept as the source of an error that wraps it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Admin(#[from] telemetry::admin::AdminError),
    #[error(transparent)]
    Database(#[from] store::DatabaseError),
    #[error("NATS core subscription: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// Runs the task service until `shutdown` resolves: stop intake, let
/// in-flight events finish (up to a grace period), close gateway streams.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let life = telemetry::admin::start(&config.admin).await?;
    let serve = serve(&config, &life);
    tokio::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r,
        _ = shutdown => {
            life.stop.cancel();
            serve.await
        }
    };
    let nats = match &result {
        Ok(Some(nats)) => Some(nats),
        _ => None,
    };
    life.drain(config.consumer.shutdown_grace, nats).await;
    tracing::info!("stopped");
    result.map(|_| ())
}

/// Connects the dependencies, then consumes until `life.stop` fires.
/// Returns the NATS client (to flush acks) unless shutdown came first.
async fn serve(config: &Config, life: &Lifecycle) -> Result<Option<async_nats::Client>, RunError> {
    let Some(deps) = Dependencies::connect(config, life).await? else {
        return Ok(None);
    };
    let nats = deps.nats.clone();
    deps.start_intake(config, life).await?;
    Ok(Some(nats))
}

/// Everything a pod talks to, connected and ready.
struct Dependencies {
    members: MemberStore,
    redis: RedisClient,
    registry: GatewayRegistry,
    nats: async_nats::Client,
    /// Where offline notices go, when `offline.notice` is on.
    notices: Option<async_nats::jetstream::Context>,
}

impl Dependencies {
    /// Waits for the database, Redis, etcd and NATS in turn (`None` if
    /// shutdown comes first); a dependency that refuses this service ends
    /// start-up with its name.
    async fn connect(config: &Config, life: &Lifecycle) -> Result<Option<Self>, RunError> {
        let stop = &life.stop;
        let Some((pool, dialect)) = until_ready("database", stop, || {
            store::connect_database(&config.database)
        })
        .await?
        else {
            return Ok(None);
        };
        if config.database.migrates_on_start() {
            store::migrate(&pool, dialect, &config.database).await?;
        }
        life.spawn(store::watch_reachability(
            pool.clone(),
            life.readiness.clone(),
            stop.clone(),
        ));
        let members = MemberStore::new(pool, dialect)
            .with_cache(
                config.dispatch.member_cache_ttl,
                config.dispatch.member_cache_capacity,
            )
            .with_max_members(config.limits.max_members);
        let Some(redis) =
            until_ready("redis", stop, || RedisClient::connect(&config.redis)).await?
        else {
            return Ok(None);
        };
        // Connecting once first makes refused credentials a start-up error;
        // the registry's own watcher then reconnects on its own.
        if until_ready("etcd", stop, || registry::connect_checked(&config.etcd))
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let registry = GatewayRegistry::spawn(
            &config.etcd,
            &config.registry,
            &config.gateway_service_name,
            life,
        );
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = registry.wait_synced() => {}
        }
        Readiness::set(&life.readiness.registry_synced, true);
        let Some(nats) = until_ready("nats", stop, || {
            nats::connect_with(
                &config.nats,
                &config.service.name,
                Some(life.readiness.clone()),
            )
        })
        .await?
        else {
            return Ok(None);
        };
        let notices = if config.offline.notice {
            let js = async_nats::jetstream::new(nats.clone());
            let replication = streams::Replication::of(&config.consumer);
            let ensured = until_ready("offline notice stream", stop, || {
                dispatch::offline::ensure_notice_stream(&js, &config.offline, &replication)
            })
            .await?;
            if ensured.is_none() {
                return Ok(None);
            }
            Some(js)
        } else {
            None
        };
        Ok(Some(Self {
            members,
            redis,
            registry,
            nats,
            notices,
        }))
    }

    /// Builds the dispatcher and the event handler on the connected
    /// dependencies, then consumes until `life.stop` fires.
    async fn start_intake(self, config: &Config, life: &Lifecycle) -> Result<(), RunError> {
        let Self {
            members,
            redis,
            registry,
            nats,
            notices,
        } = self;
        let progress = config.dedup.enabled.then(|| {
            // A crashed handler's claim lapses by the time NATS redelivers.
            let lease = config.consumer.ack_wait;
            ProgressStore::new(
                redis.clone(),
                config.dedup.progress_ttl,
                config.dedup.window,
                lease,
            )
        });
        let offline_store = OfflineStore::new(
            redis.clone(),
            config.offline.max_messages,
            config.offline.ttl,
        );
        let attempts = consumer::FailedAttempts::new(redis.clone(), config.dedup.progress_ttl);
        let routes = RouteStore::new(
            redis,
            config.dispatch.route_chunk_size,
            config.dispatch.route_concurrency,
        );
        store::follow_membership_changes(&nats, &config.dispatch, members.clone(), life).await;
        let gateways = GatewayPool::new(config.gateway.clone(), life);
        let dispatcher = Dispatcher::new(
            members,
            routes,
            registry,
            gateways,
            progress,
            config.dispatch.clone(),
        )
        .with_offline(OfflineDelivery::new(
            offline_store,
            notices,
            config.offline.clone(),
        ))
        .with_limits(config.limits.clone());
        let totals = EventTotals::default();
        life.spawn(totals.clone().report_until(life.stop.clone()));
        let retry = RetryPolicy {
            max_retry: config.consumer.max_retry,
            retry_interval: config.consumer.retry_interval,
        };
        let handler = Arc::new(
            EventHandler::new(dispatcher, retry, totals)
                .with_lanes(LaneRules::new(&config.priority)),
        );
        match config.consumer.mode {
            ConsumerMode::Jetstream => {
                let prefetch = consumer::jetstream::Prefetch {
                    count: config.priority.prefetch,
                    bytes: config.priority.prefetch_bytes,
                    reserved_workers: config.priority.reserved_for_high(&config.consumer),
                };
                consumer::jetstream::Intake::new(nats, config.consumer.clone(), handler, attempts)
                    .run(life, prefetch)
                    .await;
            }
            ConsumerMode::Core => {
                consumer::queue_group::run(nats, config.consumer.clone(), handler, life).await?;
            }
        }
        Ok(())
    }
}
