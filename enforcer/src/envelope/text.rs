//! [`Text`]: an immutable string that keeps short values inline.
//!
//! An Envelope is mostly short strings (names, hosts, paths, JSON pointers, currency
//! codes), dozens per capability. Verification builds every one of them, and a heap
//! allocation each, plus freeing it again, cost more than all the checks on them.

/// A string that keeps values up to 24 bytes inline; dereferences
/// to `&str` and compares, hashes, prints and (de)serializes as one.
pub type Text = compact_str::CompactString;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_values_read_back() {
        for s in [
            "",
            "a",
            "exchange-trading-key",
            "ä€𝄞 mixed",
            &"x".repeat(24),
            &"y".repeat(25),
        ] {
            let t = Text::new(s);
            assert_eq!(t.as_str(), s);
            assert_eq!(Text::from(s.to_owned()), t);
            assert_eq!(String::from(t.clone()), s);
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                serde_json::to_string(s).unwrap()
            );
            let back: Text = serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap();
            assert_eq!(back, s);
        }
        assert_eq!(std::mem::size_of::<Text>(), std::mem::size_of::<String>());
    }
}
