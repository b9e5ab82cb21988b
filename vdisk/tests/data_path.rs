//! The data path: runs that continue each other in the container file are
//! read with one call; overwrites of allocated data from several threads at
//! once (the shared write path) next to allocating and partial-sector writes
//! (the exclusive one) leave exactly the bytes written, as qemu-img reads them.

mod common;
mod vhd_util;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Rng, qemu_image_from, qemu_raw};
use vdisk::{OpenOptions, StdParentOpener, Storage, open_disk};

const MIB: usize = 1 << 20;

/// A read-only file that counts the reads made on it.
struct CountingFile {
    file: File,
    reads: AtomicUsize,
}

impl Storage for CountingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        false
    }
}

/// Reads `len` bytes at `offset` of `img` and returns them with the number of
/// reads the container saw for that call alone.
fn read_counted(img: &Path, offset: usize, len: usize) -> (Vec<u8>, usize) {
    let storage: &'static CountingFile = Box::leak(Box::new(CountingFile {
        file: File::open(img).unwrap(),
        reads: AtomicUsize::new(0),
    }));
    let disk = open_disk(
        Box::new(Shared(storage)),
        img,
        OpenOptions { writable: false },
        &StdParentOpener,
    )
    .unwrap();
    let mut buf = vec![0u8; len];
    storage.reads.store(0, Ordering::Relaxed);
    disk.read_at(&mut buf, offset as u64).unwrap();
    (buf, storage.reads.load(Ordering::Relaxed))
}

/// Lets the test keep a handle on the storage the disk owns.
struct Shared(&'static CountingFile);

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn is_writable(&self) -> bool {
        false
    }
}

fn random_data(len: usize) -> Vec<u8> {
    let mut rng = Rng(0x5EED);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// qemu-img converts in order, so blocks 1..=4 follow each other in the file:
/// a 4 MiB read across them (1 MiB blocks) is one read, and a read that
/// starts and ends inside blocks is one read too.
#[test]
fn blocks_in_file_order_are_read_with_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_data(8 * MIB);
    for (name, fmt, opts) in [
        ("d.vdi", "vdi", ""),
        ("d.vhdx", "vhdx", "subformat=dynamic,block_size=1M"),
    ] {
        let img = qemu_image_from(&data, dir.path(), name, fmt, opts);
        let (got, reads) = read_counted(&img, MIB, 4 * MIB);
        assert!(got == data[MIB..5 * MIB], "{name}: data differs");
        assert_eq!(reads, 1, "{name}: 4 contiguous blocks took {reads} reads");
        let (got, reads) = read_counted(&img, MIB / 2 + 512, 3 * MIB);
        assert!(
            got == data[MIB / 2 + 512..MIB / 2 + 512 + 3 * MIB],
            "{name}: data differs"
        );
        assert_eq!(reads, 1, "{name}: unaligned read took {reads} reads");
        assert!(qemu_raw(&img, fmt) == data, "{name}: qemu-img disagrees");
    }
}

/// Runs interrupted by a hole or by a block elsewhere in the file are not
/// merged across the gap.
#[test]
fn runs_stop_at_holes() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = random_data(8 * MIB);
    data[2 * MIB..3 * MIB].fill(0); // qemu-img leaves an all-zero block unallocated
    let img = qemu_image_from(&data, dir.path(), "h.vdi", "vdi", "");
    let (got, reads) = read_counted(&img, 0, 8 * MIB);
    assert!(got == data, "data differs");
    assert_eq!(
        reads, 2,
        "blocks 0-1 and 3-7 are two runs; got {reads} reads"
    );
}

/// Four threads: two overwrite allocated 4 KiB pieces (in place, together),
/// one writes 100-byte pieces at odd offsets (read-modify-write of sectors),
/// one writes into the last 4 MiB, which start unallocated (allocation; the
/// others write there too). Each owns every fourth 64 KiB stripe, so blocks
/// are shared and the result is known exactly.
#[test]
fn concurrent_overwrites_next_to_allocating_and_partial_writes() {
    const STRIPE: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let mut data = random_data(size);
    data[12 * MIB..].fill(0); // left unallocated by qemu-img
    for (name, fmt, opts) in [
        ("c.vhd", "vpc", "subformat=dynamic,force_size=on"),
        ("c.vhdx", "vhdx", "subformat=dynamic,block_size=1M"),
        ("c.vdi", "vdi", ""),
    ] {
        let img = qemu_image_from(&data, dir.path(), name, fmt, opts);
        let disk = Arc::new(common::open(&img, true).unwrap());
        // A first write opens the write session (the exclusive path).
        disk.write_at(&data[..512], 0).unwrap();
        let mut expect = data.clone();
        let mut plans: Vec<Vec<(usize, Vec<u8>)>> = vec![Vec::new(); 4];
        let mut rng = Rng(0xC0FFEE);
        for (t, plan) in plans.iter_mut().enumerate() {
            for _ in 0..400 {
                let stripe = (rng.next() as usize % (size / STRIPE / 4)) * 4 + t;
                let base = stripe * STRIPE;
                let (at, len) = match t {
                    0 | 1 => (base + (rng.next() as usize % (STRIPE / 4096)) * 4096, 4096),
                    2 => (base + 1 + rng.next() as usize % (STRIPE - 200), 100),
                    _ => (
                        12 * MIB + (base % (4 * MIB)) + (rng.next() as usize % 16) * 4096,
                        4096,
                    ),
                };
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                plan.push((at, bytes));
            }
        }
        // Stripes are disjoint, so the order between threads does not matter.
        for plan in &plans {
            for (at, bytes) in plan {
                expect[*at..*at + bytes.len()].copy_from_slice(bytes);
            }
        }
        std::thread::scope(|s| {
            for plan in &plans {
                let disk = disk.clone();
                s.spawn(move || {
                    for (at, bytes) in plan {
                        disk.write_at(bytes, *at as u64).unwrap();
                    }
                });
            }
        });
        disk.flush().unwrap();
        let mut got = vec![0u8; size];
        disk.read_at(&mut got, 0).unwrap();
        drop(disk);
        assert!(
            got == expect,
            "{name}: vdisk reads other bytes than were written"
        );
        assert!(
            qemu_raw(&img, fmt) == expect,
            "{name}: qemu-img reads other bytes"
        );
        if fmt == "vpc" {
            // qemu-img cannot check VHDs: the spec-based checker of these tests.
            vhd_util::check_file(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            common::run("qemu-img", &["check", "-f", fmt, img.to_str().unwrap()]);
        }
    }
}
