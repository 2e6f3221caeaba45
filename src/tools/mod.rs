//! Tools around the service, for development, the demo and tests: `certs`
//! writes certificates for local TLS, `seed`
//! creates sessions and members, `publish` sends events as a real publisher
//! does, `workload` publishes a sample load and reports what the gateways
//! received; `stack` and `fault_proxy` run private servers and break the
//! connections to them for the chaos run, the benchmark and the tests. They
//! use the same store and proto types as the service, so the contract lives
//! in one place.

pub mod bench;
pub mod certs;
pub mod chaos;
pub mod dlq;
pub mod fault_proxy;
pub mod publish;
pub mod seed;
pub mod stack;
pub mod workload;

use std::time::{SystemTime, UNIX_EPOCH};

/// The simulated user with index `i` (`user-000042`): the seed tool, the
/// reference gateway and the demo agree on these names.
pub fn user_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:06}")
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// Parses `A..B` (half-open) into a range of user indexes.
pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a range like 0..500"))?;
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("`{a}` is not a number"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("`{b}` is not a number"))?;
    if a >= b {
        return Err(format!("`{s}` is empty"));
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ranges() {
        assert_eq!(user_name("user-", 42), "user-000042");
        assert_eq!(parse_range("0..500").unwrap(), 0..500);
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("x..5").is_err());
        assert!(parse_range("5").is_err());
    }
}
