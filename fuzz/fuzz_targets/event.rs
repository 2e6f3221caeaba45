//! Arbitrary bytes as a NATS payload: size limit, the session id intake
//! reads for ordering, decoding, validation and fan-out planning, with
//! their invariants (see `resonance_task::dispatch::dry_run`).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use resonance_task::config::LimitsConfig;
use resonance_task::dispatch::dry_run::dry_run;

fn limits() -> &'static LimitsConfig {
    static LIMITS: OnceLock<LimitsConfig> = OnceLock::new();
    LIMITS.get_or_init(|| LimitsConfig {
        // Small enough that the fuzzer crosses every bound.
        max_payload_bytes: 8192,
        max_content_bytes: 4096,
        max_username_bytes: 32,
        max_session_id_bytes: 32,
        ..LimitsConfig::default()
    })
}

fuzz_target!(|payload: &[u8]| {
    dry_run(payload, limits());
});
