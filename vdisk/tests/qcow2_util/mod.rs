//! Helpers of the qcow2 tests (`qcow2.rs`, `qcow2_write.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crate::common::{Rng, open, qemu_child, qemu_raw, read_all, run};

pub const MIB: usize = 1 << 20;

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs qemu-io commands (`-c` each) on `img` of format `fmt`.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run("qemu-io", &args);
}

/// Random qemu-io writes: data, zeros (`write -z`), discards, some unaligned.
pub fn scribble(img: &Path, fmt: &str, size: usize, seed: u64, count: usize) {
    let mut rng = Rng(seed | 1);
    let mut cmds = Vec::new();
    for _ in 0..count {
        let len = 512 * (1 + rng.next() as usize % 300);
        let off = (rng.next() as usize % (size - len)) / 512 * 512;
        let pat = rng.next() % 250 + 1;
        cmds.push(match rng.next() % 6 {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {pat} {off} {len}"),
        });
    }
    qemu_io(img, fmt, &cmds);
}

pub fn assert_reads_like_qemu(img: &Path, what: &str) {
    let want = qemu_raw(img, "qcow2");
    let disk = open(img, false).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    assert_eq!(disk.size() as usize, want.len(), "{what}: size");
    let got = read_all(&disk);
    assert!(got == want, "{what}: contents differ from qemu-img's");
}

pub fn qemu_check(img: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(img)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        img.display()
    );
}

/// Random unaligned writes through vdisk, mirrored in `model`; flushes now
/// and then.
pub fn random_writes(disk: &vdisk::Disk, model: &mut [u8], seed: u64, count: usize) {
    let mut rng = Rng(seed | 1);
    let size = model.len();
    for k in 0..count {
        let len = match rng.next() % 4 {
            0 => 1 + rng.next() as usize % 700,
            1 => 1 + rng.next() as usize % 70_000,
            2 => 4096,
            _ => 1 + rng.next() as usize % 300_000,
        }
        .min(size);
        let off = rng.next() as usize % (size - len + 1);
        let zero = rng.next().is_multiple_of(5);
        let data: Vec<u8> = (0..len)
            .map(|i| {
                if zero {
                    0
                } else {
                    (rng.next() as u8) | (i as u8 & 1)
                }
            })
            .collect();
        disk.write_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
        if k % 17 == 16 {
            disk.flush().unwrap();
        }
    }
}

pub fn write_and_verify(img: &Path, what: &str, seed: u64) {
    let mut model = qemu_raw(img, "qcow2");
    {
        let disk = open(img, true).unwrap_or_else(|e| panic!("{what}: open rw: {e}"));
        random_writes(&disk, &mut model, seed, 60);
        assert!(
            read_all(&disk) == model,
            "{what}: vdisk reads back differently"
        );
    }
    qemu_check(img);
    assert!(
        qemu_raw(img, "qcow2") == model,
        "{what}: qemu-img reads differently"
    );
    let f = std::fs::File::open(img).unwrap();
    let report = vdisk::qcow2::check::check(&(f, false)).unwrap();
    assert!(
        report.errors.is_empty() && report.leaks == 0,
        "{what}: {report:?}"
    );
}

pub fn digest(p: &Path) -> String {
    crate::common::sha256_hex(&std::fs::read(p).unwrap())
}

/// `qemu-img convert -c`: `raw` compressed into the qcow2 `img` made with
/// the creation options `opts`.
pub fn compressed_copy(raw: &Path, img: &Path, opts: &str) {
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(raw),
            s(img),
        ],
    );
}

/// A qcow2 chain in `d`: `top.qcow2` (extended L2, `top_mib` MiB) over
/// `mid.qcow2` over `base.raw` holding `data`; qemu-io scribbles on mid and
/// then top with the seeds `seeds`. Returns the paths (base, mid, top).
pub fn qcow2_qcow2_raw_chain(
    d: &Path,
    data: &[u8],
    top_mib: usize,
    seeds: (u64, u64),
) -> (PathBuf, PathBuf, PathBuf) {
    let base = d.join("base.raw");
    std::fs::write(&base, data).unwrap();
    let mid = d.join("mid.qcow2");
    qemu_child(&mid, "qcow2", "", "base.raw", "raw", None);
    scribble(&mid, "qcow2", data.len(), seeds.0, 30);
    let top = d.join("top.qcow2");
    let top_size = format!("{top_mib}M");
    qemu_child(
        &top,
        "qcow2",
        "extended_l2=on",
        "mid.qcow2",
        "qcow2",
        Some(&top_size),
    );
    scribble(&top, "qcow2", top_mib * MIB, seeds.1, 30);
    (base, mid, top)
}
