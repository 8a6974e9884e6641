//! The enforcer library: everything the `enforcer` binary does, in modules a newcomer can
//! find by name.
//!
//! - [`audit`]: the tamper-evident audit log: hash-chained records, signed Merkle
//!   checkpoints, verification and proofs.
//! - [`envelope`]: the signed, expiring grant: format, validation, signing, verification.
//! - [`gateway`]: the L7 proxy that decides, charges and forwards every agent request.
//! - [`kernel`]: loading, attaching and pinning the eBPF programs; the policy, counter and
//!   event maps.
//! - [`sandbox`]: cgroup v2 discovery, agent cgroups, starting a confined agent process.
pub mod audit;
pub mod envelope;
pub mod gateway;
pub mod kernel;
pub mod sandbox;
