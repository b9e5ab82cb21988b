//! MBR partition tables: four primary entries in sector 0, logical partitions in
//! a chain of EBRs inside the extended partition. See the module docs of
//! [`crate::part`] for the numbering rules.

use std::collections::HashSet;

use super::{Geo, MAX_EMPTY_LINKS, MAX_PARTITIONS, Partition, PartitionKind};
use crate::bytes::le32;
use crate::{Disk, Result};

/// Offset of the first of the four 16-byte entries.
pub const TABLE_OFFSET: usize = 0x1BE;
/// Type of the protective (or hybrid) MBR entry of a GPT disk.
pub const GPT_PROTECTIVE: u8 = 0xEE;

/// One 16-byte table entry (CHS fields are ignored, as Linux ignores them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// 0x80 active, 0 inactive; anything else means "not a partition table".
    pub boot: u8,
    pub kind: u8,
    /// First sector: absolute for primaries, relative for EBR entries.
    pub start: u32,
    pub sectors: u32,
}

/// Extended partition types: DOS (0x05), Windows LBA (0x0F), Linux (0x85).
pub fn is_extended_type(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// Whether the sector ends in the `55 AA` boot signature.
pub fn has_signature(sector: &[u8]) -> bool {
    sector.len() >= 512 && sector[510] == 0x55 && sector[511] == 0xAA
}

/// The four entries of an MBR or EBR sector (at least 512 bytes).
pub fn entries(sector: &[u8]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let o = TABLE_OFFSET + 16 * i;
        Entry {
            boot: sector[o],
            kind: sector[o + 4],
            start: le32(sector, o + 8),
            sectors: le32(sector, o + 12),
        }
    })
}

