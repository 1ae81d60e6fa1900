//! Keys to partitions (jump consistent hash) and partitions to replicas (rendezvous hashing;
//! preferred leaders spread evenly over each partition's replicas, [`partition_replicas`]).
//!
//! Both are pure functions of their inputs, so every node computes the same answer, and both
//! move few items when the count changes: growing from n to n+1 partitions moves about 1/(n+1)
//! of the keys; adding a member moves about replication_factor/members of the partitions.

use crate::types::NodeId;

/// 64-bit FNV-1a: stable across builds and platforms (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix(mut x: u64) -> u64 {
    // SplitMix64 finaliser.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Jump consistent hash (Lamping & Veach) of `key` into `0..buckets`.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_hash needs at least one bucket");
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The partition of an entity key.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    jump_hash(fnv1a(key), partitions)
}

/// The replicas of `group`, highest rendezvous score first; the first is the preferred leader.
pub fn replicas(group: u32, members: &[NodeId], replication_factor: usize) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = members
        .iter()
        .map(|&m| {
            (
                mix(mix(m) ^ u64::from(group).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                m,
            )
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored
        .into_iter()
        .take(replication_factor.max(1))
        .map(|(_, m)| m)
        .collect()
}

/// The replicas of every partition group `1..=partitions` (index `gid - 1`): each one's set by
/// rendezvous score ([`replicas`]), ordered so that its first, the preferred leader, spreads the
/// leads evenly: groups in order, each preferring the member of its set that is preferred by the
/// fewest groups so far (ties by score). Rendezvous order alone gave 8 / 4 / 4 of 16 partitions
/// on 3 nodes; this gives 6 / 5 / 5 (decision 0019).
pub fn partition_replicas(
    partitions: u32,
    members: &[NodeId],
    replication_factor: usize,
) -> Vec<Vec<NodeId>> {
    let mut leads: std::collections::HashMap<NodeId, usize> = std::collections::HashMap::new();
    (1..=partitions)
        .map(|gid| {
            let mut r = replicas(gid, members, replication_factor);
            // The first of the fewest leads, in score order.
            let best = (0..r.len())
                .min_by_key(|&i| (leads.get(&r[i]).copied().unwrap_or(0), i))
                .unwrap_or(0);
            let preferred = r.remove(best);
            r.insert(0, preferred);
            *leads.entry(preferred).or_default() += 1;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hash_stays_in_range_and_moves_few_keys() {
        let mut moved = 0;
        for k in 0..10_000u64 {
            let a = jump_hash(mix(k), 16);
            let b = jump_hash(mix(k), 17);
            assert!(a < 16 && b < 17);
            if a != b {
                assert_eq!(b, 16, "a key only ever moves to the new bucket");
                moved += 1;
            }
        }
        // Expect ~1/17 of the keys to move.
        assert!((300..900).contains(&moved), "moved {moved}");
    }

    #[test]
    fn partition_for_key_is_stable() {
        // Pinned values: changing the hash would silently re-shard every stored entity.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let p = partition_for_key(b"device-1", 16);
        assert_eq!(p, partition_for_key(b"device-1", 16));
    }

    #[test]
    fn replicas_are_distinct_and_spread_preferred_leaders() {
        let members = [1, 2, 3];
        let mut leaders = [0usize; 4];
        for g in 0..48 {
            let r = replicas(g, &members, 3);
            let mut s = r.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 3);
            leaders[r[0] as usize] += 1;
        }
        for m in members {
            assert!(leaders[m as usize] >= 8, "leaders {leaders:?}");
        }
    }

    #[test]
    fn preferred_leaders_are_spread_evenly() {
        for (partitions, members, rf) in [
            (16u32, vec![1u64, 2, 3], 3usize),
            (16, vec![1, 2, 3, 4, 5], 3),
            (7, vec![1, 2, 3], 2),
        ] {
            let all = partition_replicas(partitions, &members, rf);
            let mut leads = std::collections::HashMap::new();
            for (i, r) in all.iter().enumerate() {
                let mut set = r.clone();
                set.sort_unstable();
                let mut by_score = replicas(i as u32 + 1, &members, rf);
                by_score.sort_unstable();
                assert_eq!(set, by_score, "the replica set is rendezvous's");
                *leads.entry(r[0]).or_insert(0usize) += 1;
            }
            let (min, max) = (leads.values().min().copied(), leads.values().max().copied());
            assert_eq!(leads.len(), members.len(), "{leads:?}");
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{leads:?}");
        }
    }

    #[test]
    fn adding_a_member_moves_few_placements() {
        let before: Vec<_> = (0..64).map(|g| replicas(g, &[1, 2, 3, 4], 3)).collect();
        let after: Vec<_> = (0..64).map(|g| replicas(g, &[1, 2, 3, 4, 5], 3)).collect();
        let changed = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| {
                let mut a = (*a).clone();
                let mut b = (*b).clone();
                a.sort_unstable();
                b.sort_unstable();
                a != b
            })
            .count();
        // Each group gains member 5 with probability 3/5.
        assert!(changed < 56, "changed {changed} of 64");
    }
}
