//! Crash consistency through the library: a python writer under LD_PRELOAD
//! does random pwrites with periodic fsyncs on an image, logging to a side
//! file each write before it starts (`B seq off len`), when it completed
//! (`W seq`) and each fsync that returned (`S seq`). It is killed with
//! SIGKILL at a random moment; then
//!
//! * the image must pass its checker: `qemu-img check` for VDI, and for
//!   VHDX `qemu-img check -r all` on a copy (a crash may leave a log to
//!   replay; replaying is qemu's job there, and corruptions must be 0;
//!   leaks are acceptable); for VHD the suite's structural checker
//!   (`vdisk/tests/vhd_util`: footer at the end valid, BAT entries inside
//!   the file, no overlaps);
//! * the virtual disk, as qemu-img reads it and as vdisk reads the
//!   original (unreplayed) file, must hold every write that completed before
//!   the last successful fsync (bytes that a later or unfinished write
//!   touched may hold either content);
//! * the next trial's writer opens the crashed image (the library replays
//!   a VHDX log itself), so the trials accumulate.
//!
//! Completed writes after the last fsync are checked too, but only reported:
//! after SIGKILL the kernel keeps the page cache, so a difference there
//! means the library kept written data or metadata in memory.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const TRIALS: usize = 25;

const WRITER: &str = r#"
import os, sys, random
img, logp, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = random.Random(seed)
PAT = bytes(((j * 7 + (j >> 8)) & 255) for j in range(300000))
fd = os.open(img, os.O_RDWR)
size = os.lseek(fd, 0, os.SEEK_END)
lg = os.open(logp, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
seq = int(sys.argv[4])
print('ready', flush=True)
next_sync = r.randrange(3, 15)
while True:
    seq += 1
    n = r.choice([512, 4096, 65536, r.randrange(1, 70000), r.randrange(1, 2000)])
    off = r.randrange(0, size - n + 1)
    if r.random() < 0.6:
        off &= ~511
    k = (seq * 131) % 200000
    t = bytes((b ^ (seq & 255)) for b in range(256))
    data = PAT[k:k + n].translate(t)
    os.write(lg, b'B %d %d %d\n' % (seq, off, n))
    assert os.pwrite(fd, data, off) == n
    os.write(lg, b'W %d\n' % seq)
    next_sync -= 1
    if next_sync == 0:
        os.fsync(fd)
        os.write(lg, b'S %d\n' % seq)
        next_sync = r.randrange(3, 15)
"#;

/// The bytes the writer writes for `seq`.
fn data(seq: u64, n: usize) -> Vec<u8> {
    let k = ((seq * 131) % 200_000) as usize;
    (0..n)
        .map(|i| {
            let j = k + i;
            ((j * 7 + (j >> 8)) as u8) ^ (seq as u8)
        })
        .collect()
}

#[derive(Debug)]
enum Ev {
    Begin { seq: u64, off: usize, len: usize },
    Done(u64),
    Synced,
}

fn parse_log(text: &str) -> Vec<Ev> {
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["B", s, o, n] => v.push(Ev::Begin {
                seq: s.parse().unwrap(),
                off: o.parse().unwrap(),
                len: n.parse().unwrap(),
            }),
            ["W", s] => v.push(Ev::Done(s.parse().unwrap())),
            ["S", _] => v.push(Ev::Synced),
            _ => {} // a line cut by the kill
        }
    }
    v
}

struct Outcome {
    /// Bytes that must hold a synced write but do not.
    lost_synced: usize,
    /// Bytes of completed, unsynced writes that do not read back (informational).
    lost_unsynced: usize,
    writes: usize,
    syncs: usize,
}

