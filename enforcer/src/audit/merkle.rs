//! RFC 9162 Merkle tree hashing: leaves `H(0x00‖entry)`, nodes `H(0x01‖left‖right)`, with
//! inclusion and consistency proofs (§2.1.3, §2.1.4). The entries are the exact bytes of
//! the record lines, without their newline.
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// `prev` of the first record: there is nothing before it.
pub const GENESIS: Hash = [0; 32];

/// What the next record's `prev` holds: SHA-256 over the exact line bytes, domain-separated
/// as the RFC 9162 leaf hash, so link and leaf are one hash per record instead of two.
pub fn chain_hash(line: &[u8]) -> Hash {
    leaf_hash(line)
}

/// [`chain_hash`] of a line fed in two parts: the opening, which depends on the record
/// alone and is hashed by whoever renders it, on their own thread; and the closing (time,
/// seq, prev), which only the writer knows. The writer, which every record passes through
/// in turn, then hashes just the last blocks of each line.
#[derive(Clone)]
pub struct LineHash(Sha256);

impl LineHash {
    pub fn of_opening(opening: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update([0u8]);
        h.update(opening);
        Self(h)
    }

    /// The hash of the whole line: the opening followed by `closing`.
    pub fn finish(&self, closing: &[u8]) -> Hash {
        let mut h = self.0.clone();
        h.update(closing);
        h.finalize().into()
    }
}

pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty tree: the hash of the empty string (RFC 9162 §2.1.1).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The roots of the perfect subtrees that make up a tree of `size` leaves, largest first:
/// enough to append leaves and compute the root without keeping every leaf, so the writer
/// and the verifier run in constant memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a frontier from its parts; `None` if they cannot belong together (one node
    /// per set bit of the size).
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Self { size, nodes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        // Each trailing one bit of the old size is a perfect subtree of the same height as
        // the one being carried: merge them, like binary addition.
        while s & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => h = node_hash(&left, &h),
                None => break,
            }
            s >>= 1;
        }
        self.nodes.push(h);
        self.size += 1;
    }

    /// MTH of the leaves pushed so far. RFC 9162 splits at the largest power of two, so the
    /// root folds the subtrees from the smallest (rightmost) up.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(first) = it.next() else {
            return empty_root();
        };
        it.fold(*first, |acc, left| node_hash(left, &acc))
    }
}

fn largest_pow2_below(n: usize) -> usize {
    // n >= 2 here: the largest power of two strictly less than n.
    1usize << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH over leaf hashes.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = largest_pow2_below(n);
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]) of RFC 9162 §2.1.3.1; `None` if `index` is not a leaf of the tree.
pub fn inclusion_path(index: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    fn walk(m: usize, leaves: &[Hash], path: &mut Vec<Hash>) {
        let n = leaves.len();
        if n <= 1 {
            return;
        }
        let k = largest_pow2_below(n);
        if m < k {
            walk(m, &leaves[..k], path);
            path.push(root_of(&leaves[k..]));
        } else {
            walk(m - k, &leaves[k..], path);
            path.push(root_of(&leaves[..k]));
        }
    }
    walk(index, leaves, &mut path);
    Some(path)
}

/// Checks an inclusion path (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// PROOF(m, D[n]) of RFC 9162 §2.1.4.1: shows that the first `old_size` leaves are a
/// prefix of `leaves`. `None` if `old_size` is 0 or larger than the tree.
pub fn consistency_path(old_size: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    if old_size == 0 || old_size > leaves.len() {
        return None;
    }
    fn sub(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
        let n = leaves.len();
        if m == n {
            if !complete {
                out.push(root_of(leaves));
            }
            return;
        }
        let k = largest_pow2_below(n);
        if m <= k {
            sub(m, &leaves[..k], complete, out);
            out.push(root_of(&leaves[k..]));
        } else {
            sub(m - k, &leaves[k..], false, out);
            out.push(root_of(&leaves[..k]));
        }
    }
    let mut out = Vec::new();
    sub(old_size, leaves, true, &mut out);
    Some(out)
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2) between two tree heads.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    path: &[Hash],
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return path.is_empty() && old_root == new_root;
    }
    let mut path: Vec<Hash> = path.to_vec();
    if path.is_empty() {
        return false;
    }
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *old_root && sr == *new_root && snode == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn known_roots_match_rfc_shape() {
        let l = leaves(3);
        let expected = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(root_of(&l), expected);
        assert_eq!(root_of(&[]), empty_root());
        // The RFC 6962 test vector for the empty tree.
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    proptest! {
        #[test]
        fn frontier_root_equals_recursive_root(n in 0usize..300) {
            let l = leaves(n);
            let mut f = Frontier::new();
            for (i, leaf) in l.iter().enumerate() {
                prop_assert_eq!(f.root(), root_of(&l[..i]));
                f.push(*leaf);
            }
            prop_assert_eq!(f.root(), root_of(&l));
            let rebuilt = Frontier::from_parts(f.size(), f.nodes().to_vec());
            prop_assert_eq!(rebuilt.map(|r| r.root()), Some(root_of(&l)));
        }

        #[test]
        fn inclusion_round_trip_and_tamper(n in 1usize..200, i in 0usize..200, flip in 0usize..64) {
            let i = i % n;
            let l = leaves(n);
            let root = root_of(&l);
            let path = inclusion_path(i, &l).unwrap();
            prop_assert!(verify_inclusion(i as u64, n as u64, &l[i], &path, &root));
            // Wrong index, wrong size, wrong leaf, altered path: all refused.
            if n > 1 {
                prop_assert!(!verify_inclusion(((i + 1) % n) as u64, n as u64, &l[i], &path, &root));
            }
            prop_assert!(!verify_inclusion(i as u64, n as u64, &leaf_hash(b"other"), &path, &root));
            prop_assert!(!verify_inclusion(n as u64, n as u64, &l[i], &path, &root));
            if !path.is_empty() {
                let mut bad = path.clone();
                let k = flip % bad.len();
                bad[k][flip % 32] ^= 1;
                prop_assert!(!verify_inclusion(i as u64, n as u64, &l[i], &bad, &root));
            }
        }

        #[test]
        fn consistency_round_trip_and_tamper(n in 1usize..200, m in 1usize..200, flip in 0usize..64) {
            let m = 1 + (m - 1) % n;
            let l = leaves(n);
            let (old, new) = (root_of(&l[..m]), root_of(&l));
            let path = consistency_path(m, &l).unwrap();
            prop_assert!(verify_consistency(m as u64, n as u64, &old, &new, &path));
            let other = leaf_hash(b"x");
            prop_assert!(!verify_consistency(m as u64, n as u64, &other, &new, &path));
            prop_assert!(!verify_consistency(m as u64, n as u64, &old, &other, &path));
            if !path.is_empty() {
                let mut bad = path.clone();
                let k = flip % bad.len();
                bad[k][flip % 32] ^= 1;
                prop_assert!(!verify_consistency(m as u64, n as u64, &old, &new, &bad));
            }
        }
    }
}
