//! Helpers for the privileged end-to-end tests live in `tests/tests/common`.
