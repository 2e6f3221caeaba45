//! Generated protobuf types and gRPC stubs (built from `proto/` by build.rs).
//! Field numbers follow the upstream wire contract; see `proto/`.

#![allow(clippy::all, missing_docs)]

pub mod mq {
    pub mod v1 {
        tonic::include_proto!("resonance.mq.v1");
    }
}

pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("resonance.gateway.v1");
    }
}

pub use gateway::v1::{
    PushBatchRequest, PushBatchResponse, PushMessage, PushMessageRequest, PushMessageResponse,
    RecipientFailure,
};
pub use mq::v1::{OfflineNotice, PushEvent};

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Bytes written by hand from the contract's field numbers, so a
    /// renumbered field in `proto/` fails here.
    #[test]
    fn push_event_field_numbers_match_the_contract() {
        let mut buf = Vec::new();
        let tag = |field: u32, wire: u8| ((field << 3) | wire as u32) as u8;
        buf.extend([tag(1, 0), 7]); // msg_id
        buf.extend([tag(2, 0), 9]); // seq_id
        buf.extend([tag(3, 2), 2, b's', b'1']); // session_id
        buf.extend([tag(4, 2), 1, b'a']); // from_username
        buf.extend([tag(5, 2), 1, b'b']); // to_username
        buf.extend([tag(6, 2), 2, b'h', b'i']); // content
        buf.extend([tag(7, 2), 4, b't', b'e', b'x', b't']); // type
        buf.extend([tag(8, 0), 42]); // timestamp
        buf.extend([tag(9, 2), 1, b'n']); // session_name
        buf.extend([tag(10, 0), 2]); // session_type
        // trace_headers entry {"k": "v"}: key = 1, value = 2 inside.
        buf.extend([tag(11, 2), 6, tag(1, 2), 1, b'k', tag(2, 2), 1, b'v']);
        let e = PushEvent::decode(buf.as_slice()).unwrap();
        assert_eq!((e.msg_id, e.seq_id), (7, 9));
        assert_eq!(e.session_id, "s1");
        assert_eq!(
            (e.from_username.as_str(), e.to_username.as_str()),
            ("a", "b")
        );
        assert_eq!((e.content.as_str(), e.r#type.as_str()), ("hi", "text"));
        assert_eq!((e.timestamp, e.session_name.as_str()), (42, "n"));
        assert_eq!(e.session_type, 2);
        assert_eq!(e.trace_headers.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn gateway_messages_field_numbers_match_the_contract() {
        let req = PushMessageRequest {
            trace_headers: Default::default(),
            to_username: "u".into(),
            message: Some(PushMessage {
                msg_id: 1,
                seq_id: 2,
                session_id: "s".into(),
                from_username: "f".into(),
                to_username: "t".into(),
                content: "c".into(),
                r#type: "y".into(),
                timestamp: 3,
            }),
        };
        let bytes = req.encode_to_vec();
        // to_username = 1 (string), message = 2 (embedded).
        assert_eq!(&bytes[..3], &[0x0a, 1, b'u']);
        assert_eq!(bytes[3], 0x12);
        let inner = &bytes[5..];
        let expected_inner: &[u8] = &[
            0x08, 1, 0x10, 2, 0x1a, 1, b's', 0x22, 1, b'f', 0x2a, 1, b't', 0x32, 1, b'c', 0x3a, 1,
            b'y', 0x40, 3,
        ];
        assert_eq!(inner, expected_inner);
        let resp = PushMessageResponse {
            msg_id: 1,
            seq_id: 2,
            error: "e".into(),
        };
        assert_eq!(resp.encode_to_vec(), vec![0x08, 1, 0x10, 2, 0x1a, 1, b'e']);
    }
}
