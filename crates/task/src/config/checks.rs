//! The checks sections share, and [`Problems`], which collects every
//! failed check so that a bad configuration is reported whole, each problem
//! naming its key.

use std::time::Duration;

use super::{ConfigError, Secret, TlsConfig};

/// Every problem found in one configuration.
#[derive(Debug, Default)]
pub struct Problems(Vec<ConfigError>);

impl Problems {
    pub fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }

    pub fn invalid(
        &mut self,
        key: impl Into<std::borrow::Cow<'static, str>>,
        reason: impl Into<String>,
    ) {
        self.push(ConfigError::invalid(key, reason));
    }

    pub fn check(&mut self, result: Result<(), ConfigError>) {
        if let Err(e) = result {
            self.push(e);
        }
    }

    /// One problem as itself, several as [`ConfigError::Several`].
    pub fn into_result(mut self) -> Result<(), ConfigError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.remove(0)),
            _ => Err(ConfigError::Several(self.0)),
        }
    }
}

/// A section's TLS: its server name (where the client supports one) and
/// its files, each problem under its own key.
pub(super) fn check_tls(p: &mut Problems, section: &str, tls: &TlsConfig, names_server: bool) {
    for (key, reason) in tls.problems(section, names_server) {
        p.invalid(key, reason);
    }
}

pub(super) fn non_empty(key: &'static str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(())
}

pub(super) fn positive(key: &'static str, v: Duration) -> Result<(), ConfigError> {
    if v.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(())
}

pub(super) fn nats_subject(key: &'static str, v: &str) -> Result<(), ConfigError> {
    non_empty(key, v)?;
    if v.contains(char::is_whitespace) || v.split('.').any(str::is_empty) {
        return Err(ConfigError::invalid(
            key,
            format!("`{v}` is not a valid NATS subject"),
        ));
    }
    Ok(())
}

/// A user name and its password come together.
pub(super) fn pair(
    user_key: &'static str,
    user: &Option<String>,
    password_key: &'static str,
    password: &Option<Secret>,
) -> Result<(), ConfigError> {
    match (user, password) {
        (Some(_), None) => Err(ConfigError::invalid(
            password_key,
            format!("is required with {user_key}"),
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            user_key,
            format!("is required with {password_key}"),
        )),
        _ => Ok(()),
    }
}

/// `v` must lie in `range`.
pub(super) fn within(
    key: &'static str,
    v: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<(), ConfigError> {
    if !range.contains(&v) {
        return Err(ConfigError::invalid(
            key,
            format!("must be between {} and {}", range.start(), range.end()),
        ));
    }
    Ok(())
}

/// `v` must not equal `other`, the value of `other_key`.
pub(super) fn differs(
    key: &'static str,
    v: &str,
    other_key: &str,
    other: &str,
) -> Result<(), ConfigError> {
    if v == other {
        return Err(ConfigError::invalid(
            key,
            format!("must differ from {other_key}"),
        ));
    }
    Ok(())
}

/// A JetStream stream or consumer name.
pub(super) fn stream_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    non_empty(key, name)?;
    if name.contains(['.', '*', '>', ' ', '/', '\\']) {
        return Err(ConfigError::invalid(
            key,
            format!("`{name}` may not contain `.`, `*`, `>`, `/`, `\\` or spaces"),
        ));
    }
    Ok(())
}
