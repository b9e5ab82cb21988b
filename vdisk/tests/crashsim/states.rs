//! Crash states from a recording.
//!
//! A crash point `c` means ops `0..c` were issued. What is durable then is
//! every op before the last `Sync` before `c`; the ops of the "pending epoch"
//! (after that sync, before `c`) each may or may not have reached the disk,
//! and a write may be torn at 512-byte sector boundaries. Applied pending
//! ops are applied in their original order: the page cache always holds the
//! newest data and writeback never lets an older copy of a page overwrite a
//! newer one (a page under writeback is waited for before it is written
//! again), so loss is modelled, not stale overwrites; two overlapping
//! pending writes with only the older one landing is a subset like any other.
//! A `SetLen` may or may not apply (a shrink not applied keeps the old
//! length); an applied write past the end grows the file to its end, torn or
//! not (unwritten sectors read zeros, as an extent allocated but not written).
//!
//! A state records the window of crash points it is reachable from,
//! `c_min..=c_max`: from the last applied op to the epoch's closing sync.

use super::{Op, Recording, apply};
use crate::common::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Everything issued before the crash point reached the disk (kill -9).
    Prefix,
    /// One pending op alone on top of the durable state.
    Single,
    /// Everything before a write, and that write torn.
    Torn,
    /// A random subset of an epoch's ops, sometimes with one torn.
    Random,
}

pub const FAMILIES: [Family; 4] = [Family::Prefix, Family::Single, Family::Torn, Family::Random];

/// One crash state: ops `0..base` all applied, then `pending` (op index and,
/// for a torn write, which of its sectors landed).
#[derive(Clone, Debug)]
pub struct CrashState {
    pub family: Family,
    pub base: usize,
    pub pending: Vec<(usize, Option<Vec<bool>>)>,
    /// The epoch the pending ops come from: `start..end`, `end` = its sync (or the op count).
    pub epoch: (usize, usize),
    pub c_min: usize,
    pub c_max: usize,
}

/// Sectors of 512 bytes a write covers (the first and last may be partial).
fn sectors(op: &Op) -> usize {
    match op {
        Op::Write { offset, data } => {
            let (s, e) = (offset / 512, (offset + data.len() as u64).div_ceil(512));
            (e - s) as usize
        }
        _ => 0,
    }
}

/// Applies a (possibly torn) op.
pub fn apply_part(file: &mut Vec<u8>, op: &Op, tear: Option<&[bool]>) {
    let (Op::Write { offset, data }, Some(mask)) = (op, tear) else {
        return apply(file, op);
    };
    let end = *offset as usize + data.len();
    if file.len() < end {
        file.resize(end, 0);
    }
    let first = *offset as usize / 512;
    for (i, &on) in mask.iter().enumerate() {
        if !on {
            continue;
        }
        let s = ((first + i) * 512).max(*offset as usize);
        let e = ((first + i + 1) * 512).min(end);
        file[s..e].copy_from_slice(&data[s - *offset as usize..e - *offset as usize]);
    }
}

/// The sync-delimited epochs: `(start, end)` with ops `start..end` between syncs.
pub fn epochs(ops: &[Op]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut start = 0;
    for (i, op) in ops.iter().enumerate() {
        if matches!(op, Op::Sync) {
            v.push((start, i));
            start = i + 1;
        }
    }
    v.push((start, ops.len()));
    v
}

/// Picks `n` of `items` (all of them if there are fewer), keeping their order.
fn sample<T: Clone>(items: Vec<T>, n: usize, rng: &mut Rng) -> Vec<T> {
    if items.len() <= n {
        return items;
    }
    let mut idx: Vec<usize> = (0..items.len()).collect();
    for i in 0..n {
        let j = i + (rng.next() as usize) % (idx.len() - i);
        idx.swap(i, j);
    }
    let mut keep = idx[..n].to_vec();
    keep.sort_unstable();
    keep.into_iter().map(|i| items[i].clone()).collect()
}

/// A torn version of a write of `n` sectors: a prefix of them, or a random subset.
fn tear(n: usize, rng: &mut Rng, prefix: bool) -> Vec<bool> {
    let mut m = vec![false; n];
    if prefix {
        let k = 1 + rng.next() as usize % (n - 1);
        m[..k].fill(true);
    } else {
        for b in &mut m {
            *b = rng.next().is_multiple_of(2);
        }
        // Neither all nor nothing: those are other states.
        m[rng.next() as usize % n] = true;
        m[rng.next() as usize % n] = false;
        if m.iter().all(|&b| !b) {
            m[0] = true;
        }
    }
    m
}

