//! The etcd service-registry record (contract section 3): key layout, the
//! JSON value, and how a record names a gateway and its gRPC endpoint.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Metadata key that names the gateway a route points at.
pub const GATEWAY_ID_METADATA: &str = "gateway_id";
/// Metadata key a gateway uses to advertise the batched push protocol.
pub const PUSH_PROTOCOL_METADATA: &str = "push_protocol";
pub const BATCH_V1: &str = "batch-v1";

/// `{namespace}/{service}/`: the prefix every instance key of a service has.
pub fn service_prefix(namespace: &str, service: &str) -> String {
    format!("{}/{}/", namespace.trim_end_matches('/'), service)
}

/// `{namespace}/{service}/{instance_id}`.
pub fn instance_key(namespace: &str, service: &str, instance_id: &str) -> String {
    format!("{}{}", service_prefix(namespace, service), instance_id)
}

/// The JSON value stored under an instance key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceInstance {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub metadata: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushProtocol {
    /// Upstream `PushService`: one request per recipient.
    PerUser,
    /// `BatchPushService`: one request per gateway per event.
    BatchV1,
}

/// Where and how to push to one gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayEndpoint {
    pub gateway_id: String,
    pub instance_id: String,
    /// `http://host:port` or `https://host:port`, as tonic wants it.
    pub uri: String,
    pub protocol: PushProtocol,
}

impl ServiceInstance {
    fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// `metadata.gateway_id`, or the instance id when that is absent.
    pub fn gateway_id(&self) -> &str {
        self.metadata_str(GATEWAY_ID_METADATA).unwrap_or(&self.id)
    }

    pub fn push_protocol(&self) -> PushProtocol {
        match self.metadata_str(PUSH_PROTOCOL_METADATA) {
            Some(BATCH_V1) => PushProtocol::BatchV1,
            _ => PushProtocol::PerUser,
        }
    }

    /// The first endpoint tonic can dial.
    pub fn grpc_uri(&self) -> Option<String> {
        self.endpoints.iter().find_map(|e| grpc_uri(e))
    }

    pub fn endpoint(&self) -> Option<GatewayEndpoint> {
        Some(GatewayEndpoint {
            gateway_id: self.gateway_id().to_string(),
            instance_id: self.id.clone(),
            uri: self.grpc_uri()?,
            protocol: self.push_protocol(),
        })
    }
}

/// `grpc://h:p` and bare `h:p` dial in plaintext, `grpcs://h:p` with TLS;
/// `http(s)://` pass through. Other schemes are not gRPC endpoints.
pub fn grpc_uri(endpoint: &str) -> Option<String> {
    let endpoint = endpoint.trim();
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("grpc".to_string(), endpoint),
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return None;
    }
    match scheme.as_str() {
        "grpc" | "http" => Some(format!("http://{authority}")),
        "grpcs" | "https" => Some(format!("https://{authority}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_matches_the_contract() {
        assert_eq!(
            instance_key(
                "/resonance/services",
                "gateway-service",
                "gateway-service-001"
            ),
            "/resonance/services/gateway-service/gateway-service-001"
        );
        assert_eq!(
            service_prefix("/resonance/services/", "gateway-service"),
            "/resonance/services/gateway-service/"
        );
    }

    #[test]
    fn contract_example_parses() {
        let v = r#"{"id": "gateway-service-001", "name": "gateway-service", "version": "1.0.0",
            "metadata": {"gateway_id": "gateway-001", "region": "a"},
            "endpoints": ["grpc://10.0.0.5:9091"]}"#;
        let i: ServiceInstance = serde_json::from_str(v).unwrap();
        let e = i.endpoint().unwrap();
        assert_eq!(e.gateway_id, "gateway-001");
        assert_eq!(e.instance_id, "gateway-service-001");
        assert_eq!(e.uri, "http://10.0.0.5:9091");
        assert_eq!(e.protocol, PushProtocol::PerUser);
    }

    #[test]
    fn gateway_id_falls_back_to_instance_id() {
        let i: ServiceInstance = serde_json::from_str(
            r#"{"id": "gw-7", "metadata": {"gateway_id": ""}, "endpoints": ["127.0.0.1:1"]}"#,
        )
        .unwrap();
        assert_eq!(i.gateway_id(), "gw-7");
        let i: ServiceInstance = serde_json::from_str(r#"{"id": "gw-8"}"#).unwrap();
        assert_eq!(i.gateway_id(), "gw-8");
        assert!(i.endpoint().is_none(), "no endpoint, nothing to dial");
    }

    #[test]
    fn batch_protocol_is_advertised_in_metadata() {
        let i: ServiceInstance = serde_json::from_str(
            r#"{"id": "g", "metadata": {"push_protocol": "batch-v1"}, "endpoints": ["grpc://h:1"]}"#,
        )
        .unwrap();
        assert_eq!(i.push_protocol(), PushProtocol::BatchV1);
    }

    #[test]
    fn endpoint_schemes() {
        assert_eq!(grpc_uri("grpc://h:1").as_deref(), Some("http://h:1"));
        assert_eq!(grpc_uri("h:1").as_deref(), Some("http://h:1"));
        assert_eq!(grpc_uri("grpcs://h:1").as_deref(), Some("https://h:1"));
        assert_eq!(grpc_uri("https://h:1/").as_deref(), Some("https://h:1"));
        assert_eq!(grpc_uri("ws://h:1"), None);
        assert_eq!(grpc_uri("grpc://"), None);
        assert_eq!(grpc_uri("grpc://h:1/path"), None);
    }
}
