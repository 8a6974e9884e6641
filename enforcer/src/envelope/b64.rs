//! Strict standard base64 decoding for the signed payload, the largest field of every
//! signed Envelope. It accepts exactly what `base64`'s `STANDARD` engine accepts (the
//! standard alphabet, canonical `=` padding, zero bits after the last byte); input it
//! refuses goes to that engine, so errors read as they always did.
use base64::{DecodeError, Engine, engine::general_purpose::STANDARD};

/// Set in a table entry for a byte outside the alphabet. Four sextets fill only the low 24
/// bits, so one OR over a whole input collects every bad byte.
const BAD: u32 = 1 << 24;

/// For each byte, its sextet already shifted to where it lands in a 4-character group:
/// one table per position saves the shifts in the loop.
const fn table(shift: u32) -> [u32; 256] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut t = [BAD; 256];
    let mut i = 0;
    while i < 64 {
        t[ALPHABET[i] as usize] = (i as u32) << shift;
        i += 1;
    }
    t
}

static T0: [u32; 256] = table(18);
static T1: [u32; 256] = table(12);
static T2: [u32; 256] = table(6);
static T3: [u32; 256] = table(0);

fn group(s: &[u8; 4]) -> u32 {
    T0[usize::from(s[0])] | T1[usize::from(s[1])] | T2[usize::from(s[2])] | T3[usize::from(s[3])]
}

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

/// The common case: well-formed input, decoded in one pass. False when the input is not
/// canonical standard base64; `out` may then hold garbage past its old length.
fn fast(input: &[u8], out: &mut Vec<u8>) -> bool {
    if !input.len().is_multiple_of(4) {
        return false;
    }
    let Some(body_len) = input.len().checked_sub(4) else {
        return true;
    };
    let (body, last) = input.split_at(body_len);
    let Ok(last) = <&[u8; 4]>::try_from(last) else {
        return false;
    };
    let pad = match last {
        [_, _, b'=', b'='] => 2,
        [_, _, _, b'='] => 1,
        _ => 0,
    };
    let start = out.len();
    let body_bytes = body_len / 4 * 3;
    out.resize(start + body_bytes + 3 - pad, 0);
    let Some((dst, tail)) = out
        .get_mut(start..)
        .and_then(|o| o.split_at_mut_checked(body_bytes))
    else {
        return false;
    };
    let mut bad = 0;
    // Two groups at a time: their 48 bits go out in one store.
    let (pairs, odd) = body.as_chunks::<8>();
    let (dst_pairs, dst_odd) = dst.as_chunks_mut::<6>();
    for (s, d) in pairs.iter().zip(dst_pairs) {
        let (a, b) = s.split_at(4);
        let (Ok(a), Ok(b)) = (<&[u8; 4]>::try_from(a), <&[u8; 4]>::try_from(b)) else {
            return false;
        };
        let (a, b) = (group(a), group(b));
        bad |= a | b;
        let [_, _, v @ ..] = (u64::from(a) << 24 | u64::from(b)).to_be_bytes();
        *d = v;
    }
    if let (Ok(s), Ok(d)) = (<&[u8; 4]>::try_from(odd), <&mut [u8; 3]>::try_from(dst_odd)) {
        let n = group(s);
        bad |= n;
        let [_, v @ ..] = n.to_be_bytes();
        *d = v;
    }
    // Padding decodes as zero sextets; the bits it stands for must be zero too (canonical).
    let mut l = *last;
    l[4 - pad..].fill(b'A');
    let n = group(&l);
    let dropped = match pad {
        2 => n & 0xffff,
        1 => n & 0xff,
        _ => 0,
    };
    let bytes = n.to_be_bytes();
    let Some(src) = bytes.get(1..4 - pad) else {
        return false;
    };
    tail.copy_from_slice(src);
    (bad | n) & BAD == 0 && dropped == 0
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