/// Compares `actual` with `before` plus the logged writes.
fn verify(before: &[u8], actual: &[u8], log: &[Ev]) -> Outcome {
    let last_sync = log.iter().rposition(|e| matches!(e, Ev::Synced));
    let mut certain = before.to_vec();
    let mut full = before.to_vec();
    let mut unknown = vec![false; before.len()];
    let mut inflight: Option<(u64, usize, usize)> = None;
    let mut writes = 0;
    for (i, e) in log.iter().enumerate() {
        let synced_part = last_sync.is_some_and(|s| i < s);
        match *e {
            Ev::Begin { seq, off, len } => {
                inflight = Some((seq, off, len));
                if !synced_part {
                    unknown[off..off + len].fill(true);
                }
            }
            Ev::Done(seq) => {
                let (s, off, len) = inflight.take().expect("W without B");
                assert_eq!(s, seq);
                let d = data(seq, len);
                full[off..off + len].copy_from_slice(&d);
                if synced_part {
                    certain[off..off + len].copy_from_slice(&d);
                }
                writes += 1;
            }
            Ev::Synced => {}
        }
    }
    let mut lost_synced = 0;
    let mut lost_unsynced = 0;
    let pending = inflight.map(|(_, o, l)| o..o + l);
    for i in 0..before.len() {
        if !unknown[i] && actual[i] != certain[i] {
            lost_synced += 1;
        }
        if !pending.as_ref().is_some_and(|r| r.contains(&i)) && actual[i] != full[i] {
            lost_unsynced += 1;
        }
    }
    Outcome {
        lost_synced,
        lost_unsynced,
        writes,
        syncs: log.iter().filter(|e| matches!(e, Ev::Synced)).count(),
    }
}

