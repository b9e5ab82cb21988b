//! Partition tables made by sfdisk on raw disks, converted by qemu-img into each
//! image format, read through `vdisk::part` and compared with what `sfdisk -d`
//! and `partx --show` (libblkid) report on the raw disk.

mod common;

use std::path::{Path, PathBuf};

use common::{SfdiskPart, partx_show, qemu_image_from, sfdisk_dump, sfdisk_raw};
use vdisk::part::{self, Partition, PartitionKind};
use vdisk::{Disk, Error};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;

/// Primaries in slots 1 and 3 (slot 2 is a gap), the extended partition in
/// slot 4 and three logical partitions.
fn dos_script(raw: &str) -> String {
    format!(
        "label: dos\n\
         {raw}1 : start=2048, size=8192, type=83, bootable\n\
         {raw}3 : start=10240, size=8192, type=7\n\
         {raw}4 : start=20480, size=90112, type=f\n\
         {raw}5 : start=22528, size=8192, type=83\n\
         {raw}6 : start=32768, size=16384, type=82\n\
         {raw}7 : start=51200, size=4095, type=8e\n"
    )
}

/// Entries 1, 2, 3, 5, 7 and 12 (indexes 3, 5, 7-10 unused).
fn gpt_script(raw: &str) -> String {
    format!(
        "label: gpt\n\
         {raw}1 : start=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\"\n\
         {raw}2 : start=4096, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root, with a comma\"\n\
         {raw}3 : start=12288, size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n\
         {raw}5 : start=20480, size=8192, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=\"data\"\n\
         {raw}7 : start=32768, size=16384, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n\
         {raw}12 : start=65536, size=32768, type=21686148-6449-6E6F-744E-656564454649, name=\"last\"\n"
    )
}

/// The formats to check: (qemu-img format, creation options, file extension).
const FORMATS: &[(&str, &str, &str)] = &[
    ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    ("vpc", "subformat=fixed,force_size=on", "fixed.vhd"),
    ("vhdx", "subformat=dynamic", "vhdx"),
    ("vdi", "", "vdi"),
];

/// Marks the first and last sector of each partition in the raw file, so that
/// reading a partition's bytes through the image proves where it lies.
fn mark_partitions(raw: &Path) -> Vec<u8> {
    let mut data = std::fs::read(raw).unwrap();
    for p in sfdisk_dump(raw) {
        for sector in [p.start, p.start + p.size - 1] {
            let off = (sector * 512) as usize;
            if off >= 512 * 2048 && !is_extended_hex(&p.kind) {
                let text = format!("partition {} sector {sector}", p.number);
                data[off..off + text.len()].copy_from_slice(text.as_bytes());
            }
        }
    }
    std::fs::write(raw, &data).unwrap();
    data
}

fn is_extended_hex(kind: &str) -> bool {
    matches!(kind, "5" | "F" | "85")
}

/// Opens `img`; `None` (with a note) if this build does not implement its format yet.
fn open_if_supported(img: &Path) -> Option<Disk> {
    match common::open(img, false) {
        Ok(d) => Some(d),
        Err(Error::Unsupported(why)) => {
            eprintln!("SKIPPED {}: {why}", img.display());
            None
        }
        Err(e) => panic!("{}: {e}", img.display()),
    }
}

/// Checks our list against both oracles and the partition bytes against the raw disk.
fn check(disk: &Disk, raw: &Path, data: &[u8]) {
    let ours = part::partitions(disk).unwrap();
    let want = sfdisk_dump(raw);
    assert!(!want.is_empty());
    let got: Vec<(u32, u64, u64)> = ours
        .iter()
        .map(|p| (p.number, p.start_sector(), p.sectors()))
        .collect();
    let expected: Vec<(u32, u64, u64)> = want.iter().map(|p| (p.number, p.start, p.size)).collect();
    assert_eq!(got, expected, "{} vs sfdisk -d", raw.display());
    assert_eq!(got, partx_show(raw), "{} vs partx --show", raw.display());
    for (p, w) in ours.iter().zip(&want) {
        check_kind(p, w);
        assert_eq!(part::partition(disk, p.number).unwrap().as_ref(), Some(p));
        assert_eq!((p.start, p.size), (w.start * 512, w.size * 512));
        // Head and tail of every partition equal the raw disk's bytes there.
        let n = p.size.min(64 * 1024);
        for off in [p.start, p.end() - n] {
            let mut buf = vec![0u8; n as usize];
            disk.read_at(&mut buf, off).unwrap();
            assert!(
                buf == data[off as usize..(off + n) as usize],
                "partition {} at {off}",
                p.number
            );
        }
    }
    let max = ours.iter().map(|p| p.number).max().unwrap();
    for n in 0..=max + 2 {
        let listed = want.iter().any(|w| w.number == n);
        assert_eq!(
            part::partition(disk, n).unwrap().is_some(),
            listed,
            "partition {n}"
        );
    }
}

fn check_kind(p: &Partition, w: &SfdiskPart) {
    match &p.kind {
        PartitionKind::Mbr(t) => {
            assert_eq!(format!("{t:X}"), w.kind);
            assert_eq!(p.is_extended(), is_extended_hex(&w.kind));
            if p.is_extended() {
                assert_eq!(p.device_size(), 1024);
            } else {
                assert_eq!(p.device_size(), p.size);
            }
        }
        PartitionKind::Gpt { type_guid, name } => {
            assert_eq!(part::guid_to_string(type_guid), w.kind);
            assert_eq!(name, &w.name);
            assert!(part::gpt_type_name(type_guid).is_some(), "{}", w.kind);
            assert!(!p.is_extended());
        }
    }
}

