//! The L7 gateway: the agent's only way out. Every request is normalized, judged against
//! the Envelope, charged to its budgets, and forwarded with a credential the agent never
//! sees.
pub mod approval;
pub mod audit_sink;
pub mod breaker;
pub mod budget;
pub mod framing;
pub mod json_body;
pub mod normalize;
pub mod secrets;
pub mod server;
pub mod tls;
