//! Partition tables: MBR with logical partitions (EBR chains) and GPT, read-only.
//!
//! One parser for the preload library (`disk.vhd3` opens partition 3) and for
//! `vhdpartx`. It reads through [`Disk::read_at`] and counts in the disk's
//! logical sector size (4096 for a 4K VHDX), as Linux does.
//!
//! # Numbering and selection (as the Linux kernel does it)
//!
//! - Sector 0 must end in `55 AA`, else the disk has no partition table.
//! - If a primary entry has type 0xEE starting at LBA 1 (protective or hybrid
//!   MBR), the disk is GPT and nothing else is read. An 0xEE entry elsewhere makes
//!   Linux ignore the disk; so do we (no partitions).
//! - MBR: the table is refused (no partitions) if a boot indicator is neither 0
//!   nor 0x80, like Linux (a FAT boot sector is not a partition table). Primaries
//!   keep their slot numbers 1-4; an entry with zero sectors is unused, whatever
//!   its type, and leaves a gap. Logical partitions are 5, 6, ... in EBR-chain
//!   order: each EBR's data entries are relative to that EBR, the first link entry
//!   (type 0x05, 0x0F or 0x85) is relative to the start of the primary extended
//!   partition; entries 3 and 4 of an EBR count only if they lie inside the
//!   extended partition. The chain stops at an EBR without `55 AA`, outside the
//!   disk, already visited (a loop), or after [`MAX_EMPTY_LINKS`] links in a row
//!   without a data entry.
//! - The extended partition itself is listed, with its full size as the table
//!   records it (as `sfdisk -d`, `partx` and `kpartx -l` show it), so numbers and
//!   sizes match those tools. Linux's block device for it covers only its first
//!   1 KiB (one logical sector on 4K disks), to keep mkfs away from the EBRs:
//!   [`Partition::device_size`] gives that size, and a window onto an extended
//!   partition should use it.
//! - GPT: partition N is entry N-1; unused entries (zero type GUID) are skipped,
//!   numbers are kept. Header and entry-array CRC32s are verified; when the
//!   primary header or its array is damaged, the backup header (at the primary's
//!   AlternateLBA if the primary header itself was readable, else at the last
//!   LBA) is used, as libblkid does (the kernel does so only with `gpt` on its
//!   command line). Entry size must be 128 bytes (Linux refuses other sizes).
//! - Partition numbers stop at [`MAX_PARTITIONS`] (255, Linux's limit).
//!
//! # Bounds
//!
//! Every LBA and size is checked. A partition that starts at or beyond the end of
//! the disk is skipped (its number stays a gap); an MBR partition that runs past
//! the end is clipped to the disk (as Linux does: "extends beyond EOD,
//! truncated"); a GPT entry that runs past the last LBA, or ends before it
//! starts, is skipped (Linux skips it too). A GPT entry array larger than
//! [`MAX_GPT_ARRAY_BYTES`] is refused. Nested BSD/Solaris/Minix labels inside
//! MBR partitions are not parsed.
//!
//! [`Disk::read_at`]: crate::Disk::read_at

pub mod gpt;
pub mod gpt_types;
pub mod mbr;

use crate::{Disk, Error, Result};

pub use gpt::{gpt_type_name, guid_to_string};
pub use mbr::{is_extended_type, mbr_type_name};

/// Highest partition number produced (Linux: DISK_MAX_PARTS 256 minus the whole disk).
pub const MAX_PARTITIONS: u32 = 255;
/// An EBR chain gives up after this many links in a row without a data entry (Linux: 100).
pub const MAX_EMPTY_LINKS: u32 = 100;
/// Largest GPT partition entry array accepted (32768 entries of 128 bytes).
pub const MAX_GPT_ARRAY_BYTES: u64 = 4 << 20;

/// What kind of table entry a partition comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionKind {
    /// MBR primary, extended or logical partition, with its type byte.
    Mbr(u8),
    /// GPT entry: type GUID as stored on disk (mixed-endian), name from the entry.
    Gpt { type_guid: [u8; 16], name: String },
}

