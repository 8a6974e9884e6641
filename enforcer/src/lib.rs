//! The enforcer library: everything the `enforcer` binary does, in modules a newcomer can
//! find by name.
//!
//! - [`audit`]: the tamper-evident audit log: hash-chained records, signed Merkle
//!   checkpoints, verification and proofs.
//! - [`control`]: the operator's control socket protocol and its peer checks.
//! - [`daemon`]: the daemon that joins all of it: activation, trips, resets, restarts.
//! - [`envelope`]: the signed, expiring grant: format, validation, signing, verification.
//! - [`gateway`]: the L7 proxy that decides, charges and forwards every agent request.
//! - [`kernel`]: loading, attaching and pinning the eBPF programs; the policy, counter and
//!   event maps.
//! - [`sandbox`]: cgroup v2 discovery, agent cgroups, starting a confined agent process.
pub mod audit;
pub mod control;
pub mod daemon;
pub mod envelope;
pub mod gateway;
pub mod kernel;
pub mod sandbox;
