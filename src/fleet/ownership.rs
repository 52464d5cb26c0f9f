//! Which partition a command goes to, and which replica consumes each partition
//! (docs/contract.md §9). Pure functions: every replica computes the same answers from the same
//! members, so no coordinator is needed.
//!
//! - [`partition_of`]: FNV-1a (64 bit) of the `botSessionId`'s UTF-8 bytes, modulo the
//!   partition count. Stable across processes, versions and platforms, so a session always
//!   lands in the same queue.
//! - [`assign`]: rendezvous (highest random weight) hashing with bounded loads. Each member
//!   ranks every partition by a hash of (member, partition); the (partition, member) pairs are
//!   taken best first, and a member stops taking partitions at its quota: ⌈P/N⌉ for the first
//!   `P mod N` members in name order, ⌊P/N⌋ for the rest. Plain rendezvous hashing lets one
//!   member own twice its share; the quotas make the split exact while keeping most partitions
//!   where they were when a member comes or goes.

use std::collections::BTreeSet;

/// FNV-1a, 64 bit: a few lines, stable, and good enough to spread session ids.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The SplitMix64 finalizer: FNV's low bits are weak for short inputs that differ at the end
/// (`p1`, `p2`), and ranks must look independent per partition.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The partition of a session: `fnv1a(botSessionId) mod partitions`; 0 when there are none.
pub fn partition_of(bot_session_id: &str, partitions: u16) -> u16 {
    if partitions == 0 {
        return 0;
    }
    let k = fnv1a(bot_session_id.bytes()) % u64::from(partitions);
    u16::try_from(k).unwrap_or(0)
}

/// The part of a member id that names the replica (`name/instance` → `name`): ranks follow the
/// name, so a replica restarted under the same name gets the same partitions back.
fn replica_name(member: &str) -> &str {
    member.rsplit_once('/').map_or(member, |(name, _)| name)
}

fn rank(member: &str, partition: u16) -> u64 {
    let name = replica_name(member);
    mix(fnv1a(
        name.bytes()
            .chain([0])
            .chain(partition.to_be_bytes())
            .collect::<Vec<u8>>(),
    ))
}

/// The owner of every partition: `owners[k]` is an index into `members` (which must be sorted
/// and free of duplicates, as the heartbeat returns them). Empty when there are no members.
pub fn assign(members: &[String], partitions: u16) -> Vec<usize> {
    let n = members.len();
    if n == 0 || partitions == 0 {
        return Vec::new();
    }
    let p = usize::from(partitions);
    let (base, extra) = (p / n, p % n);
    let mut quota: Vec<usize> = (0..n).map(|i| base + usize::from(i < extra)).collect();
    let mut pairs: Vec<(u64, &str, usize, u16)> = Vec::with_capacity(p * n);
    for (i, member) in members.iter().enumerate() {
        for k in 0..partitions {
            pairs.push((rank(member, k), member.as_str(), i, k));
        }
    }
    // Best rank first; ties (two members with one name) broken by the full id, then partition.
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)).then(a.3.cmp(&b.3)));
    let mut owners = vec![usize::MAX; p];
    let mut left = p;
    for (_, _, i, k) in pairs {
        let k = usize::from(k);
        if owners[k] == usize::MAX && quota[i] > 0 {
            owners[k] = i;
            quota[i] -= 1;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    owners
}

/// The partitions `me` owns among `members`.
pub fn owned_by(members: &[String], partitions: u16, me: &str) -> BTreeSet<u16> {
    let Some(i) = members.iter().position(|m| m == me) else {
        return BTreeSet::new();
    };
    assign(members, partitions)
        .into_iter()
        .zip(0..partitions)
        .filter(|(owner, _)| *owner == i)
        .map(|(_, k)| k)
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn members(names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| format!("{n}/x")).collect();
        v.sort();
        v
    }

    #[test]
    fn partition_of_is_fnv1a_mod_p() {
        // FNV-1a 64 of "" is the offset basis; of "a" a published test vector.
        assert_eq!(fnv1a([]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(u64::from(partition_of("a", 16)), 0xaf63_dc4c_8601_ec8c % 16);
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn a_restarted_replica_with_its_old_name_gets_its_partitions_back() {
        let before = vec!["a/1".to_owned(), "b/1".to_owned(), "c/1".to_owned()];
        let after = vec!["a/1".to_owned(), "b/2".to_owned(), "c/1".to_owned()];
        assert_eq!(assign(&before, 16), assign(&after, 16));
    }

    proptest! {
        #[test]
        fn every_partition_has_one_owner_and_shares_are_even(
            n in 1usize..12, p in 1u16..200,
        ) {
            let names: Vec<String> = (0..n).map(|i| format!("replica-{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let m = members(&refs);
            let owners = assign(&m, p);
            prop_assert_eq!(owners.len(), usize::from(p));
            let mut counts = vec![0usize; n];
            for &o in &owners {
                prop_assert!(o < n);
                counts[o] += 1;
            }
            let lo = usize::from(p) / n;
            let hi = lo + usize::from(usize::from(p) % n != 0);
            for c in counts {
                prop_assert!(c == lo || c == hi, "share {} not in {}..={}", c, lo, hi);
            }
        }

        #[test]
        fn partition_of_is_in_range(s in ".*", p in 1u16..=1024) {
            prop_assert!(partition_of(&s, p) < p);
        }

        #[test]
        fn when_a_member_leaves_the_others_keep_most_of_theirs(n in 3usize..8, gone in 0usize..8) {
            let p = 64u16;
            let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let before = members(&refs);
            let gone = gone % n;
            let after: Vec<String> = before.iter().enumerate()
                .filter(|(i, _)| *i != gone).map(|(_, m)| m.clone()).collect();
            let (ob, oa) = (assign(&before, p), assign(&after, p));
            let kept = (0..usize::from(p))
                .filter(|&k| ob[k] != gone && before[ob[k]] == after[oa[k]])
                .count();
            let survivors_had = ob.iter().filter(|&&o| o != gone).count();
            // Only what the quotas force moves: at least half of what the survivors owned stays.
            prop_assert!(kept * 2 >= survivors_had, "kept {} of {}", kept, survivors_had);
        }
    }
}
