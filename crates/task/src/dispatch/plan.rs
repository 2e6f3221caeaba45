//! Planning one event's fan-out, with no I/O: given the members and their
//! routes, decide which recipients go to which gateway and which are
//! offline. Every member ends up in exactly one place.

use std::collections::HashSet;

use crate::registry::{GatewayEndpoint, GatewayMap};
use std::sync::Arc;

/// Why a recipient is offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OfflineReason {
    /// No route in Redis: not connected anywhere.
    NoRoute,
    /// The route names a gateway the registry does not know (gone).
    GatewayUnregistered,
    /// The gateway answered that the user is not connected there.
    NotConnected,
}

impl OfflineReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::GatewayUnregistered => "gateway_unregistered",
            Self::NotConnected => "not_connected",
        }
    }
}

/// Recipients of one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayBatch {
    pub endpoint: GatewayEndpoint,
    pub recipients: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub batches: Vec<GatewayBatch>,
    pub offline: Vec<(String, OfflineReason)>,
}

/// Recipients, as indexes into `members` (each name once; the member
/// store deduplicates): without the sender unless `push_to_sender`, and
/// without those in `reached` (an earlier attempt delivered to them), whose
/// number comes back too. No name is copied.
pub fn recipients(
    members: &[String],
    sender: &str,
    push_to_sender: bool,
    reached: &HashSet<String>,
) -> (Vec<u32>, usize) {
    let mut already = 0;
    let mut picked = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        if !push_to_sender && m == sender {
            continue;
        }
        if reached.contains(m) {
            already += 1;
            continue;
        }
        picked.push(i as u32);
    }
    (picked, already)
}

/// Splits `items` into owned chunks of at most `size`, in order, without
/// copying them; a list that fits is returned as it is.
pub fn split<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let size = size.max(1);
    if items.len() <= size {
        return vec![items];
    }
    let mut chunks = Vec::with_capacity(items.len().div_ceil(size));
    let mut rest = items.into_iter();
    loop {
        let chunk: Vec<T> = rest.by_ref().take(size).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    chunks
}

