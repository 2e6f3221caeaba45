//! Membership changes: every pod drops a session from its member cache as
//! soon as the session's id arrives on `dispatch.session_changed_topic`, so
//! a changed session is read again on its next event rather than after
//! `dispatch.member_cache_ttl`.

use tokio_util::sync::CancellationToken;

use super::MemberStore;
use crate::config::DispatchConfig;
use crate::lifecycle::Lifecycle;

/// Follows `dispatch.session_changed_topic`, when the member cache is on.
/// Subscribed before events flow, so no change is missed.
pub async fn follow_changes(
    nats: &async_nats::Client,
    dispatch: &DispatchConfig,
    members: MemberStore,
    life: &Lifecycle,
) {
    let topic = &dispatch.session_changed_topic;
    if topic.is_empty() || dispatch.member_cache_ttl.is_zero() {
        return;
    }
    match nats.subscribe(topic.clone()).await {
        Ok(changes) => {
            if let Err(e) = crate::nats::round_trip(nats).await {
                tracing::debug!(error = %e, "could not confirm the membership subscription with the server");
            }
            life.spawn(drop_changed_sessions(changes, members, life.stop.clone()));
        }
        Err(e) => {
            tracing::warn!(%topic, error = %e, "cannot follow membership changes; the member cache expires by its TTL only")
        }
    }
}

/// Drops a session from the member cache whenever its id arrives on
/// `dispatch.session_changed_topic`.
async fn drop_changed_sessions(
    mut changes: async_nats::Subscriber,
    members: MemberStore,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            c = changes.next() => match c {
                Some(c) => c,
                None => return,
            },
        };
        let session_id = String::from_utf8_lossy(&change.payload);
        let session_id = session_id.trim();
        if session_id.is_empty() {
            tracing::warn!(subject = %change.subject, "membership change without a session id; ignored");
            continue;
        }
        members.invalidate(session_id).await;
        metrics::counter!(crate::telemetry::metrics::MEMBER_CACHE_INVALIDATIONS).increment(1);
        tracing::debug!(session_id, "session members changed; cache entry dropped");
    }
}