fn check_image(dir: &Path, img: &Path, fmt: &str) -> Result<Vec<u8>, String> {
    let reader = match fmt {
        "vpc" => {
            vhd_util::check_file(img)?;
            img.to_path_buf()
        }
        "vdi" | "qcow2" => {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-f", fmt, "--output=json", img.to_str().unwrap()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // 0: clean, 3: leaks only.
            if !matches!(out.status.code(), Some(0) | Some(3))
                || !text.contains("\"check-errors\": 0")
                || text.contains("\"corruptions\": ") && !text.contains("\"corruptions\": 0")
            {
                return Err(format!(
                    "qemu-img check: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            img.to_path_buf()
        }
        "vmdk" => {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-f", "vmdk", img.to_str().unwrap()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if !out.status.success() || !text.contains("No errors") {
                return Err(format!("qemu-img check: {text}"));
            }
            img.to_path_buf()
        }
        "vhdx" => {
            let copy = dir.join("check-copy.vhdx");
            std::fs::copy(img, &copy).unwrap();
            let out = std::process::Command::new("qemu-img")
                .args([
                    "check",
                    "-r",
                    "all",
                    "-f",
                    "vhdx",
                    "--output=json",
                    copy.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !matches!(out.status.code(), Some(0) | Some(3))
                || !text.contains("\"check-errors\": 0")
                || text.contains("\"corruptions\": ") && !text.contains("\"corruptions\": 0")
            {
                return Err(format!(
                    "qemu-img check -r all: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            copy
        }
        _ => unreachable!(),
    };
    let qemu = common::qemu_raw(&reader, fmt);
    // vdisk opens the original file read-only (replaying a VHDX log in memory).
    let disk = vdisk::open_disk(
        Box::new((std::fs::File::open(img).unwrap(), false)),
        img,
        vdisk::OpenOptions { writable: false },
        &vdisk::StdParentOpener,
    )
    .map_err(|e| format!("vdisk cannot open the crashed image: {e}"))?;
    let ours = common::read_all(&disk);
    let n = ours.len().min(qemu.len());
    if ours[..n] != qemu[..n] {
        let first = (0..n).find(|&i| ours[i] != qemu[i]).unwrap();
        return Err(format!(
            "vdisk and qemu-img read the crashed image differently (first at {first})"
        ));
    }
    Ok(qemu[..n].to_vec())
}

fn trials(
    fmt: &str,
    name: &str,
    create_opts: &str,
    size: &str,
    seed: u64,
) -> (usize, usize, usize, usize, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = dir.join(name);
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            create_opts,
            img.to_str().unwrap(),
            size,
        ],
    );
    let mut before = common::qemu_raw(&img, fmt);
    let mut rng = common::Rng(seed);
    let mut corruptions = Vec::new();
    let (mut writes, mut syncs, mut lost_unsynced) = (0, 0, 0);
    let mut seq = 0u64;
    for trial in 0..TRIALS {
        let log_path = dir.join(format!("log{trial}.txt"));
        let mut child = preload::command(
            dir,
            "python3",
            &[
                "-c",
                WRITER,
                img.to_str().unwrap(),
                log_path.to_str().unwrap(),
                &(seed + trial as u64).to_string(),
                &seq.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let out = child.wait_with_output().unwrap();
            panic!(
                "{name} trial {trial}: writer did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(30 + rng.next() % 400));
        child.kill().unwrap(); // SIGKILL
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("Error") && !stderr.contains("Traceback"),
            "{name} trial {trial}: writer failed: {stderr}"
        );
        let log = parse_log(&std::fs::read_to_string(&log_path).unwrap_or_default());
        seq += log.iter().filter(|e| matches!(e, Ev::Begin { .. })).count() as u64 + 1;
        match check_image(dir, &img, fmt) {
            Err(e) => {
                corruptions.push(format!("trial {trial}: {e}"));
                break;
            }
            Ok(actual) => {
                let o = verify(&before, &actual, &log);
                writes += o.writes;
                syncs += o.syncs;
                lost_unsynced += o.lost_unsynced;
                if o.lost_synced > 0 {
                    corruptions.push(format!(
                        "trial {trial}: {} bytes of synced writes lost",
                        o.lost_synced
                    ));
                }
                before = actual;
            }
        }
    }
    assert!(corruptions.is_empty(), "{name}: {}", corruptions.join("\n"));
    (TRIALS, corruptions.len(), writes, syncs, lost_unsynced)
}

#[test]
fn kill_9_during_writes() {
    let t = Instant::now();
    let mut report = Vec::new();
    for (i, (fmt, name, opts, size)) in [
        ("vpc", "c.vhd", "subformat=dynamic,force_size=on", "16M"),
        ("vhdx", "c.vhdx", "block_size=1M,log_size=1M", "16M"),
        ("vdi", "c.vdi", "static=off", "16M"),
    ]
    .into_iter()
    .enumerate()
    {
        let (n, bad, writes, syncs, lost) = trials(fmt, name, opts, size, 1000 * (i as u64 + 1));
        report.push(format!(
            "{name}: {n} kill -9 trials, {bad} corruptions, {writes} completed writes, {syncs} fsyncs, {lost} bytes of completed unsynced writes not read back"
        ));
    }
    for r in &report {
        println!("{r}");
    }
    println!("({:.1} s)", t.elapsed().as_secs_f64());
}

/// VMDK (issue 20): grains at the end of the file, their table entries
/// (both copies) written after a barrier. (Flat extents are written in
/// place: nothing to order.)
#[test]
fn kill_9_during_vmdk_writes() {
    let (n, bad, writes, syncs, lost) =
        trials("vmdk", "c.vmdk", "subformat=monolithicSparse", "16M", 5000);
    println!(
        "c.vmdk: {n} kill -9 trials, {bad} corruptions, {writes} completed writes, {syncs} fsyncs, {lost} bytes of completed unsynced writes not read back"
    );
}

/// qcow2 with 4 KiB clusters: many L2 tables and refcount blocks.
#[test]
fn kill_9_during_qcow2_writes() {
    for (i, (name, opts)) in [("c.qcow2", "cluster_size=4k")].into_iter().enumerate() {
        let (n, bad, writes, syncs, lost) = trials("qcow2", name, opts, "16M", 7000 + i as u64);
        println!(
            "{name}: {n} kill -9 trials, {bad} corruptions, {writes} completed writes, {syncs} fsyncs, {lost} bytes of completed unsynced writes not read back"
        );
    }
}

/// The model check itself: a synced write that did not land is caught, an
/// unsynced or unfinished one is not held against the image.
#[test]
fn verify_catches_lost_synced_writes() {
    let before = vec![0u8; 8192];
    let log = parse_log("B 1 0 512\nW 1\nS 1\nB 2 1024 100\nW 2\nB 3 4096 512\n");
    let mut actual = before.clone();
    actual[..512].copy_from_slice(&data(1, 512));
    actual[1024..1124].copy_from_slice(&data(2, 100));
    let o = verify(&before, &actual, &log);
    assert_eq!(
        (o.lost_synced, o.lost_unsynced, o.writes, o.syncs),
        (0, 0, 2, 1)
    );
    // Unsynced write 2 lost, in-flight write 3 half done: allowed.
    let mut partial = before.clone();
    partial[..512].copy_from_slice(&data(1, 512));
    partial[4096..4352].copy_from_slice(&data(3, 256));
    let o = verify(&before, &partial, &log);
    let nz = |d: Vec<u8>| d.iter().filter(|&&b| b != 0).count();
    assert_eq!((o.lost_synced, o.lost_unsynced), (0, nz(data(2, 100))));
    // Synced write 1 lost: a corruption.
    let o = verify(&before, &before, &log);
    assert_eq!(o.lost_synced, nz(data(1, 512)));
}
