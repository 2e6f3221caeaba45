//! `gateway`: the push streams to gateways (timeouts, in-flight window,
//! protocol, TLS).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, TlsConfig, check_tls, positive};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayPoolConfig {
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// A push not answered within this is failed and its stream reopened.
    #[serde(with = "super::duration")]
    pub request_timeout: Duration,
    /// A stream with nothing to send for this long is closed.
    #[serde(with = "super::duration")]
    pub idle_timeout: Duration,
    /// Pushes awaiting a response on one gateway stream.
    pub max_in_flight: usize,
    /// Upper bound of the reconnect backoff.
    #[serde(with = "super::duration")]
    pub max_backoff: Duration,
    /// Which push service to call on gateways that advertise batch-v1.
    pub push_protocol: PushProtocolChoice,
    /// TLS to gateways: used for `grpcs://` endpoints, or for all when
    /// `enabled`; a client certificate makes it mutual.
    pub tls: TlsConfig,
}

/// `auto`: batch-v1 where a gateway advertises it, per-user `PushService`
/// elsewhere. `per-user`: `PushService` everywhere.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PushProtocolChoice {
    #[default]
    Auto,
    PerUser,
}

impl Default for GatewayPoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_in_flight: 8192,
            max_backoff: Duration::from_secs(10),
            push_protocol: PushProtocolChoice::Auto,
            tls: TlsConfig::default(),
        }
    }
}

impl GatewayPoolConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(positive("gateway.connect_timeout", self.connect_timeout));
        p.check(positive("gateway.request_timeout", self.request_timeout));
        p.check(positive("gateway.idle_timeout", self.idle_timeout));
        p.check(positive("gateway.max_backoff", self.max_backoff));
        if self.max_in_flight == 0 {
            p.invalid("gateway.max_in_flight", "must be at least 1");
        }
        check_tls(p, "gateway.tls", &self.tls, true);
    }
}