/// The crash states of `rec`, family by family, within `budget`.
pub fn generate(rec: &Recording, budget: &super::Budget) -> Vec<CrashState> {
    let ops = &rec.ops;
    let mut rng = Rng(budget.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let eps = epochs(ops);
    let mut out = Vec::new();
    let is_change = |i: usize| !matches!(ops[i], Op::Sync);

    let mut prefix = Vec::new();
    let mut single = Vec::new();
    let mut torn = Vec::new();
    for &(start, end) in &eps {
        for c in start..=end {
            prefix.push(CrashState {
                family: Family::Prefix,
                base: c,
                pending: Vec::new(),
                epoch: (start, end),
                c_min: c,
                c_max: end,
            });
        }
        for i in (start..end).filter(|&i| is_change(i)) {
            single.push(CrashState {
                family: Family::Single,
                base: start,
                pending: vec![(i, None)],
                epoch: (start, end),
                c_min: i + 1,
                c_max: end,
            });
            if sectors(&ops[i]) >= 2 {
                torn.push((i, start, end));
            }
        }
    }
    out.extend(sample(prefix, budget.prefix, &mut rng));
    out.extend(sample(single, budget.single, &mut rng));
    for (n, (i, start, end)) in sample(torn, budget.torn, &mut rng).into_iter().enumerate() {
        let mask = tear(sectors(&ops[i]), &mut rng, n % 2 == 0);
        out.push(CrashState {
            family: Family::Torn,
            base: i,
            pending: vec![(i, Some(mask))],
            epoch: (start, end),
            c_min: i + 1,
            c_max: end,
        });
    }
    // Random subsets of epochs with at least two changes, chosen in proportion to size.
    let weighted: Vec<(usize, usize)> = eps
        .iter()
        .copied()
        .filter(|&(s, e)| (s..e).filter(|&i| is_change(i)).count() >= 2)
        .collect();
    let total: usize = weighted.iter().map(|(s, e)| e - s).sum();
    for _ in 0..budget.random {
        if total == 0 {
            break;
        }
        let mut pick = rng.next() as usize % total;
        let &(start, end) = weighted
            .iter()
            .find(|(s, e)| {
                let hit = pick < e - s;
                if !hit {
                    pick -= e - s;
                }
                hit
            })
            .unwrap();
        // A random crash point in the epoch, then a random subset before it.
        let c = start + 1 + rng.next() as usize % (end - start);
        let p = [20u64, 50, 80][rng.next() as usize % 3];
        let mut pending: Vec<(usize, Option<Vec<bool>>)> = (start..c)
            .filter(|&i| is_change(i) && rng.next() % 100 < p)
            .map(|i| (i, None))
            .collect();
        if pending.is_empty() {
            continue;
        }
        if rng.next().is_multiple_of(3)
            && let Some(last) = pending.last_mut()
            && sectors(&ops[last.0]) >= 2
        {
            let prefix = rng.next().is_multiple_of(2);
            last.1 = Some(tear(sectors(&ops[last.0]), &mut rng, prefix));
        }
        let c_min = pending.last().unwrap().0 + 1;
        out.push(CrashState {
            family: Family::Random,
            base: start,
            pending,
            epoch: (start, end),
            c_min,
            c_max: end,
        });
    }
    out.sort_by_key(|s| (s.base, s.c_min));
    out
}

/// Builds state files incrementally: the durable base of consecutive states
/// (sorted by `base`) is advanced, not rebuilt.
pub struct Builder<'a> {
    rec: &'a Recording,
    upto: usize,
    base: Vec<u8>,
}

impl<'a> Builder<'a> {
    pub fn new(rec: &'a Recording) -> Builder<'a> {
        Builder {
            rec,
            upto: 0,
            base: rec.initial_file.clone(),
        }
    }
    /// The file of `st`, into `file` (reused: states are tens of MiB).
    pub fn build(&mut self, st: &CrashState, file: &mut Vec<u8>) {
        if st.base < self.upto {
            self.upto = 0;
            self.base = self.rec.initial_file.clone();
        }
        for op in &self.rec.ops[self.upto..st.base] {
            apply(&mut self.base, op);
        }
        self.upto = st.base;
        file.clear();
        file.extend_from_slice(&self.base);
        for (i, mask) in &st.pending {
            apply_part(file, &self.rec.ops[*i], mask.as_deref());
        }
    }
}

/// One line saying what a state is.
pub fn describe(rec: &Recording, st: &CrashState) -> String {
    let ops = &rec.ops;
    let mut s = match st.family {
        Family::Prefix => format!(
            "{:?}: ops 0..{} of {} all on disk (epoch {}..{})",
            st.family,
            st.base,
            ops.len(),
            st.epoch.0,
            st.epoch.1
        ),
        _ => format!(
            "{:?}: ops 0..{} durable, of epoch {}..{} (crash after op {}..{}) applied:",
            st.family,
            st.base,
            st.epoch.0,
            st.epoch.1,
            st.c_min.saturating_sub(1),
            st.c_max
        ),
    };
    for (i, mask) in st.pending.iter().take(12) {
        s.push_str(&format!(" [op {i} {}", ops[*i].describe()));
        if let Some(m) = mask {
            let on: Vec<String> = m
                .iter()
                .enumerate()
                .filter(|(_, b)| **b)
                .map(|(k, _)| k.to_string())
                .collect();
            s.push_str(&format!(" torn: sectors {} of {}", on.join(","), m.len()));
        }
        s.push(']');
    }
    if st.pending.len() > 12 {
        s.push_str(&format!(" ... ({} ops)", st.pending.len()));
    }
    let (start, end) = st.epoch;
    let missing: Vec<String> = (start..st.c_min.min(end))
        .filter(|i| !matches!(ops[*i], Op::Sync) && st.base <= *i)
        .filter(|i| !st.pending.iter().any(|(p, _)| p == i))
        .take(12)
        .map(|i| format!("op {i} {}", ops[i].describe()))
        .collect();
    if st.family != Family::Prefix && !missing.is_empty() {
        s.push_str(&format!("; lost: {}", missing.join(", ")));
    }
    s
}
