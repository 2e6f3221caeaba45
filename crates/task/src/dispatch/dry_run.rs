//! The I/O-free part of handling one payload, end to end, with its
//! invariants checked: the size limit, the session id intake reads for
//! ordering, decoding, the event's age, validation, and planning the
//! fan-out. The fuzz
//! target (`fuzz/`) and a property test feed it arbitrary bytes; any
//! panic is a finding.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;

use crate::config::LimitsConfig;
use crate::dispatch::{check_payload, plan, validate};
use crate::proto::PushEvent;
use crate::registry::{GatewayEndpoint, GatewayMap, PushProtocol};

/// Members a payload may name for planning (its content's words).
const MAX_MEMBERS: usize = 256;

/// What became of one payload.
#[derive(Debug, PartialEq, Eq)]
pub enum DryRunOutcome {
    /// Over `limits.max_payload_bytes`; never decoded.
    TooLarge,
    Undecodable,
    /// Decoded but refused by validation (dead-lettered).
    Refused,
    /// Planned: this many recipients went to gateways, this many offline.
    Planned {
        pushed: usize,
        offline: usize,
    },
}

/// Runs `payload` through intake and planning under `limits`, panicking
/// if an invariant breaks.
pub fn dry_run(payload: &[u8], limits: &LimitsConfig) -> DryRunOutcome {
    if check_payload(payload.len(), limits).is_err() {
        return DryRunOutcome::TooLarge;
    }
    let quick = super::order::session_id_of(payload);
    let Ok(event) = PushEvent::decode(payload) else {
        return DryRunOutcome::Undecodable;
    };
    // Intake orders by the session id it reads without decoding; it must be
    // the one dispatch then uses.
    assert_eq!(
        quick.unwrap_or(""),
        event.session_id,
        "the quick session id read disagrees with the decoded event"
    );
    // Intake records the event's age from its `timestamp` before
    // validating anything: any i64 must do.
    let age = crate::telemetry::metrics::seconds_since_ms(event.timestamp);
    assert!(age >= 0.0, "negative event age {age}");
    if validate(&event, limits).is_err() {
        return DryRunOutcome::Refused;
    }
    // Members from the content's words; routes and gateways from their
    // lengths, so some are online, some have no route, some point at a
    // gateway the registry does not know.
    let members: Vec<String> = {
        let mut seen = HashSet::new();
        event
            .content
            .split(' ')
            .filter(|w| !w.is_empty() && seen.insert(*w))
            .take(MAX_MEMBERS)
            .map(str::to_string)
            .collect()
    };
    let gateways = GatewayMap::of_endpoints((0..3).map(|i| GatewayEndpoint {
        gateway_id: format!("g{i}"),
        instance_id: format!("i{i}"),
        uri: format!("http://127.0.0.1:{}", 9000 + i),
        protocol: PushProtocol::BatchV1,
    }));
    let reached: HashSet<String> = members
        .iter()
        .filter(|m| m.len() % 5 == 4)
        .cloned()
        .collect();
    let (picked, already) = plan::recipients(&members, &event.from_username, false, &reached);
    let names: Vec<String> = picked
        .iter()
        .map(|&i| members[i as usize].clone())
        .collect();
    assert!(
        names.iter().all(|n| *n != event.from_username),
        "the sender is not a recipient when push_to_sender is off"
    );
    assert_eq!(
        names.len() + already + usize::from(members.contains(&event.from_username)),
        members.len(),
        "every member is picked, already reached, or the sender"
    );
    let routes: Vec<Option<Arc<str>>> = names
        .iter()
        .map(|n| (n.len() % 3 != 0).then(|| Arc::from(format!("g{}", n.len() % 4))))
        .collect();
    let planned = plan::plan(names.clone(), routes, &gateways);
    let mut placed: Vec<&str> = planned
        .batches
        .iter()
        .flat_map(|b| b.recipients.iter().map(String::as_str))
        .chain(planned.offline.iter().map(|(u, _)| u.as_str()))
        .collect();
    placed.sort_unstable();
    let mut expected: Vec<&str> = names.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(placed, expected, "every recipient is placed exactly once");
    for batch in &planned.batches {
        assert!(
            gateways.resolve(&batch.endpoint.gateway_id).is_some(),
            "a batch goes to a registered gateway"
        );
        for chunk in plan::split(batch.recipients.clone(), 7) {
            assert!(!chunk.is_empty() && chunk.len() <= 7);
        }
    }
    let pushed = planned.batches.iter().map(|b| b.recipients.len()).sum();
    DryRunOutcome::Planned {
        pushed,
        offline: planned.offline.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_payload_bytes: 4096,
            max_content_bytes: 2048,
            ..Default::default()
        }
    }

    fn valid(session: &str, from: &str, content: &str) -> Vec<u8> {
        valid_at(session, from, content, 0)
    }

    fn valid_at(session: &str, from: &str, content: &str, timestamp: i64) -> Vec<u8> {
        PushEvent {
            msg_id: 7,
            session_id: session.into(),
            from_username: from.into(),
            content: content.into(),
            timestamp,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_valid_event_is_planned() {
        let fate = dry_run(&valid("s", "al", "al bob carol dave eve"), &limits());
        // "al" is the sender and "dave" already reached; "carol" routes to
        // g1; "bob" and "eve" have no route.
        assert_eq!(
            fate,
            DryRunOutcome::Planned {
                pushed: 1,
                offline: 2
            }
        );
        assert_eq!(dry_run(&[0xff; 5000], &limits()), DryRunOutcome::TooLarge);
        assert_eq!(
            dry_run(&valid("s p", "a", ""), &limits()),
            DryRunOutcome::Refused
        );
        for timestamp in [i64::MIN, -1, i64::MAX] {
            assert!(matches!(
                dry_run(&valid_at("s", "al", "al bob", timestamp), &limits()),
                DryRunOutcome::Planned { .. }
            ));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            dry_run(&bytes, &limits());
        }

        /// Valid events with bytes flipped, cut or appended never panic,
        /// and repeated fields decode the way intake reads them.
        #[test]
        fn mangled_events(
            session in "[a-z ]{0,12}",
            from in "[a-z]{0,6}",
            content in "[a-z ]{0,300}",
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in any::<usize>(),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
            timestamp in any::<i64>(),
        ) {
            let mut bytes = valid_at(&session, &from, &content, timestamp);
            dry_run(&bytes, &limits());
            for (at, b) in flips {
                let n = bytes.len().max(1);
                if let Some(x) = bytes.get_mut(at % n) {
                    *x ^= b;
                }
            }
            dry_run(&bytes, &limits());
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend(tail);
            dry_run(&bytes, &limits());
        }
    }
}
