//! The oracle for one crash state, and a run over all states of a recording.
//!
//! Per state: (a) the image opens read-only with vdisk and opens writable (on
//! a copy); (b) the format's checker is clean or reports leaks only:
//! `qemu-img check` for VHDX (with `-r all` on the copy when a log must be
//! replayed first; corruptions must be 0) and VDI (its "allocated blocks
//! mismatch, is X, should be Y" with X map entries below the header count Y
//! is a leak: the header counting more blocks than the map uses only wastes
//! space), the suite's VHD checker for VHD; (c) every virtual byte equals
//! the content acknowledged by the last `Disk::flush` completed before the
//! crash point, or a value a write issued after that flush and before the
//! crash point put there.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use super::states::{self, CrashState, FAMILIES, Family};
use super::{Budget, DiskWrite, Fmt, Recording};

/// Counts per family: states generated, distinct states checked, failures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub generated: usize,
    pub checked: usize,
    pub failed: usize,
}

pub struct Report {
    pub name: String,
    pub families: Vec<(Family, Counts)>,
    /// Failure kinds (message with numbers masked), how often each
    /// occurred, and its first occurrence in full with the state.
    pub kinds: Vec<(String, usize, String)>,
    pub checker_runs: usize,
    /// What the checkers noted on passing states (log replays, leaks), by kind.
    pub notes: Vec<(String, usize)>,
    pub ops: usize,
    pub syncs: usize,
    pub seconds: f64,
    /// Seconds spent building states, opening and reading them, in the checkers, comparing.
    pub phases: [f64; 4],
}

impl Report {
    pub fn failed(&self) -> usize {
        self.families.iter().map(|(_, c)| c.failed).sum()
    }
    pub fn checked(&self) -> usize {
        self.families.iter().map(|(_, c)| c.checked).sum()
    }
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} ops ({} syncs), {} distinct crash states checked, {} failed, {} checker runs, {:.1} s (build {:.1}, open+read {:.1}, check {:.1}, compare {:.1}):",
            self.name,
            self.ops,
            self.syncs,
            self.checked(),
            self.failed(),
            self.checker_runs,
            self.seconds,
            self.phases[0],
            self.phases[1],
            self.phases[2],
            self.phases[3],
        );
        for (f, c) in &self.families {
            let _ = write!(
                s,
                " {f:?} {}/{} ({} failed)",
                c.checked, c.generated, c.failed
            );
        }
        s
    }
    /// Everything a reader needs: the summary, each kind of failure, the first few in full.
    pub fn details(&self) -> String {
        let mut s = self.summary();
        for (k, n) in &self.notes {
            let _ = write!(s, "\n  note: {n} x {k}");
        }
        for (k, n, first) in &self.kinds {
            let _ = write!(s, "\n  {n} x {k}\n    first: {first}");
        }
        s
    }
    pub fn assert_clean(&self) {
        assert!(self.failed() == 0, "{}", self.details());
        println!("{}", self.details());
    }
}

