//! Disk::map_allocation: the allocation through a parent chain.

use std::fs::{File, OpenOptions};
use std::path::Path;

use vdisk::{Allocation, CreateOptions, Disk, Format, StdParentOpener};

const MIB: u64 = 1 << 20;

fn new_file(path: &Path) -> (File, bool) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    (f, true)
}

fn open(path: &Path, writable: bool) -> Disk {
    let f = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap();
    vdisk::open_disk(
        Box::new((f, writable)),
        path,
        vdisk::OpenOptions { writable },
        &StdParentOpener,
    )
    .unwrap()
}

/// The data runs of the whole disk, adjacent ones merged.
fn data_runs(disk: &Disk) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < disk.size() {
        let (kind, n) = disk.map_allocation(pos, disk.size() - pos).unwrap();
        assert!(n > 0 && n <= disk.size() - pos);
        if kind == Allocation::Data {
            match runs.last_mut() {
                Some(r) if r.1 == pos => r.1 = pos + n,
                _ => runs.push((pos, pos + n)),
            }
        }
        pos += n;
    }
    runs
}

#[test]
fn chain_allocation() {
    for format in [Format::Vhd, Format::Vhdx, Format::Vdi] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(format!("base.{format}"));
        let child = dir.path().join(format!("child.{format}"));
        let mut opts = CreateOptions::new(format, 16 * MIB);
        opts.block_size = Some(MIB as u32);
        vdisk::create(&new_file(&base), opts).unwrap();
        let disk = open(&base, true);
        disk.write_at(&vec![1; MIB as usize], 2 * MIB).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let parent = (File::open(&base).unwrap(), false);
        vdisk::snapshot(&base, &parent, &new_file(&child), &child).unwrap();
        let disk = open(&child, true);
        assert_eq!(
            data_runs(&disk),
            [(2 * MIB, 3 * MIB)],
            "{format}: new child"
        );
        disk.write_at(&vec![2; MIB as usize], 5 * MIB).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let disk = open(&child, false);
        // The parent's block shows through; the child's block is its own.
        assert_eq!(
            data_runs(&disk),
            [(2 * MIB, 3 * MIB), (5 * MIB, 6 * MIB)],
            "{format}"
        );
        assert!(disk.map_allocation(0, 0).is_err());
        assert!(disk.map_allocation(16 * MIB - 1, 2).is_err());
    }
}