/// One partition of a disk, in bytes and in the disk's logical sectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Linux partition number (`disk.vhd<number>`, `/dev/sda<number>`).
    pub number: u32,
    /// Offset of the first byte on the virtual disk.
    pub start: u64,
    /// Length in bytes (clipped to the end of the disk; see the module docs).
    pub size: u64,
    pub kind: PartitionKind,
    /// The disk's logical sector size: the table's LBA unit.
    pub sector_size: u32,
}

impl Partition {
    /// First sector, in the disk's logical sectors.
    pub fn start_sector(&self) -> u64 {
        self.start / self.sector_size as u64
    }
    /// Length in logical sectors.
    pub fn sectors(&self) -> u64 {
        self.size / self.sector_size as u64
    }
    /// Offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
    /// Whether this is an MBR extended partition (the container of logical partitions).
    pub fn is_extended(&self) -> bool {
        matches!(self.kind, PartitionKind::Mbr(t) if is_extended_type(t)) && self.number <= 4
    }
    /// The size of the block device Linux creates for this partition: the full
    /// size, except for an extended partition, which gets
    /// `min(size, max(1 KiB, one logical sector))` so that nothing formats it.
    pub fn device_size(&self) -> u64 {
        if self.is_extended() {
            self.size.min((self.sector_size as u64).max(1024))
        } else {
            self.size
        }
    }
    /// The type as `kpartx`/`fdisk` users read it: `0x83` for MBR, the type name
    /// (or the GUID when unknown) for GPT.
    pub fn type_description(&self) -> String {
        match &self.kind {
            PartitionKind::Mbr(t) => format!("0x{t:02x}"),
            PartitionKind::Gpt { type_guid, .. } => gpt_type_name(type_guid)
                .map(str::to_string)
                .unwrap_or_else(|| guid_to_string(type_guid)),
        }
    }
}

/// Every partition of `disk`, in Linux numbering order. A disk without a
/// recognised partition table has none. Fails on I/O errors and on a GPT whose
/// primary and backup headers are both invalid.
pub fn partitions(disk: &Disk) -> Result<Vec<Partition>> {
    let geo = Geo::of(disk)?;
    let Some(sector0) = geo.read(disk, 0, 1)? else {
        return Ok(Vec::new());
    };
    let entries = mbr::entries(&sector0);
    if !mbr::has_signature(&sector0) {
        return Ok(Vec::new());
    }
    if entries.iter().any(|e| e.kind == mbr::GPT_PROTECTIVE) {
        if !entries
            .iter()
            .any(|e| e.kind == mbr::GPT_PROTECTIVE && e.start == 1)
        {
            log::debug!("MBR has a type 0xEE entry not at LBA 1: no partitions, as in Linux");
            return Ok(Vec::new());
        }
        return gpt::partitions(disk, &geo);
    }
    mbr::partitions(disk, &geo, &entries)
}

/// Partition `number` of `disk`, or `None` when the table has no such partition.
pub fn partition(disk: &Disk, number: u32) -> Result<Option<Partition>> {
    if number == 0 || number > MAX_PARTITIONS {
        return Ok(None);
    }
    Ok(partitions(disk)?.into_iter().find(|p| p.number == number))
}

/// The disk's sector geometry, for bounds checks.
pub(crate) struct Geo {
    /// Logical sector size in bytes.
    pub ss: u64,
    /// Number of whole logical sectors.
    pub sectors: u64,
}

impl Geo {
    fn of(disk: &Disk) -> Result<Geo> {
        let ss = disk.logical_sector_size() as u64;
        if ss < 512 || !ss.is_power_of_two() {
            return Err(Error::unsupported(format!("logical sector size {ss}")));
        }
        Ok(Geo {
            ss,
            sectors: disk.size() / ss,
        })
    }

