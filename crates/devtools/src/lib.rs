//! Developer tools around the service, for development, the demo and
//! benchmarks: `seed` creates sessions and members, `publish` sends events
//! as a real publisher does, `workload` publishes a sample load and reports
//! what the gateways received, `chaos` breaks every dependency in turn
//! under load and audits what arrived, and `bench` measures the fan-out
//! against the upstream algorithm and the I/O floor. `cli` turns them into
//! subcommands of `resonance-task`. They use the service's own store and
//! proto types, so the contract lives in one place, and the test kit's
//! private servers.

#![forbid(unsafe_code)]

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod publish;
pub mod seed;
pub mod workload;