/// Replaces numbers (decimal, 0x hex, {GUID}) with '#', so failures group by kind.
fn kind(msg: &str) -> String {
    let mut out = String::new();
    let mut in_num = false;
    let mut in_guid = false;
    for ch in msg.chars() {
        if in_guid || ch == '{' {
            in_guid = ch != '}';
            if ch == '{' {
                out.push_str("{#}");
            }
            continue;
        }
        let digit = ch.is_ascii_digit();
        if digit || in_num && (ch.is_ascii_hexdigit() || ch == 'x') {
            if !in_num {
                out.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(ch);
        }
    }
    out.chars().take(200).collect()
}

/// A fast 64-bit hash of a state's bytes, for deduplication.
fn hash(d: &[u8]) -> u64 {
    let mut h = [0x9E37_79B9_7F4A_7C15u64 ^ d.len() as u64; 4];
    let mut chunks = d.chunks_exact(32);
    for c in &mut chunks {
        for (lane, w) in h.iter_mut().zip(c.chunks_exact(8)) {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            *lane = (*lane ^ v)
                .wrapping_mul(0xFF51_AFD7_ED55_8CCD)
                .rotate_left(31);
        }
    }
    for (i, &b) in chunks.remainder().iter().enumerate() {
        h[i % 4] = (h[i % 4] ^ b as u64).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    }
    h.iter()
        .fold(0u64, |a, &x| (a ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Virtual contents after the first `k` disk writes, for a few `k` at a time.
struct Shadows<'a> {
    initial: &'a [u8],
    writes: &'a [DiskWrite],
    slots: Vec<(usize, Vec<u8>)>,
}

impl Shadows<'_> {
    fn get(&mut self, k: usize) -> &[u8] {
        let best = (0..self.slots.len())
            .filter(|&i| self.slots[i].0 <= k)
            .max_by_key(|&i| self.slots[i].0);
        let i = match best {
            Some(i) => i,
            None if self.slots.len() < 2 => {
                self.slots.push((0, self.initial.to_vec()));
                self.slots.len() - 1
            }
            None => {
                let i = (0..self.slots.len())
                    .min_by_key(|&i| self.slots[i].0)
                    .unwrap();
                self.slots[i] = (0, self.initial.to_vec());
                i
            }
        };
        let (at, data) = &mut self.slots[i];
        for w in &self.writes[*at..k] {
            data[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
        *at = k;
        &self.slots[i].1
    }
}

/// Where the checkers' temporary files go: tmpfs when there is one.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

/// `qemu-img check` output: corruptions, leaks, check errors, and stderr.
fn qemu_check(fmt: Fmt, path: &Path, repair: bool) -> (i64, i64, i64, String) {
    let mut args = vec!["check", "-f", fmt.qemu(), "--output=json"];
    if repair {
        args.extend(["-r", "all"]);
    }
    let out = Command::new("qemu-img")
        .args(&args)
        .arg(path)
        .output()
        .expect("cannot run qemu-img (install qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> i64 {
        text.split(&format!("\"{name}\": "))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(if name == "check-errors" && text.is_empty() {
                1
            } else {
                0
            })
    };
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (
        field("corruptions"),
        field("leaks"),
        field("check-errors"),
        err,
    )
}

/// The structural check of one state file: Ok(note) or Err(failure).
fn structural(fmt: Fmt, file: &[u8], dir: &Path) -> Result<String, String> {
    match fmt {
        Fmt::Vhd => crate::vhd_util::check(file)
            .map(|_| String::new())
            .map_err(|e| format!("VHD check: {e}")),
        Fmt::Vdi => {
            let path = dir.join("state.vdi");
            std::fs::write(&path, file).unwrap();
            let (corrupt, leaks, errors, err) = qemu_check(fmt, &path, false);
            // Header count above the map's entries: a leak (see the module doc).
            let mut leaked = 0;
            let mut other = Vec::new();
            for line in err.lines().filter(|l| l.contains("ERROR")) {
                let nums: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect();
                match nums.as_slice() {
                    [is, should] if line.contains("allocated blocks mismatch") && is < should => {
                        leaked += 1
                    }
                    _ => other.push(line.to_string()),
                }
            }
            if errors != 0 || corrupt > leaked || !other.is_empty() {
                return Err(format!(
                    "qemu-img check: {corrupt} corruptions, {errors} check errors: {}",
                    err.replace('\n', " | ")
                ));
            }
            Ok(if leaked + leaks > 0 {
                format!("leaks: {err}")
            } else {
                String::new()
            })
        }
        Fmt::Vmdk | Fmt::Qcow2 => {
            let path = dir.join(format!("state.{}", fmt.ext()));
            std::fs::write(&path, file).unwrap();
            let (corrupt, leaks, errors, err) = qemu_check(fmt, &path, false);
            if corrupt != 0 || errors != 0 {
                return Err(format!(
                    "qemu-img check: {corrupt} corruptions, {errors} check errors: {}",
                    err.replace('\n', " | ")
                ));
            }
            Ok(if leaks > 0 {
                format!("{leaks} leaks")
            } else {
                String::new()
            })
        }
        Fmt::Vhdx => {
            let path = dir.join("state.vhdx");
            std::fs::write(&path, file).unwrap();
            let (mut corrupt, mut leaks, mut errors, mut err) = qemu_check(fmt, &path, false);
            let mut note = String::new();
            if errors != 0 && err.contains("log") {
                // A log to replay: qemu replays it only with -r (on our copy).
                (corrupt, leaks, errors, err) = qemu_check(fmt, &path, true);
                note = "log replayed by qemu-img check -r all; ".to_string();
            }
            if corrupt != 0 || errors != 0 {
                return Err(format!(
                    "{note}qemu-img check: {corrupt} corruptions, {errors} check errors: {}",
                    err.replace('\n', " | ")
                ));
            }
            if leaks > 0 {
                note.push_str(&format!("{leaks} leaks"));
            }
            Ok(note)
        }
    }
}

/// (c) for one crash point: every byte of `actual` is acknowledged content or
/// a later write's.
fn check_content(
    rec: &Recording,
    shadows: &mut Shadows,
    actual: &[u8],
    c: usize,
) -> Result<(), String> {
    let ack = rec.flushes.iter().rposition(|f| f.op_end <= c);
    let k = ack.map_or(0, |f| rec.flushes[f].writes);
    let m = rec.writes.partition_point(|w| w.op_start < c).max(k);
    let acked = shadows.get(k);
    let cands = &rec.writes[k..m];
    let n = actual.len().min(acked.len());
    let mut first: Option<String> = None;
    let mut bad = 0usize;
    let mut i = 0usize;
    while i < n {
        // Skip equal stretches a page at a time.
        if actual[i] == acked[i] {
            let step = (i | 4095) + 1;
            let e = step.min(n);
            if actual[i..e] == acked[i..e] {
                i = e;
                continue;
            }
            while actual[i] == acked[i] {
                i += 1;
            }
        }
        let hit = cands.iter().rev().find(|w| {
            let o = w.offset as usize;
            o <= i && i < o + w.data.len() && w.data[i - o] == actual[i]
        });
        match hit {
            Some(w) => {
                let (o, e) = (w.offset as usize, w.offset as usize + w.data.len());
                i += 1;
                while i < e.min(n) && (actual[i] == w.data[i - o] || actual[i] == acked[i]) {
                    i += 1;
                }
            }
            None => {
                bad += 1;
                if first.is_none() {
                    let later: Vec<String> = cands
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| {
                            let o = w.offset as usize;
                            o <= i && i < o + w.data.len()
                        })
                        .map(|(j, w)| format!("#{}={:#04x}", k + j, w.data[i - w.offset as usize]))
                        .take(6)
                        .collect();
                    let ack_name = match ack {
                        Some(f) => format!(
                            "flush #{f}{} (after disk writes 0..{k})",
                            if rec.flushes[f].read_only {
                                ", read-only"
                            } else {
                                ""
                            }
                        ),
                        None => "no flush (initial content)".to_string(),
                    };
                    first = Some(format!(
                        "virtual byte {i} reads {:#04x}, acknowledged {:#04x} by {ack_name}; {}",
                        actual[i],
                        acked[i],
                        if later.is_empty() {
                            "no later write covers it: acknowledged data lost".to_string()
                        } else {
                            format!(
                                "nor any of the later writes there ({}): garbage",
                                later.join(" ")
                            )
                        }
                    ));
                }
                i += 1;
            }
        }
    }
    match first {
        None => Ok(()),
        Some(f) => Err(format!("{f} [{bad} bad bytes, crash point {c}]")),
    }
}

/// Checks every state of `rec` within `budget`.
pub fn run(rec: &Recording, budget: &Budget) -> Report {
    let t = Instant::now();
    let states = states::generate(rec, budget);
    let dir = scratch();
    let mut builder = states::Builder::new(rec);
    let mut shadows = Shadows {
        initial: &rec.initial_virtual,
        writes: &rec.writes,
        slots: Vec::new(),
    };
    let mut counts: HashMap<Family, Counts> = HashMap::new();
    // Structural verdicts by file hash (checker runs are the cost);
    // full verdicts by (file hash, crash points).
    let mut structure: HashMap<u64, Result<String, String>> = HashMap::new();
    let mut notes: HashMap<String, usize> = HashMap::new();
    let dump = std::env::var_os("CRASHSIM_DUMP").map(std::path::PathBuf::from);
    let mut actual = Vec::new();
    let mut file = Vec::new();
    let mut seen: HashSet<(u64, Vec<(usize, usize)>)> = HashSet::new();
    let mut kinds: HashMap<String, (usize, String)> = HashMap::new();
    let mut checker_runs = 0;
    let mut phases = [0f64; 4];
    for st in &states {
        let cnt = counts.entry(st.family).or_default();
        cnt.generated += 1;
        let t0 = Instant::now();
        builder.build(st, &mut file);
        let h = hash(&file);
        let points = crash_points(rec, st);
        // Points with the same acknowledged flush and candidate count are one check.
        let key: Vec<(usize, usize)> = points
            .iter()
            .map(|&c| {
                (
                    rec.flushes.iter().filter(|f| f.op_end <= c).count(),
                    rec.writes.partition_point(|w| w.op_start < c),
                )
            })
            .collect();
        if !seen.insert((h, key)) {
            continue;
        }
        cnt.checked += 1;
        let shared = Arc::new(std::mem::take(&mut file));
        let t1 = Instant::now();
        phases[0] += (t1 - t0).as_secs_f64();
        let result = read_only(&rec.path, &shared, &mut actual).and_then(|()| {
            let t2 = Instant::now();
            phases[1] += (t2 - t1).as_secs_f64();
            let note = structure
                .entry(h)
                .or_insert_with(|| {
                    checker_runs += 1;
                    writable_and_structural(rec.fmt, &rec.path, &shared, dir.path())
                })
                .clone()?;
            if !note.is_empty() {
                *notes.entry(kind(&note)).or_default() += 1;
            }
            let t3 = Instant::now();
            phases[2] += (t3 - t2).as_secs_f64();
            let r = points
                .iter()
                .try_for_each(|&c| check_content(rec, &mut shadows, &actual, c));
            phases[3] += t3.elapsed().as_secs_f64();
            r
        });
        // Every disk on it is gone: the buffer comes back for the next state.
        file = Arc::try_unwrap(shared).unwrap_or_default();
        if let Err(e) = result {
            cnt.failed += 1;
            let k = kinds
                .entry(kind(&e))
                .or_insert_with(|| (0, format!("{e}\n    state: {}", states::describe(rec, st))));
            k.0 += 1;
            if let Some(d) = &dump {
                let name: String = rec
                    .name
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .collect();
                let path = d.join(format!("{name}-{}.{}", cnt.failed, rec.fmt.ext()));
                std::fs::create_dir_all(d).unwrap();
                std::fs::write(&path, &file).unwrap();
            }
        }
    }
    let sorted = |m: HashMap<String, usize>| {
        let mut v: Vec<(String, usize)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    };
    Report {
        name: rec.name.clone(),
        families: FAMILIES
            .iter()
            .map(|f| (*f, counts.get(f).copied().unwrap_or_default()))
            .collect(),
        kinds: {
            let mut v: Vec<(String, usize, String)> =
                kinds.into_iter().map(|(k, (n, f))| (k, n, f)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        },
        notes: sorted(notes),
        checker_runs,
        ops: rec.ops.len(),
        syncs: rec
            .ops
            .iter()
            .filter(|o| matches!(o, super::Op::Sync))
            .count(),
        seconds: t.elapsed().as_secs_f64(),
        phases,
    }
}

/// The crash points a state must be judged at: its earliest, and each later
/// one in its window where another flush has completed (the acknowledged
/// content changes there; between such points later ones only allow more).
fn crash_points(rec: &Recording, st: &CrashState) -> Vec<usize> {
    let mut v = vec![st.c_min];
    v.extend(
        rec.flushes
            .iter()
            .map(|f| f.op_end)
            .filter(|&e| e > st.c_min && e <= st.c_max),
    );
    v.dedup();
    v
}

/// (a), read-only: the image opens and its whole virtual disk reads (into `actual`).
fn read_only(path: &Path, file: &Arc<Vec<u8>>, actual: &mut Vec<u8>) -> Result<(), String> {
    let disk = super::open_shared(path, file.clone(), false)
        .map_err(|e| format!("does not open read-only: {e}"))?;
    super::read_disk_into(&disk, actual).map_err(|e| format!("read after open: {e}"))
}

/// (a), writable (writes go to an overlay, not the state), then (b).
fn writable_and_structural(
    fmt: Fmt,
    path: &Path,
    file: &Arc<Vec<u8>>,
    dir: &Path,
) -> Result<String, String> {
    super::open_shared(path, file.clone(), true)
        .map_err(|e| format!("does not open writable: {e}"))?;
    structural(fmt, file, dir)
}
