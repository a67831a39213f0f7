//! Which partition a stream's records go to.
//!
//! Every record of a stream carries the stream's `streamSid` as its key and lands in one
//! partition per topic, so consumers read each stream in order (the same partition number on
//! topics with the same partition count). Two ways to pick it
//! (`--partitions-per-instance`):
//!
//! - **`all`**: librdkafka's partitioner on the key (`consistent_random`): streams spread over
//!   every partition of a topic, whatever instance holds them.
//! - **`N`** (the default is 1): this instance writes to `N` consecutive partitions of each
//!   topic, starting at a base chosen by its *seed* (`--instance-index` when given, else a hash
//!   of the host name); each stream goes to one of the `N` by a hash of its `streamSid`.
//!
//! Why the second exists and is the default: a produce request carries one batch per
//! partition with data, and every batch is a fixed cost for librdkafka (message-set framing,
//! CRC, one more request entry) and for the broker (one more stored batch). At 500 both-track
//! calls one partition per topic cut the gateway's CPU per message by ~17 % and the local
//! broker's end-to-end p99 by half (docs/benchmarks.md, decision 36). The price: one instance's
//! audio is in `N` partitions per topic, so a consumer group scales with instances × `N`, not
//! with the topic's partitions; `--partitions-per-instance all` restores the spread.
//!
//! The choice runs inside librdkafka as a partitioner callback on each topic handle (see
//! [`super::producer`]), so records produced before the topic's metadata is known wait in
//! librdkafka's unassigned queue exactly as with its own partitioners. The seed and `N` travel
//! in the topic's opaque pointer as plain bits, never dereferenced.

/// How this instance picks partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// librdkafka's partitioner on the key: every partition of the topic.
    Key,
    /// `per_instance` consecutive partitions from a base given by `seed`.
    Instance {
        /// `--instance-index`, or a hash of the host name.
        seed: u32,
        /// Partitions per topic this instance writes to (1..=[`MAX_PER_INSTANCE`]).
        per_instance: u32,
    },
}

/// Largest `--partitions-per-instance` (it travels in 16 bits of the topic opaque).
pub const MAX_PER_INSTANCE: u32 = 10_000;

impl Partitioning {
    /// The flag's value as `print-config` writes it.
    pub fn describe(&self) -> String {
        match self {
            Partitioning::Key => "\"all\"".to_owned(),
            Partitioning::Instance { per_instance, .. } => per_instance.to_string(),
        }
    }

    /// The plan packed into a topic opaque (`None` for [`Partitioning::Key`]).
    pub fn to_opaque(&self) -> Option<usize> {
        match *self {
            Partitioning::Key => None,
            Partitioning::Instance { seed, per_instance } => {
                Some(((seed as usize) << 16) | (per_instance.clamp(1, MAX_PER_INSTANCE) as usize))
            }
        }
    }

    /// Inverse of [`Partitioning::to_opaque`].
    pub fn from_opaque(bits: usize) -> (u32, u32) {
        ((bits >> 16) as u32, (bits & 0xffff) as u32)
    }
}

/// The seed of an instance: its index when it has one (so `--instance-count` instances with
/// `N` partitions each tile the topic), else a hash of `host` (stable across restarts on the
/// same host or pod name, so spooled records of a stream return to its partition).
pub fn seed(instance_index: Option<u32>, host: &str) -> u32 {
    match instance_index {
        Some(i) => i,
        None => fnv1a(host.as_bytes()),
    }
}

/// 32-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition of a record keyed `key` on a topic with `partition_cnt` partitions.
pub fn pick(seed: u32, per_instance: u32, key: &[u8], partition_cnt: i32) -> i32 {
    let cnt = partition_cnt.max(1) as u64;
    let n = u64::from(per_instance).clamp(1, cnt);
    let base = (u64::from(seed) % cnt) * n % cnt;
    let offset = u64::from(fnv1a(key)) % n;
    ((base + offset) % cnt) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(i: u32) -> String {
        format!("MZ{i:032x}")
    }

    #[test]
    fn one_per_instance_puts_every_stream_in_the_base_partition() {
        for p in (0..500).map(|i| pick(7, 1, sid(i).as_bytes(), 6)) {
            assert_eq!(p, 1, "7 % 6");
        }
    }

    #[test]
    fn n_per_instance_uses_exactly_n_consecutive_partitions() {
        let used: std::collections::BTreeSet<i32> = (0..2000)
            .map(|i| pick(2, 2, sid(i).as_bytes(), 6))
            .collect();
        assert_eq!(used.into_iter().collect::<Vec<_>>(), vec![4, 5]);
        // Wraps around the end of the topic.
        let used: std::collections::BTreeSet<i32> = (0..2000)
            .map(|i| pick(5, 3, sid(i).as_bytes(), 8))
            .collect();
        assert_eq!(used.into_iter().collect::<Vec<_>>(), vec![0, 1, 7]);
    }

    #[test]
    fn indexed_instances_tile_the_topic() {
        let mut all = std::collections::BTreeSet::new();
        for index in 0..3 {
            for i in 0..600 {
                all.insert((index, pick(index, 2, sid(i).as_bytes(), 6)));
            }
        }
        let by_index = |x: u32| {
            all.iter()
                .filter(|(i, _)| *i == x)
                .map(|(_, p)| *p)
                .collect::<Vec<_>>()
        };
        assert_eq!(by_index(0), vec![0, 1]);
        assert_eq!(by_index(1), vec![2, 3]);
        assert_eq!(by_index(2), vec![4, 5]);
    }

    #[test]
    fn more_per_instance_than_partitions_means_all_of_them() {
        let used: std::collections::BTreeSet<i32> = (0..2000)
            .map(|i| pick(11, 50, sid(i).as_bytes(), 4))
            .collect();
        assert_eq!(used.len(), 4);
        assert_eq!(pick(5, 1, b"x", 1), 0);
        assert_eq!(pick(5, 1, b"x", 0), 0, "a zero count never divides by zero");
    }

    #[test]
    fn same_stream_same_partition() {
        let a = pick(99, 3, b"MZ0123", 12);
        for _ in 0..10 {
            assert_eq!(pick(99, 3, b"MZ0123", 12), a);
        }
    }

    #[test]
    fn opaque_round_trip() {
        let p = Partitioning::Instance {
            seed: 0xdead_beef,
            per_instance: 3,
        };
        let bits = p.to_opaque().unwrap();
        assert_eq!(Partitioning::from_opaque(bits), (0xdead_beef, 3));
        assert_eq!(Partitioning::Key.to_opaque(), None);
    }

    #[test]
    fn seed_prefers_the_index() {
        assert_eq!(seed(Some(4), "gw-7"), 4);
        assert_eq!(seed(None, "gw-7"), fnv1a(b"gw-7"));
        assert_ne!(seed(None, "gw-7"), seed(None, "gw-8"));
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c, "FNV-1a reference value");
    }
}
