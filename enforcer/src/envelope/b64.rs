//! Strict standard base64 decoding for the signed payload, the largest field of every
//! signed Envelope. It accepts exactly what `base64`'s `STANDARD` engine accepts (the
//! standard alphabet, canonical `=` padding, zero bits after the last byte), decoded with
//! SIMD by `base64-simd`; input it refuses goes to the `base64` engine, so errors read as
//! they always did.
use base64::{DecodeError, Engine, engine::general_purpose::STANDARD};

/// Appends the bytes `input` encodes to `out`. On error `out` is as it was.
pub(crate) fn decode_append(input: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    if fast(input, out) {
        return Ok(());
    }
    out.truncate(start);
    STANDARD
        .decode_vec(input, out)
        .inspect_err(|_| out.truncate(start))
}

/// The common case: canonical standard base64. False for anything else; `out` may then
/// hold garbage past its old length.
fn fast(input: &[u8], out: &mut Vec<u8>) -> bool {
    // `base64-simd`'s non-forgiving STANDARD engine refuses what `base64`'s does: bytes
    // outside the alphabet, missing or misplaced padding, and set bits after the last byte
    // (the agreement tests below hold it to that).
    base64_simd::STANDARD.decode_append(input, out).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(input: &[u8]) {
        let mut out = b"prefix".to_vec();
        let ours = decode_append(input, &mut out).map(|()| out[6..].to_vec());
        assert_eq!(
            ours,
            STANDARD.decode(input),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        let mut fast_out = Vec::new();
        if fast(input, &mut fast_out) {
            assert_eq!(Ok(fast_out), STANDARD.decode(input));
        }
    }

    #[test]
    fn edge_cases() {
        for s in [
            "",
            "=",
            "==",
            "===",
            "====",
            "A",
            "AA",
            "AAA",
            "AA==",
            "AB==",
            "AAA=",
            "AAB=",
            "AAAA",
            "Zg==",
            "Zg=",
            "Zm8=",
            "Zm9v",
            "Zm9vYg==",
            "Zm9vYmE=",
            "Zm9vYmFy",
            "Zh==",
            "Zm9=",
            "Z===",
            "Zm=v",
            "=Zm9",
            "Zm9v====",
            "Zm9v\n",
            " Zm9v",
            "Zm9-",
            "Zm9_",
            "Zm9vYg==Zm9v",
            "A=A=",
            "+/+/",
            "////",
        ] {
            check(s.as_bytes());
        }
        check(&[0xff, b'A', b'A', b'A']);
    }

    proptest! {
        #[test]
        fn agrees_with_the_standard_engine(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            noise in proptest::collection::vec((any::<usize>(), prop_oneof![
                Just(b'='), Just(b'-'), Just(b'\n'), Just(0x80u8), Just(b'A'), any::<u8>()
            ]), 0..3),
            cut in 0usize..4,
        ) {
            let mut text = STANDARD.encode(&bytes).into_bytes();
            check(&text);
            for (i, b) in noise {
                if !text.is_empty() {
                    let i = i % text.len();
                    text[i] = b;
                }
            }
            check(&text);
            text.truncate(text.len().saturating_sub(cut));
            check(&text);
        }
    }
}