    /// Reads `count` sectors at `lba`; `None` if any of them lies outside the disk.
    pub fn read(&self, disk: &Disk, lba: u64, count: u64) -> Result<Option<Vec<u8>>> {
        let Some(end) = lba.checked_add(count) else {
            return Ok(None);
        };
        if end > self.sectors {
            return Ok(None);
        }
        let Some(len) = count
            .checked_mul(self.ss)
            .and_then(|l| usize::try_from(l).ok())
        else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, lba * self.ss)?;
        Ok(Some(buf))
    }

    /// A partition of `count` sectors at `lba`, clipped to the disk if `clip`,
    /// else refused when it runs past the end. `None` when it starts at or past
    /// the end, is empty, or (without `clip`) does not fit.
    pub fn partition(
        &self,
        number: u32,
        lba: u64,
        count: u64,
        clip: bool,
        kind: PartitionKind,
    ) -> Option<Partition> {
        if count == 0 {
            return None;
        }
        if lba >= self.sectors {
            log::warn!(
                "partition {number}: start {lba} is beyond the end of the disk ({} sectors); skipped",
                self.sectors
            );
            return None;
        }
        let room = self.sectors - lba;
        let count = if count > room {
            if !clip {
                log::warn!(
                    "partition {number}: {count} sectors at {lba} run past the end of the disk; skipped"
                );
                return None;
            }
            log::warn!(
                "partition {number}: {count} sectors at {lba} run past the end of the disk; truncated to {room}"
            );
            room
        } else {
            count
        };
        // lba + count <= sectors, and sectors * ss <= disk size: no overflow.
        Some(Partition {
            number,
            start: lba * self.ss,
            size: count * self.ss,
            kind,
            sector_size: self.ss as u32,
        })
    }
}

#[cfg(test)]
pub(crate) mod testdisk {
    //! An in-memory disk for the parser tests.
    use crate::Disk;

    pub fn disk(data: Vec<u8>, ss: u32) -> Disk {
        let image = crate::RawImage::new(Box::new(crate::MemStorage::read_only(data)), ss).unwrap();
        Disk::new(vec![Box::new(image)]).unwrap()
    }

    /// Writes an MBR-style entry into slot `slot` (0-3) of the sector at `sector_off`.
    pub fn put_entry(
        buf: &mut [u8],
        sector_off: usize,
        slot: usize,
        boot: u8,
        kind: u8,
        start: u32,
        count: u32,
    ) {
        let o = sector_off + 446 + 16 * slot;
        buf[o] = boot;
        buf[o + 4] = kind;
        buf[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
        buf[o + 12..o + 16].copy_from_slice(&count.to_le_bytes());
        buf[sector_off + 510] = 0x55;
        buf[sector_off + 511] = 0xAA;
    }
}

#[cfg(test)]
mod tests {
    use super::testdisk::*;
    use super::*;

    #[test]
    fn no_signature_no_partitions() {
        let d = disk(vec![0u8; 1 << 20], 512);
        assert!(partitions(&d).unwrap().is_empty());
        assert_eq!(partition(&d, 1).unwrap(), None);
    }

    #[test]
    fn tiny_disks() {
        assert!(partitions(&disk(vec![], 512)).unwrap().is_empty());
        assert!(partitions(&disk(vec![0; 100], 512)).unwrap().is_empty());
        let mut d = vec![0u8; 4096];
        put_entry(&mut d, 0, 0, 0, 0x83, 1, 100);
        assert!(partitions(&disk(d, 4096)).unwrap().is_empty()); // starts at the end
    }

    #[test]
    fn ee_not_at_lba1_ignored() {
        let mut d = vec![0u8; 1 << 20];
        put_entry(&mut d, 0, 0, 0, 0xEE, 2, 100);
        put_entry(&mut d, 0, 1, 0, 0x83, 200, 100);
        assert!(partitions(&disk(d, 512)).unwrap().is_empty());
    }

    #[test]
    fn helpers() {
        let p = Partition {
            number: 2,
            start: 4096,
            size: 8192,
            kind: PartitionKind::Mbr(0x05),
            sector_size: 512,
        };
        assert_eq!((p.start_sector(), p.sectors(), p.end()), (8, 16, 12288));
        assert!(p.is_extended());
        assert_eq!(p.device_size(), 1024);
        assert_eq!(p.type_description(), "0x05");
        let p = Partition {
            sector_size: 4096,
            size: 3 * 4096,
            ..p
        };
        assert_eq!(p.device_size(), 4096);
        let p = Partition {
            kind: PartitionKind::Mbr(0x83),
            ..p
        };
        assert_eq!(p.device_size(), 3 * 4096);
    }
}