fn each_format(dir: &Path, raw: &Path, data: &[u8]) -> usize {
    let mut checked = 0;
    for (fmt, opts, ext) in FORMATS {
        let name = format!("{}.{ext}", raw.file_stem().unwrap().to_str().unwrap());
        let img = qemu_image_from(data, dir, &name, fmt, opts);
        if let Some(disk) = open_if_supported(&img) {
            assert_eq!(disk.size(), DISK_SIZE, "{}", img.display());
            check(&disk, raw, data);
            checked += 1;
        }
    }
    checked
}

fn make(dir: &Path, name: &str, script: fn(&str) -> String) -> (PathBuf, Vec<u8>) {
    let raw = sfdisk_raw(dir, name, DISK_SIZE, &script(name));
    let data = mark_partitions(&raw);
    (raw, data)
}

#[test]
fn dos_primaries_gap_extended_and_logicals() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = make(dir.path(), "dos.raw", dos_script);
    let numbers: Vec<u32> = sfdisk_dump(&raw).iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 3, 4, 5, 6, 7]);
    assert!(each_format(dir.path(), &raw, &data) >= 2);
}

#[test]
fn gpt_with_gaps_in_the_entry_index() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = make(dir.path(), "gpt.raw", gpt_script);
    let numbers: Vec<u32> = sfdisk_dump(&raw).iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 7, 12]);
    assert!(each_format(dir.path(), &raw, &data) >= 2);
}

#[test]
fn gpt_damaged_primary_uses_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, mut data) = make(dir.path(), "gptb.raw", gpt_script);
    let want: Vec<(u32, u64, u64)> = sfdisk_dump(&raw)
        .iter()
        .map(|p| (p.number, p.start, p.size))
        .collect();
    // Damage the primary entry array (its CRC no longer matches), then the header.
    for damage in [1024 + 40, 512 + 60] {
        data[damage] ^= 0x5A;
        let img = qemu_image_from(
            &data,
            dir.path(),
            "gptb.vhd",
            "vpc",
            "subformat=dynamic,force_size=on",
        );
        let disk = common::open(&img, false).unwrap();
        let got: Vec<(u32, u64, u64)> = part::partitions(&disk)
            .unwrap()
            .iter()
            .map(|p| (p.number, p.start_sector(), p.sectors()))
            .collect();
        assert_eq!(got, want);
        std::fs::write(&raw, &data).unwrap();
        assert_eq!(partx_show(&raw), want, "libblkid also takes the backup");
    }
    // Both copies damaged: an error, not a guess.
    let last = data.len() - 512;
    data[last + 20] ^= 0x5A;
    let img = qemu_image_from(
        &data,
        dir.path(),
        "gptb2.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let disk = common::open(&img, false).unwrap();
    assert!(matches!(
        part::partitions(&disk),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn whole_disk_filesystem_has_no_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 8 * MIB as usize];
    // A FAT-like boot sector: 55 AA, but text where the partition table would be.
    data[0x1BE..0x1FE].copy_from_slice(&[b'x'; 64]);
    data[510] = 0x55;
    data[511] = 0xAA;
    let img = qemu_image_from(
        &data,
        dir.path(),
        "fat.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let disk = common::open(&img, false).unwrap();
    assert!(part::partitions(&disk).unwrap().is_empty());
    assert_eq!(part::partition(&disk, 1).unwrap(), None);
    // An unpartitioned, empty disk.
    let img = qemu_image_from(
        &vec![0u8; MIB as usize],
        dir.path(),
        "empty.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    assert!(
        part::partitions(&common::open(&img, false).unwrap())
            .unwrap()
            .is_empty()
    );
}

/// An in-memory disk with 4096-byte logical sectors (as a 4K VHDX presents
/// itself), to check that LBAs are counted in logical sectors end to end.
mod four_k {
    use vdisk::{Disk, MemStorage, RawImage};

    pub fn disk(data: Vec<u8>) -> Disk {
        let image = RawImage::new(Box::new(MemStorage::read_only(data)), 4096).unwrap();
        Disk::new(vec![Box::new(image)]).unwrap()
    }
}

#[test]
fn four_k_sectors_scale_a_512_byte_table() {
    // sfdisk 2.38 cannot make a 4Kn table in a file; a 512-byte dos table read
    // with 4096-byte sectors must scale every LBA by 8, and logical partitions
    // still chain (the EBRs are found at the scaled LBAs).
    let dir = tempfile::tempdir().unwrap();
    let raw = sfdisk_raw(
        dir.path(),
        "k.raw",
        DISK_SIZE,
        "label: dos\nk.raw1 : start=256, size=1024, type=83\nk.raw2 : start=2048, size=4096, type=5\n",
    );
    let mut data = std::fs::read(&raw).unwrap();
    // Hand-written EBR at 4K LBA 2048 (byte 8 MiB): data at +16, 100 sectors.
    let ebr = 2048 * 4096;
    data[ebr + 446 + 4] = 0x83;
    data[ebr + 446 + 8..ebr + 446 + 12].copy_from_slice(&16u32.to_le_bytes());
    data[ebr + 446 + 12..ebr + 446 + 16].copy_from_slice(&100u32.to_le_bytes());
    data[ebr + 510] = 0x55;
    data[ebr + 511] = 0xAA;
    let disk = four_k::disk(data);
    let got: Vec<(u32, u64, u64, u32)> = part::partitions(&disk)
        .unwrap()
        .iter()
        .map(|p| (p.number, p.start, p.size, p.sector_size))
        .collect();
    assert_eq!(
        got,
        [
            (1, 256 * 4096, 1024 * 4096, 4096),
            (2, 2048 * 4096, 4096 * 4096, 4096),
            (5, 2064 * 4096, 100 * 4096, 4096)
        ]
    );
    assert_eq!(
        part::partition(&disk, 2).unwrap().unwrap().device_size(),
        4096
    );
}
