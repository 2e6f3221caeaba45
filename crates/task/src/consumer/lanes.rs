//! Priority lanes: events taken from NATS wait here for a worker, high
//! before normal. An event is high priority when its NATS header
//! `Resonance-Priority` says `high`, or when it matches the configured rules
//! (`priority.high_types`, `priority.one_to_one_high`); an explicit
//! `normal` header wins over the rules.
//!
//! A session's messages must not be reordered, so a high-priority event
//! takes the normal events of its session queued before it into the high
//! lane ahead of itself. Session turns (`dispatch::order`) are taken when a
//! worker takes an event, so the order of taking is the order of pushing.

use std::collections::VecDeque;
use std::time::Instant;

use prost::Message;

use crate::config::PriorityConfig;
use crate::proto::PushEvent;

/// The NATS header a publisher sets to choose the lane.
pub const PRIORITY_HEADER: &str = "Resonance-Priority";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    High,
    Normal,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
        }
    }
}

/// Decides an event's lane from its header and the configured rules.
#[derive(Debug, Clone, Default)]
pub struct LaneRules {
    high_types: Vec<String>,
    one_to_one_high: bool,
}

impl LaneRules {
    pub fn new(cfg: &PriorityConfig) -> Self {
        Self {
            high_types: cfg.high_types.clone(),
            one_to_one_high: cfg.one_to_one_high,
        }
    }

    pub fn lane(&self, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Lane {
        if let Some(value) = headers.and_then(|h| h.get(PRIORITY_HEADER)) {
            let value = value.as_str().trim();
            if value.eq_ignore_ascii_case("high") {
                return Lane::High;
            }
            if value.eq_ignore_ascii_case("normal") {
                return Lane::Normal;
            }
        }
        if self.high_types.is_empty() && !self.one_to_one_high {
            return Lane::Normal;
        }
        // An undecodable payload is normal; its handler dead-letters it.
        match PushEvent::decode(payload) {
            Ok(e) if self.one_to_one_high && e.session_type == 1 => Lane::High,
            Ok(e) if self.high_types.contains(&e.r#type) => Lane::High,
            _ => Lane::Normal,
        }
    }
}

/// One waiting item.
pub struct Queued<T> {
    pub item: T,
    pub session: Option<String>,
    pub lane: Lane,
    /// When it was taken from NATS.
    pub since: Instant,
    /// When NATS last heard about it (taken, or an in-progress ack).
    pub touched: Instant,
}

/// The two lanes. Not shared: the intake loop owns it.
pub struct LaneQueue<T> {
    high: VecDeque<Queued<T>>,
    normal: VecDeque<Queued<T>>,
}

impl<T> Default for LaneQueue<T> {
    fn default() -> Self {
        Self {
            high: VecDeque::new(),
            normal: VecDeque::new(),
        }
    }
}

impl<T> LaneQueue<T> {
    pub fn len(&self) -> usize {
        self.high.len() + self.normal.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len_of(&self, lane: Lane) -> usize {
        match lane {
            Lane::High => self.high.len(),
            Lane::Normal => self.normal.len(),
        }
    }

    pub fn push(&mut self, item: T, session: Option<String>, lane: Lane) {
        if lane == Lane::High
            && let Some(s) = &session
            && self.normal.iter().any(|q| q.session.as_ref() == Some(s))
        {
            // Promote the session's earlier normal events, in order.
            let (same, rest): (VecDeque<_>, VecDeque<_>) = self
                .normal
                .drain(..)
                .partition(|q| q.session.as_ref() == Some(s));
            self.normal = rest;
            self.high.extend(same.into_iter().map(|mut q| {
                q.lane = Lane::High;
                q
            }));
        }
        let now = Instant::now();
        let queued = Queued {
            item,
            session,
            lane,
            since: now,
            touched: now,
        };
        match lane {
            Lane::High => self.high.push_back(queued),
            Lane::Normal => self.normal.push_back(queued),
        }
    }

    /// The lane of the item [`LaneQueue::pop`] takes next.
    pub fn next_lane(&self) -> Option<Lane> {
        if !self.high.is_empty() {
            Some(Lane::High)
        } else if !self.normal.is_empty() {
            Some(Lane::Normal)
        } else {
            None
        }
    }

    /// The next item: high lane first.
    pub fn pop(&mut self) -> Option<Queued<T>> {
        self.high.pop_front().or_else(|| self.normal.pop_front())
    }

    /// Every waiting item, for in-progress acks.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Queued<T>> {
        self.high.iter_mut().chain(self.normal.iter_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn popped(q: &mut LaneQueue<u32>) -> Vec<u32> {
        std::iter::from_fn(|| q.pop().map(|x| x.item)).collect()
    }

    #[test]
    fn high_goes_first_and_takes_its_session_along() {
        let mut q = LaneQueue::default();
        q.push(1, Some("a".into()), Lane::Normal);
        q.push(2, Some("b".into()), Lane::Normal);
        q.push(3, Some("a".into()), Lane::Normal);
        q.push(4, Some("c".into()), Lane::High);
        q.push(5, Some("a".into()), Lane::High);
        assert_eq!(popped(&mut q), vec![4, 1, 3, 5, 2]);
    }

    #[test]
    fn headers_win_over_rules() {
        let rules = LaneRules::new(&PriorityConfig {
            high_types: vec!["call".into()],
            one_to_one_high: true,
            ..Default::default()
        });
        let event = |session_type, kind: &str| {
            PushEvent {
                session_type,
                r#type: kind.into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let header = |v: &str| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(PRIORITY_HEADER, v);
            h
        };
        assert_eq!(rules.lane(None, &event(2, "text")), Lane::Normal);
        assert_eq!(rules.lane(None, &event(1, "text")), Lane::High);
        assert_eq!(rules.lane(None, &event(2, "call")), Lane::High);
        assert_eq!(
            rules.lane(Some(&header("HIGH")), &event(2, "text")),
            Lane::High
        );
        assert_eq!(
            rules.lane(Some(&header("normal")), &event(1, "call")),
            Lane::Normal
        );
        assert_eq!(rules.lane(None, b"\xff\xff"), Lane::Normal);
        let none = LaneRules::default();
        assert_eq!(none.lane(None, &event(1, "call")), Lane::Normal);
    }

    proptest! {
        /// Whatever the mix, every item comes out once, and within one
        /// session the order of arrival is kept.
        #[test]
        fn sessions_keep_their_order(items in proptest::collection::vec((0u8..4, any::<bool>()), 0..60)) {
            let mut q = LaneQueue::default();
            for (i, (session, high)) in items.iter().enumerate() {
                let lane = if *high { Lane::High } else { Lane::Normal };
                q.push((i as u32, *session), Some(session.to_string()), lane);
            }
            let out: Vec<(u32, u8)> = std::iter::from_fn(|| q.pop().map(|x| x.item)).collect();
            prop_assert_eq!(out.len(), items.len());
            for s in 0..4u8 {
                let order: Vec<u32> = out.iter().filter(|(_, x)| *x == s).map(|(i, _)| *i).collect();
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "session {} reordered: {:?}", s, order);
            }
        }
    }
}