/// Groups `recipients` (with the gateway ids of their `routes`, same
/// order) by gateway. Batches come out sorted by gateway id, recipients in
/// input order.
pub fn plan(recipients: Vec<String>, routes: Vec<Option<Arc<str>>>, gateways: &GatewayMap) -> Plan {
    debug_assert_eq!(recipients.len(), routes.len());
    // A recipient costs one lookup here: foldhash (seeded per process)
    // rather than SipHash, as the keys are gateway ids, the registry's
    // few, not names a client picks.
    let mut by_gateway: foldhash::HashMap<Arc<str>, GatewayBatch> = Default::default();
    let mut offline = Vec::new();
    for (user, route) in recipients.into_iter().zip(routes) {
        let Some(gateway_id) = route else {
            offline.push((user, OfflineReason::NoRoute));
            continue;
        };
        match by_gateway.get_mut(&gateway_id) {
            Some(batch) => batch.recipients.push(user),
            None => match gateways.resolve(&gateway_id) {
                Some(endpoint) => {
                    by_gateway.insert(
                        gateway_id,
                        GatewayBatch {
                            endpoint: endpoint.clone(),
                            recipients: vec![user],
                        },
                    );
                }
                None => offline.push((user, OfflineReason::GatewayUnregistered)),
            },
        }
    }
    let mut batches: Vec<GatewayBatch> = by_gateway.into_values().collect();
    batches.sort_by(|a, b| a.endpoint.gateway_id.cmp(&b.endpoint.gateway_id));
    Plan { batches, offline }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::{GatewayMap, PushProtocol};
    use proptest::prelude::*;

    pub(crate) fn map_of(ids: &[&str]) -> GatewayMap {
        GatewayMap::of_endpoints(ids.iter().map(|id| GatewayEndpoint {
            gateway_id: id.to_string(),
            instance_id: format!("i-{id}"),
            uri: format!("http://{id}:1"),
            protocol: PushProtocol::PerUser,
        }))
    }

    fn route(_user: &str, gw: &str) -> Option<Arc<str>> {
        Some(gw.into())
    }

    #[test]
    fn sender_and_already_reached() {
        let m = vec!["a".to_string(), "b".into(), "c".into()];
        let none = HashSet::new();
        assert_eq!(recipients(&m, "b", true, &none), (vec![0, 1, 2], 0));
        assert_eq!(recipients(&m, "b", false, &none), (vec![0, 2], 0));
        let reached = HashSet::from(["c".to_string()]);
        assert_eq!(recipients(&m, "b", false, &reached), (vec![0], 1));
    }

    #[test]
    fn groups_per_gateway_and_marks_offline() {
        let gateways = map_of(&["g1", "g2"]);
        let users: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let routes = vec![
            route("a", "g2"),
            None,
            route("c", "g1"),
            route("d", "gone"),
            route("e", "g2"),
        ];
        let p = plan(users, routes, &gateways);
        assert_eq!(p.batches.len(), 2);
        assert_eq!(p.batches[0].endpoint.gateway_id, "g1");
        assert_eq!(p.batches[0].recipients, vec!["c"]);
        assert_eq!(p.batches[1].recipients, vec!["a", "e"]);
        assert_eq!(
            p.offline,
            vec![
                ("b".to_string(), OfflineReason::NoRoute),
                ("d".to_string(), OfflineReason::GatewayUnregistered)
            ]
        );
    }

    proptest! {
        /// Chunks keep every item once, in order, none larger than asked.
        #[test]
        fn split_keeps_order_and_bounds(n in 0usize..200, size in 1usize..50) {
            let items: Vec<usize> = (0..n).collect();
            let chunks = split(items.clone(), size);
            prop_assert!(chunks.iter().all(|c| c.len() <= size));
            prop_assert!(chunks.iter().filter(|c| c.is_empty()).count() <= usize::from(n == 0));
            prop_assert_eq!(chunks.concat(), items);
        }

        /// Each recipient lands in exactly one batch or in offline, every
        /// batch holds only users routed to its gateway, and no gateway has
        /// two batches.
        #[test]
        fn every_recipient_is_placed_exactly_once(
            assignments in proptest::collection::vec(proptest::option::of(0usize..6), 0..300)
        ) {
            let gateways = map_of(&["g0", "g1", "g2", "g3"]); // g4, g5 unregistered
            let users: Vec<String> = (0..assignments.len()).map(|i| format!("u{i}")).collect();
            let routes: Vec<Option<Arc<str>>> = users.iter().zip(&assignments)
                .map(|(u, a)| a.and_then(|g| route(u, &format!("g{g}"))))
                .collect();
            let p = plan(users.clone(), routes, &gateways);
            let mut placed: Vec<&String> = p.batches.iter().flat_map(|b| &b.recipients).collect();
            placed.extend(p.offline.iter().map(|(u, _)| u));
            placed.sort();
            let mut expected: Vec<&String> = users.iter().collect();
            expected.sort();
            prop_assert_eq!(placed, expected);
            let ids: HashSet<_> = p.batches.iter().map(|b| &b.endpoint.gateway_id).collect();
            prop_assert_eq!(ids.len(), p.batches.len());
            for b in &p.batches {
                for u in &b.recipients {
                    let i: usize = u[1..].parse().unwrap();
                    prop_assert_eq!(Some(&format!("g{}", assignments[i].unwrap())), Some(&b.endpoint.gateway_id));
                }
            }
            for (u, reason) in &p.offline {
                let i: usize = u[1..].parse().unwrap();
                match assignments[i] {
                    None => prop_assert_eq!(*reason, OfflineReason::NoRoute),
                    Some(g) => {
                        prop_assert!(g >= 4);
                        prop_assert_eq!(*reason, OfflineReason::GatewayUnregistered);
                    }
                }
            }
        }
    }
}
