//! Telling a refusal from an outage. A server that turned away who we are
//! (a rejected credential, an untrusted certificate) will keep doing so until
//! the configuration changes, so start-up stops and names the dependency; a
//! server that is only down is waited for (`retry::until_ready`).
//!
//! Each client library reports refusals in its own types, and this module
//! reads them by kind: rustls errors and alerts (also inside `io::Error`),
//! gRPC status codes, redis error kinds and codes, SQL error codes, NATS
//! connect error kinds. Text is matched only where a server sends nothing
//! but text (see [`REFUSAL_TEXTS`]).

use std::error::Error;

/// An error that can say whether the server refused this service.
pub trait Refusal {
    fn refused(&self) -> bool;
}

/// Refusals that arrive as text only, searched as the last resort:
/// etcd reports a wrong password as `InvalidArgument` with
/// "etcdserver: authentication failed"; the NATS server reports a rejected
/// user as an "authorization violation" protocol line, which some client
/// paths pass on as text.
pub const REFUSAL_TEXTS: [&str; 2] = ["authentication failed", "authorization violation"];

/// Whether any error in `e`'s chain is a refusal: a TLS peer not trusted
/// or a credential rejected.
pub fn refused(e: &(dyn Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if refused_by_kind(err) {
            return true;
        }
        next = err.source();
    }
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if REFUSAL_TEXTS.iter().any(|t| text.contains(t)) {
            return true;
        }
        next = err.source();
    }
    false
}

fn refused_by_kind(err: &(dyn Error + 'static)) -> bool {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return tls_refused(tls);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        // io::Error's source() skips the error it wraps; look inside.
        return io.get_ref().is_some_and(|inner| refused(inner));
    }
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        return status_refused(status);
    }
    if let Some(redis) = err.downcast_ref::<redis::RedisError>() {
        return redis_refused(redis);
    }
    if let Some(sql) = err.downcast_ref::<sqlx::Error>() {
        return sql_refused(sql);
    }
    if let Some(nats) = err.downcast_ref::<async_nats::ConnectError>() {
        return nats_refused(nats);
    }
    false
}

/// An untrusted peer certificate, or an alert from a peer that did not
/// accept ours.
fn tls_refused(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
        ),
        _ => false,
    }
}

pub(crate) fn status_refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

fn redis_refused(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code()
            .is_some_and(|c| ["WRONGPASS", "NOAUTH", "NOPERM"].contains(&c))
}

/// Access denied: PostgreSQL 28000/28P01, MySQL 1045; or a TLS failure.
fn sql_refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Tls(_))
        || e.as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| ["28000", "28P01", "1045"].contains(&c.as_ref()))
}

fn nats_refused(e: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as K;
    matches!(
        e.kind(),
        K::AuthorizationViolation | K::Authentication | K::Tls
    )
}

impl Refusal for async_nats::ConnectError {
    fn refused(&self) -> bool {
        refused(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to the thing")]
    struct Outer(#[source] Box<dyn Error + Send + Sync>);

    fn wrapped(e: impl Error + Send + Sync + 'static) -> Outer {
        Outer(Box::new(e))
    }

    #[test]
    fn tls_alerts_and_untrusted_certificates_are_refusals() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        assert!(refused(&wrapped(std::io::Error::other(alert))));
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(refused(&wrapped(untrusted)));
        let other = rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure);
        assert!(!refused(&wrapped(std::io::Error::other(other))));
    }

    #[test]
    fn an_outage_is_not_a_refusal() {
        let down = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!refused(&wrapped(down)));
        assert!(!refused(&wrapped(tonic::Status::unavailable("down"))));
        let io_redis =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!refused(&wrapped(io_redis)));
    }

    #[test]
    fn rejected_credentials_are_refusals_by_kind() {
        assert!(refused(&wrapped(tonic::Status::unauthenticated("who?"))));
        assert!(refused(&wrapped(tonic::Status::permission_denied("no"))));
        let redis =
            redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "invalid password"));
        assert!(refused(&wrapped(redis)));
        let nats = async_nats::ConnectError::new(async_nats::ConnectErrorKind::Authentication);
        assert!(refused(&wrapped(nats)));
        let nats_io = async_nats::ConnectError::new(async_nats::ConnectErrorKind::Io);
        assert!(!refused(&wrapped(nats_io)));
        assert!(refused(&sqlx::Error::Tls("handshake".into())));
    }

    #[test]
    fn text_is_the_last_resort() {
        let etcd = std::io::Error::other("etcdserver: authentication failed");
        assert!(refused(&wrapped(etcd)));
        let unrelated = std::io::Error::other("etcdserver: request timed out");
        assert!(!refused(&wrapped(unrelated)));
    }
}