/// Primaries and logical partitions of an MBR disk whose sector 0 holds `primary`.
pub(crate) fn partitions(disk: &Disk, geo: &Geo, primary: &[Entry; 4]) -> Result<Vec<Partition>> {
    if let Some(e) = primary.iter().find(|e| e.boot != 0 && e.boot != 0x80) {
        log::debug!(
            "MBR boot indicator {:#04x}: not a partition table (as in Linux)",
            e.boot
        );
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let mut next = 5u32;
    for (slot, e) in primary.iter().enumerate() {
        if e.sectors == 0 {
            continue;
        }
        let number = slot as u32 + 1;
        if let Some(p) = geo.partition(
            number,
            e.start as u64,
            e.sectors as u64,
            true,
            PartitionKind::Mbr(e.kind),
        ) {
            parts.push(p);
        }
        if is_extended_type(e.kind) {
            logicals(
                disk,
                geo,
                e.start as u64,
                e.sectors as u64,
                &mut next,
                &mut parts,
            )?;
        }
    }
    Ok(parts)
}

/// Follows the EBR chain of the extended partition at `first` (`first_size`
/// sectors), numbering logical partitions from `*next`.
fn logicals(
    disk: &Disk,
    geo: &Geo,
    first: u64,
    first_size: u64,
    next: &mut u32,
    parts: &mut Vec<Partition>,
) -> Result<()> {
    let first_end = first + first_size; // both < 2^32: no overflow
    let (mut this, mut this_size) = (first, first_size);
    let mut visited = HashSet::new();
    let mut empty_links = 0u32;
    loop {
        empty_links += 1;
        if empty_links > MAX_EMPTY_LINKS {
            log::warn!("EBR chain: {MAX_EMPTY_LINKS} links without a partition; stopped");
            return Ok(());
        }
        if *next > MAX_PARTITIONS {
            return Ok(());
        }
        if !visited.insert(this) {
            log::warn!("EBR chain loops back to sector {this}; stopped");
            return Ok(());
        }
        let Some(sector) = geo.read(disk, this, 1)? else {
            log::warn!("EBR at sector {this} is beyond the end of the disk; chain stopped");
            return Ok(());
        };
        if !has_signature(&sector) {
            return Ok(());
        }
        let ebr = entries(&sector);
        for (i, e) in ebr.iter().enumerate() {
            if e.sectors == 0 || is_extended_type(e.kind) {
                continue;
            }
            let (offs, size) = (e.start as u64, e.sectors as u64);
            let start = this + offs; // this < 2^33: no overflow
            // Entries 3 and 4 often hold garbage: only take them inside the extended partition.
            if i >= 2 && (offs + size > this_size || start < first || start + size > first_end) {
                continue;
            }
            if let Some(p) = geo.partition(*next, start, size, true, PartitionKind::Mbr(e.kind)) {
                parts.push(p);
            }
            empty_links = 0;
            *next += 1;
            if *next > MAX_PARTITIONS {
                return Ok(());
            }
        }
        let Some(link) = ebr
            .iter()
            .find(|e| e.sectors != 0 && is_extended_type(e.kind))
        else {
            return Ok(());
        };
        this = first + link.start as u64;
        this_size = link.sectors as u64;
    }
}

/// A short name for common MBR type bytes (fdisk's names), for listings.
pub fn mbr_type_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        0x01 => "FAT12",
        0x04 => "FAT16 <32M",
        0x05 => "Extended",
        0x06 => "FAT16",
        0x07 => "HPFS/NTFS/exFAT",
        0x0b => "W95 FAT32",
        0x0c => "W95 FAT32 (LBA)",
        0x0e => "W95 FAT16 (LBA)",
        0x0f => "W95 Ext'd (LBA)",
        0x11 => "Hidden FAT12",
        0x14 => "Hidden FAT16 <32M",
        0x16 => "Hidden FAT16",
        0x17 => "Hidden HPFS/NTFS",
        0x1b => "Hidden W95 FAT32",
        0x1c => "Hidden W95 FAT32 (LBA)",
        0x1e => "Hidden W95 FAT16 (LBA)",
        0x27 => "Hidden NTFS WinRE",
        0x42 => "SFS",
        0x82 => "Linux swap / Solaris",
        0x83 => "Linux",
        0x85 => "Linux extended",
        0x86 | 0x87 => "NTFS volume set",
        0x8e => "Linux LVM",
        0xa5 => "FreeBSD",
        0xa6 => "OpenBSD",
        0xa9 => "NetBSD",
        0xaf => "HFS / HFS+",
        0xee => "GPT",
        0xef => "EFI (FAT-12/16/32)",
        0xfd => "Linux raid autodetect",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testdisk::{disk, put_entry};
    use super::super::{partition, partitions};
    use super::*;

    const MB: usize = 1 << 20;

    fn summary(d: &Disk) -> Vec<(u32, u64, u64, u8)> {
        partitions(d)
            .unwrap()
            .into_iter()
            .map(|p| match p.kind {
                PartitionKind::Mbr(t) => (p.number, p.start_sector(), p.sectors(), t),
                _ => panic!("not MBR"),
            })
            .collect()
    }

    #[test]
    fn primaries_keep_slots() {
        let mut d = vec![0u8; 4 * MB];
        put_entry(&mut d, 0, 0, 0x80, 0x83, 2048, 100);
        put_entry(&mut d, 0, 2, 0, 0x07, 4096, 200);
        put_entry(&mut d, 0, 3, 0, 0x00, 6000, 0); // unused
        let d = disk(d, 512);
        assert_eq!(
            summary(&d),
            vec![(1, 2048, 100, 0x83), (3, 4096, 200, 0x07)]
        );
        let p = partition(&d, 3).unwrap().unwrap();
        assert_eq!((p.start, p.size), (4096 * 512, 200 * 512));
        assert_eq!(partition(&d, 2).unwrap(), None);
        assert_eq!(partition(&d, 0).unwrap(), None);
        assert_eq!(partition(&d, 1000).unwrap(), None);
    }

    #[test]
    fn bad_boot_indicator_is_no_table() {
        let mut d = vec![0u8; MB];
        put_entry(&mut d, 0, 0, 0x80, 0x83, 2048, 100);
        put_entry(&mut d, 0, 1, 0x12, 0x83, 4096, 100);
        assert!(summary(&disk(d, 512)).is_empty());
    }

    /// Extended partition at 1000 (sectors 1000..5000) with three logicals.
    fn logical_disk() -> Vec<u8> {
        let mut d = vec![0u8; 4 * MB];
        put_entry(&mut d, 0, 0, 0, 0x83, 100, 800);
        put_entry(&mut d, 0, 1, 0, 0x0F, 1000, 4000);
        // EBR 1 at 1000: data at +10, link to 2000 (relative to the extended start).
        put_entry(&mut d, 1000 * 512, 0, 0, 0x83, 10, 500);
        put_entry(&mut d, 1000 * 512, 1, 0, 0x05, 1000, 1000);
        // EBR 2 at 2000: data at +2 (2002), link to 3500.
        put_entry(&mut d, 2000 * 512, 0, 0, 0x82, 2, 900);
        put_entry(&mut d, 2000 * 512, 1, 0, 0x05, 2500, 1500);
        // EBR 3 at 3500: data only.
        put_entry(&mut d, 3500 * 512, 0, 0, 0x8e, 100, 1400);
        d
    }

    #[test]
    fn logical_chain() {
        let d = disk(logical_disk(), 512);
        assert_eq!(
            summary(&d),
            vec![
                (1, 100, 800, 0x83),
                (2, 1000, 4000, 0x0F),
                (5, 1010, 500, 0x83),
                (6, 2002, 900, 0x82),
                (7, 3600, 1400, 0x8e)
            ]
        );
        let ext = partition(&d, 2).unwrap().unwrap();
        assert!(ext.is_extended());
        assert_eq!(ext.device_size(), 1024);
        assert!(!partition(&d, 5).unwrap().unwrap().is_extended());
    }

    #[test]
    fn ebr_loop_stops() {
        let mut d = logical_disk();
        // EBR 3 links back to EBR 1.
        put_entry(&mut d, 3500 * 512, 1, 0, 0x05, 0, 1000);
        let got = summary(&disk(d.clone(), 512));
        assert_eq!(got.len(), 5);
        assert_eq!(got[4], (7, 3600, 1400, 0x8e));
        // An EBR linking to itself, without data.
        put_entry(&mut d, 1000 * 512, 0, 0, 0, 0, 0);
        put_entry(&mut d, 1000 * 512, 1, 0, 0x05, 0, 1000);
        assert_eq!(summary(&disk(d, 512)).len(), 2);
    }

    #[test]
    fn empty_links_give_up() {
        // A chain of 150 EBRs without data, then one with data: Linux gives up after 100.
        let mut d = vec![0u8; 4 * MB];
        put_entry(&mut d, 0, 0, 0, 0x05, 10, 7000);
        for k in 0..150u32 {
            put_entry(
                &mut d,
                (10 + k as usize * 2) * 512,
                1,
                0,
                0x05,
                (k + 1) * 2,
                2,
            );
        }
        put_entry(&mut d, (10 + 150 * 2) * 512, 0, 0, 0x83, 1, 10);
        assert_eq!(summary(&disk(d, 512)), vec![(1, 10, 7000, 0x05)]);
    }

    #[test]
    fn entries_three_and_four_must_fit() {
        let mut d = logical_disk();
        // Garbage in entry 3 of EBR 3 (outside the extended partition), valid entry 4.
        put_entry(&mut d, 3500 * 512, 2, 0, 0x83, 7000, 10);
        put_entry(&mut d, 3500 * 512, 3, 0, 0x83, 1450, 10);
        let got = summary(&disk(d, 512));
        assert_eq!(got[5..], [(8, 4950, 10, 0x83)]);
    }

    #[test]
    fn beyond_the_disk() {
        let mut d = vec![0u8; MB]; // 2048 sectors
        put_entry(&mut d, 0, 0, 0, 0x83, 2048, 10); // starts at the end: skipped
        put_entry(&mut d, 0, 1, 0, 0x83, 2000, 100); // clipped to 48
        put_entry(&mut d, 0, 2, 0, 0x83, u32::MAX, u32::MAX); // skipped
        put_entry(&mut d, 0, 3, 0, 0x05, 1000, u32::MAX); // extended, clipped; EBR at 1000 empty
        assert_eq!(
            summary(&disk(d, 512)),
            vec![(2, 2000, 48, 0x83), (4, 1000, 1048, 0x05)]
        );
    }

    #[test]
    fn overflowing_logicals() {
        let mut d = vec![0u8; MB];
        put_entry(&mut d, 0, 0, 0, 0x05, 100, u32::MAX);
        put_entry(&mut d, 100 * 512, 0, 0, 0x83, u32::MAX, u32::MAX); // beyond: number 5 is a gap
        put_entry(&mut d, 100 * 512, 1, 0, 0x05, u32::MAX, u32::MAX); // link beyond the disk
        assert_eq!(summary(&disk(d, 512)), vec![(1, 100, 1948, 0x05)]);
    }

    #[test]
    fn four_k_sectors() {
        let mut d = vec![0u8; 4 * MB]; // 1024 sectors of 4096
        put_entry(&mut d, 0, 0, 0, 0x83, 256, 256);
        put_entry(&mut d, 0, 1, 0, 0x05, 512, 512);
        put_entry(&mut d, 512 * 4096, 0, 0, 0x83, 1, 100);
        let d = disk(d, 4096);
        assert_eq!(
            summary(&d),
            vec![
                (1, 256, 256, 0x83),
                (2, 512, 512, 0x05),
                (5, 513, 100, 0x83)
            ]
        );
        let p = partition(&d, 5).unwrap().unwrap();
        assert_eq!(
            (p.start, p.size, p.sector_size),
            (513 * 4096, 100 * 4096, 4096)
        );
        assert_eq!(partition(&d, 2).unwrap().unwrap().device_size(), 4096);
    }

    #[test]
    fn random_sectors_never_panic() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..300 {
            let mut d = vec![0u8; 64 * 1024];
            for b in d.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = if x.is_multiple_of(5) {
                    (x >> 8) as u8
                } else {
                    0
                };
            }
            // Plausible tables: small LBAs, signature everywhere.
            for s in 0..128 {
                d[s * 512 + 510] = 0x55;
                d[s * 512 + 511] = 0xAA;
                d[s * 512 + 446] = 0;
                d[s * 512 + 446 + 4] = [0x05, 0x83, 0x0f, 0][(x as usize >> (s % 60)) % 4];
                d[s * 512 + 446 + 9] = 0;
                d[s * 512 + 446 + 10] = 0;
                d[s * 512 + 446 + 11] = 0;
            }
            let _ = partitions(&disk(d, 512));
        }
    }
}
