//! Which partitions of the playback topic an instance reads, so the read cost per instance
//! does not grow with the number of instances.
//!
//! Three ways, chosen by flags (see `docs/decisions.md` for restart, scale-out and scale-in):
//! - `--playback-partitions 0-3,8`: explicit.
//! - `--instance-index N --instance-count M` (`N` = `auto` takes the trailing number of the
//!   host name, as a Kubernetes StatefulSet names its pods): every partition `p` with
//!   `p % M == N`.
//! - neither: every partition (one instance).
//!
//! Correctness does not depend on the assignment being disjoint: an instance only advertises
//! partitions it reads and only plays records for streams it holds, so an overlap during a
//! rolling change costs duplicate reads, never a wrong call.

/// How this instance's partitions are chosen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Assignment {
    /// Every partition of the topic.
    #[default]
    All,
    /// These partitions.
    Explicit(Vec<i32>),
    /// Partitions `p` with `p % count == index`.
    Instance {
        /// This instance's index, `0..count`.
        index: u32,
        /// Number of instances.
        count: u32,
    },
}

impl Assignment {
    /// The partitions to read out of a topic with `partitions` partitions.
    pub fn resolve(&self, partitions: i32) -> Result<Vec<i32>, String> {
        let owned: Vec<i32> = match self {
            Assignment::All => (0..partitions).collect(),
            Assignment::Explicit(list) => {
                if let Some(p) = list.iter().find(|p| **p >= partitions) {
                    return Err(format!(
                        "--playback-partitions names partition {p}, but the playback topic has {partitions}"
                    ));
                }
                list.clone()
            }
            Assignment::Instance { index, count } => {
                if *count as i32 > partitions {
                    return Err(format!(
                        "--instance-count {count} exceeds the playback topic's {partitions} partitions: \
                         some instances would read none (create it with more partitions)"
                    ));
                }
                (0..partitions)
                    .filter(|p| *p as u32 % count == *index)
                    .collect()
            }
        };
        if owned.is_empty() {
            return Err("no playback partition left for this instance".into());
        }
        Ok(owned)
    }

    /// `print-config` form.
    pub fn describe(&self) -> String {
        match self {
            Assignment::All => "all".into(),
            Assignment::Explicit(l) => l
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
            Assignment::Instance { index, count } => format!("instance {index} of {count}"),
        }
    }
}

/// Parses `0-3,8` into `[0, 1, 2, 3, 8]` (sorted, without duplicates).
pub fn parse_list(s: &str) -> Result<Vec<i32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: i32 = a
            .parse()
            .map_err(|_| format!("{part:?} is not a partition or range"))?;
        let b: i32 = b
            .parse()
            .map_err(|_| format!("{part:?} is not a partition or range"))?;
        if a < 0 || b < a || b - a > 100_000 {
            return Err(format!("{part:?} is not a valid range"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err("empty partition list".into());
    }
    Ok(out)
}

/// The trailing number of a host name (`gateway-2` → 2), as StatefulSet pods are named.
pub fn ordinal_from_hostname(host: &str) -> Option<u32> {
    let digits: String = host
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_instances() {
        assert_eq!(parse_list("0-3,8, 2").unwrap(), vec![0, 1, 2, 3, 8]);
        assert!(parse_list("3-1").is_err() && parse_list("x").is_err() && parse_list("").is_err());
        assert_eq!(Assignment::All.resolve(3).unwrap(), vec![0, 1, 2]);
        let i = Assignment::Instance { index: 1, count: 3 };
        assert_eq!(i.resolve(7).unwrap(), vec![1, 4]);
        assert!(Assignment::Instance { index: 0, count: 4 }
            .resolve(3)
            .is_err());
        assert!(Assignment::Explicit(vec![5]).resolve(3).is_err());
        assert_eq!(ordinal_from_hostname("gateway-12"), Some(12));
        assert_eq!(ordinal_from_hostname("gateway"), None);
    }

    #[test]
    fn instances_together_read_every_partition_exactly_once() {
        for count in 1..=6u32 {
            let mut all: Vec<i32> = (0..count)
                .flat_map(|index| Assignment::Instance { index, count }.resolve(12).unwrap())
                .collect();
            all.sort_unstable();
            assert_eq!(all, (0..12).collect::<Vec<_>>());
        }
    }
}
