//! Pushing to gateways: a [`GatewayPool`] of long-lived bidirectional gRPC
//! streams, one per gateway, each driven by its own task (`stream`).
//! Neighbours: `registry` says where a gateway is; `dispatch` hands the pool
//! one message and the recipients held by one gateway.
//!
//! Two wire protocols: the upstream per-user `PushService` (one request and
//! one response per recipient, matched by order) and batch-v1
//! (`BatchPushService`: one request per gateway chunk listing its
//! recipients, answered by batch id), used where a gateway advertises it.

mod correlation;
mod pool;
mod stream;

use std::fmt;
use std::sync::Arc;

pub use pool::{GatewayPool, PendingReply};

/// The answer to one push: the recipients it was given, back, and what
/// happened to each, in the same order.
#[derive(Debug)]
pub struct PushReply {
    pub recipients: Vec<String>,
    pub outcomes: Vec<PushOutcome>,
    /// The push's share of its stream's in-flight window
    /// (`gateway.max_in_flight`), held until the reply is dropped: a caller
    /// that records the outcomes first keeps every push the gateway may have
    /// received but nobody recorded inside that window, which bounds what a
    /// crash can make a redelivery repeat.
    pub window: Option<InFlightShare>,
}

/// A held part of a stream's in-flight window; released on drop.
#[derive(Debug)]
pub struct InFlightShare(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// What happened to one recipient of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The gateway handed the message to the user's connection(s).
    Delivered,
    /// The gateway answered that the user is not connected there: offline,
    /// not a gateway failure.
    NotConnected(String),
    /// No answer: the stream could not be opened, broke, or timed out.
    Failed(PushFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Timeout,
    StreamBroken,
    Closed,
    /// The route lookup for these recipients failed; nothing was pushed.
    Lookup,
    /// Parking the message or publishing the offline notice failed.
    Offline,
}

/// A transport failure shared by every recipient it hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushFailure {
    pub kind: FailureKind,
    pub gateway_id: Arc<str>,
    pub detail: Arc<str>,
}

impl PushFailure {
    pub fn new(kind: FailureKind, gateway_id: &str, detail: impl fmt::Display) -> Self {
        Self {
            kind,
            gateway_id: gateway_id.into(),
            detail: detail.to_string().into(),
        }
    }
}

impl fmt::Display for PushFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            FailureKind::Connect => "connecting to",
            FailureKind::Timeout => "no answer in time from",
            FailureKind::StreamBroken => "stream broke to",
            FailureKind::Closed => "stream closed to",
            FailureKind::Lookup => "routes not looked up for",
            FailureKind::Offline => {
                return write!(f, "offline delivery failed: {}", self.detail);
            }
        };
        write!(f, "{what} gateway {}: {}", self.gateway_id, self.detail)
    }
}
