//! Power loss during discards (issue 16): workloads that mix writes,
//! discards (whole blocks, pieces of blocks, zeroing without unmap) and
//! flushes run on the recording storage of `crashsim`; every crash state
//! must open, pass its format's checker (leaks allowed), keep every byte a
//! completed flush acknowledged (acknowledged zeros read as zeros) and show
//! nothing never written there (never a freed block's old data where
//! another block now lives: VDI moves blocks down into freed slots).

#[path = "common/mod.rs"]
mod common;
#[path = "crashsim/mod.rs"]
mod crashsim;
#[path = "vhd_util/mod.rs"]
mod vhd_util;

use crashsim::{Budget, Fmt, Session, fill, oracle, qemu_create};

const MIB: u64 = 1 << 20;
const STATES: usize = 24;

fn base(fmt: Fmt) -> Vec<u8> {
    match fmt {
        Fmt::Vhdx => qemu_create(fmt, "16M", "block_size=1M,log_size=1M"),
        _ => qemu_create(fmt, "16M", ""),
    }
}

fn mixed(fmt: Fmt, seed: u64) {
    mixed_on(
        Session::new(&format!("discard mix {fmt:?}"), fmt, base(fmt)),
        seed,
    );
}

fn mixed_on(mut s: Session, seed: u64) {
    let size = s.size();
    // Most of the disk allocated and durable first.
    for i in 0..size / MIB * 3 / 4 {
        s.write(i * MIB, &fill(i, i * MIB, MIB as usize));
    }
    s.flush();
    let mut rng = common::Rng(seed | 1);
    for seq in 0..40u64 {
        let off = (rng.next() % (size / 512)) * 512;
        let room = size - off;
        match rng.next() % 6 {
            0 | 1 => {
                // Whole blocks (2 MiB covers a whole block of every format).
                let off = off / (2 * MIB) * 2 * MIB;
                let len = (2 * MIB * (1 + rng.next() % 2)).min(size - off);
                s.discard(off, len, true);
            }
            2 => {
                let len = (512 * (1 + rng.next() % 300)).min(room);
                s.discard(off, len, rng.next().is_multiple_of(2));
            }
            3 => s.flush(),
            _ => {
                let len = (512 * (1 + rng.next() % 3000)).min(room) as usize;
                s.write(off, &fill(seq + 100, off, len));
            }
        }
    }
    s.flush();
    let report = oracle::run(&s.finish(), &Budget::from_env(STATES));
    report.assert_clean();
}

#[test]
fn vhd_discard_mix() {
    mixed(Fmt::Vhd, 0x16_0001);
}

#[test]
fn vhdx_discard_mix() {
    mixed(Fmt::Vhdx, 0x16_0002);
}

#[test]
fn vdi_discard_mix() {
    mixed(Fmt::Vdi, 0x16_0003);
}

/// The same mix with holes punched in the container (LIBVHD_IO_PUNCH_HOLES)
/// where data stays in place: on fixed images (every discard) and on
/// dynamic ones (parts of blocks).
#[test]
fn punched_discard_mix() {
    for (fmt, opts, seed) in [
        (Fmt::Vhd, "subformat=fixed", 0x16_0011),
        (Fmt::Vhdx, "subformat=fixed", 0x16_0012),
        (Fmt::Vdi, "static=on", 0x16_0013),
    ] {
        let name = format!("punched fixed {fmt:?}");
        mixed_on(
            Session::new(&name, fmt, qemu_create(fmt, "16M", opts)).punching(),
            seed,
        );
    }
    for (fmt, seed) in [
        (Fmt::Vhd, 0x16_0021),
        (Fmt::Vhdx, 0x16_0022),
        (Fmt::Vdi, 0x16_0023),
    ] {
        let name = format!("punched dynamic {fmt:?}");
        mixed_on(Session::new(&name, fmt, base(fmt)).punching(), seed);
    }
}

/// Compaction (`Image::relocate`, what `vhdio compact` runs) after half the
/// blocks were discarded: every crash state reads the same disk.
fn compact(fmt: Fmt) {
    let mut s = Session::new(&format!("compact {fmt:?}"), fmt, base(fmt));
    let size = s.size();
    for i in 0..size / MIB {
        s.write(i * MIB, &fill(i, i * MIB, MIB as usize));
    }
    s.flush();
    for i in (0..size / MIB).step_by(4) {
        s.discard(i * MIB, 2 * MIB, true);
    }
    s.flush();
    let moved = s.disk.layers()[0].relocate(&mut |_, _| {}).unwrap();
    assert!(moved > 0 || fmt == Fmt::Vdi, "{fmt:?}: nothing moved");
    s.flush();
    let report = oracle::run(&s.finish(), &Budget::from_env(STATES));
    report.assert_clean();
}

#[test]
fn vhd_compact() {
    compact(Fmt::Vhd);
}

#[test]
fn vhdx_compact() {
    compact(Fmt::Vhdx);
}

/// A discard, then new blocks allocated before any flush, then a flush:
/// the new blocks must not take the discarded blocks' space while the old
/// table entries may still be durable (a crash would show their data in the
/// discarded range).
fn discard_then_allocate(fmt: Fmt) {
    let mut s = Session::new(&format!("discard then allocate {fmt:?}"), fmt, base(fmt));
    let size = s.size();
    for i in 0..size / MIB / 2 {
        s.write(i * MIB, &fill(i, i * MIB, MIB as usize));
    }
    s.flush();
    s.discard(0, 4 * MIB, true);
    for i in 0..4 {
        let at = size / 2 + i * 2 * MIB;
        s.write(at, &fill(50 + i, at, 64 << 10));
    }
    s.flush();
    // And again after the flush made the discard durable (reuse allowed).
    s.discard(4 * MIB, 2 * MIB, true);
    s.flush();
    let at = size - 2 * MIB;
    s.write(at, &fill(99, at, 64 << 10));
    s.flush();
    let report = oracle::run(&s.finish(), &Budget::from_env(STATES));
    report.assert_clean();
}

#[test]
fn vhd_discard_then_allocate() {
    discard_then_allocate(Fmt::Vhd);
}

#[test]
fn vhdx_discard_then_allocate() {
    discard_then_allocate(Fmt::Vhdx);
}

#[test]
fn vdi_discard_then_allocate() {
    discard_then_allocate(Fmt::Vdi);
}
