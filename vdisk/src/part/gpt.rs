//! GUID partition tables (UEFI 2.x, chapter 5.3): header at LBA 1 with a backup
//! at the last LBA, each pointing at an array of 128-byte entries, all
//! protected by CRC32/IEEE. See [`crate::part`] for the selection rules.

pub use super::gpt_types::{GPT_TYPES, gpt_type_name, guid_from_str, guid_to_string};
use super::{Geo, MAX_GPT_ARRAY_BYTES, MAX_PARTITIONS, Partition, PartitionKind};
use crate::bytes::{arr, le32, le64};
use crate::crc::crc32_ieee;
use crate::{Disk, Error, Result};

pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Bytes of the header that this revision defines (and the smallest header size).
pub const HEADER_MIN_SIZE: usize = 92;
/// The only entry size Linux accepts.
pub const ENTRY_SIZE: usize = 128;
const HEADER_CRC_OFFSET: usize = 16;

/// The fields of a GPT header that locate and check the entry array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub disk_guid: [u8; 16],
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

/// One GPT entry as stored (LBAs inclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub type_guid: [u8; 16],
    pub unique_guid: [u8; 16],
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Entry {
    pub fn parse(b: &[u8]) -> Entry {
        let units: Vec<u16> = (0..36)
            .map(|i| u16::from_le_bytes([b[56 + 2 * i], b[57 + 2 * i]]))
            .collect();
        let len = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        Entry {
            type_guid: arr(b, 0),
            unique_guid: arr(b, 16),
            first_lba: le64(b, 32),
            last_lba: le64(b, 40),
            attributes: le64(b, 48),
            name: String::from_utf16_lossy(&units[..len]),
        }
    }
    pub fn is_used(&self) -> bool {
        self.type_guid != [0; 16]
    }
}

/// Parses and checks the header in `sector`, read at `lba`. `Err` names the defect.
pub fn parse_header(
    sector: &[u8],
    lba: u64,
    geo_sectors: u64,
) -> std::result::Result<Header, String> {
    if &sector[..8] != SIGNATURE {
        return Err("no EFI PART signature".into());
    }
    let size = le32(sector, 12) as usize;
    if size < HEADER_MIN_SIZE || size > sector.len() {
        return Err(format!("header size {size}"));
    }
    let mut copy = sector[..size].to_vec();
    copy[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].fill(0);
    let (stored, computed) = (le32(sector, HEADER_CRC_OFFSET), crc32_ieee(&copy));
    if stored != computed {
        return Err(format!(
            "header CRC32 {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let h = Header {
        my_lba: le64(sector, 24),
        alternate_lba: le64(sector, 32),
        first_usable: le64(sector, 40),
        last_usable: le64(sector, 48),
        disk_guid: arr(sector, 56),
        entries_lba: le64(sector, 72),
        entry_count: le32(sector, 80),
        entry_size: le32(sector, 84),
        entries_crc: le32(sector, 88),
    };
    if h.my_lba != lba {
        return Err(format!(
            "header at LBA {lba} says it is at LBA {}",
            h.my_lba
        ));
    }
    let last = geo_sectors.saturating_sub(1);
    if h.first_usable > last || h.last_usable > last || h.last_usable < h.first_usable {
        return Err(format!(
            "usable LBAs {}..={} outside the disk (last LBA {last})",
            h.first_usable, h.last_usable
        ));
    }
    if h.entry_size as usize != ENTRY_SIZE {
        return Err(format!(
            "entry size {} (only {ENTRY_SIZE} is supported)",
            h.entry_size
        ));
    }
    if h.entry_count as u64 * h.entry_size as u64 > MAX_GPT_ARRAY_BYTES {
        return Err(format!(
            "{} entries: array larger than {MAX_GPT_ARRAY_BYTES} bytes",
            h.entry_count
        ));
    }
    Ok(h)
}

/// A sound header and its entry array, or why a copy is unusable (with its header when only the array is bad).
type Loaded = std::result::Result<(Header, Vec<u8>), (Option<Header>, String)>;

/// Reads and checks the header at `lba` and its entry array. `Ok(Err(..))`
/// says why this copy is unusable, with the header if the header itself was
/// sound (its AlternateLBA then locates the backup).
fn load(disk: &Disk, geo: &Geo, lba: u64) -> Result<Loaded> {
    let Some(sector) = geo.read(disk, lba, 1)? else {
        return Ok(Err((
            None,
            format!("LBA {lba} is beyond the end of the disk"),
        )));
    };
    let h = match parse_header(&sector, lba, geo.sectors) {
        Ok(h) => h,
        Err(e) => return Ok(Err((None, e))),
    };
    let bytes = h.entry_count as u64 * h.entry_size as u64; // bounded by parse_header
    let count = bytes.div_ceil(geo.ss);
    let Some(array) = geo.read(disk, h.entries_lba, count)? else {
        let e = format!(
            "entry array at LBA {} ({count} sectors) is beyond the end of the disk",
            h.entries_lba
        );
        return Ok(Err((Some(h), e)));
    };
    let array = array[..bytes as usize].to_vec();
    let computed = crc32_ieee(&array);
    if computed != h.entries_crc {
        let e = format!(
            "entry array CRC32 {:#010x}, computed {computed:#010x}",
            h.entries_crc
        );
        return Ok(Err((Some(h), e)));
    }
    Ok(Ok((h, array)))
}

/// The partitions of a GPT disk (sector 0 is a protective or hybrid MBR).
pub(crate) fn partitions(disk: &Disk, geo: &Geo) -> Result<Vec<Partition>> {
    let last = geo.sectors.saturating_sub(1);
    let (header, array) = match load(disk, geo, 1)? {
        Ok(ok) => ok,
        Err((primary, why)) => {
            log::warn!("primary GPT header unusable ({why}); trying the backup");
            let mut candidates = Vec::new();
            if let Some(h) = primary.filter(|h| h.alternate_lba > 1 && h.alternate_lba <= last) {
                candidates.push(h.alternate_lba);
            }
            if !candidates.contains(&last) {
                candidates.push(last);
            }
            let mut found = None;
            let mut why_backup = Vec::new();
            for lba in candidates {
                match load(disk, geo, lba)? {
                    Ok(ok) => {
                        found = Some(ok);
                        break;
                    }
                    Err((_, e)) => why_backup.push(format!("LBA {lba}: {e}")),
                }
            }
            found.ok_or_else(|| {
                Error::corrupt(
                    "GPT",
                    format!(
                        "primary header: {why}; backup header: {}",
                        why_backup.join("; ")
                    ),
                )
            })?
        }
    };
    let mut parts = Vec::new();
    let n = (header.entry_count as usize).min(MAX_PARTITIONS as usize);
    for (i, raw) in array
        .chunks_exact(header.entry_size as usize)
        .take(n)
        .enumerate()
    {
        let e = Entry::parse(raw);
        if !e.is_used() {
            continue;
        }
        let number = i as u32 + 1;
        if e.first_lba > e.last_lba || e.last_lba > last {
            log::warn!(
                "GPT entry {number}: LBAs {}..={} invalid or past the last LBA {last}; skipped",
                e.first_lba,
                e.last_lba
            );
            continue;
        }
        let count = e.last_lba - e.first_lba + 1; // last_lba < sectors: no overflow
        let kind = PartitionKind::Gpt {
            type_guid: e.type_guid,
            name: e.name,
        };
        if let Some(p) = geo.partition(number, e.first_lba, count, false, kind) {
            parts.push(p);
        }
    }
    Ok(parts)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testdisk::{disk, put_entry};
    use super::super::{partition, partitions};
    use super::*;
    use crate::bytes::{put_le32, put_le64};

    pub const LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

    /// Writes a header (and its array) at `lba`, entries at `entries_lba`.
    fn put_table(
        d: &mut [u8],
        ss: usize,
        lba: u64,
        alt: u64,
        entries_lba: u64,
        array: &[u8],
        count: u32,
    ) {
        let sectors = (d.len() / ss) as u64;
        let a = entries_lba as usize * ss;
        d[a..a + array.len()].copy_from_slice(array);
        let h = &mut d[lba as usize * ss..lba as usize * ss + ss];
        h.fill(0);
        h[..8].copy_from_slice(SIGNATURE);
        put_le32(h, 8, 0x0001_0000);
        put_le32(h, 12, 92);
        put_le64(h, 24, lba);
        put_le64(h, 32, alt);
        put_le64(h, 40, 34);
        put_le64(h, 48, sectors - 34);
        h[56..72].copy_from_slice(&[7; 16]);
        put_le64(h, 72, entries_lba);
        put_le32(h, 80, count);
        put_le32(h, 84, 128);
        put_le32(h, 88, crc32_ieee(array));
        let crc = crc32_ieee(&h[..92]);
        put_le32(h, 16, crc);
    }

    /// A GPT disk of `sectors` logical sectors with entries `(index, type, first, last, name)`.
    pub fn gpt_disk(ss: usize, sectors: u64, entries: &[(usize, &str, u64, u64, &str)]) -> Vec<u8> {
        let mut d = vec![0u8; ss * sectors as usize];
        put_entry(
            &mut d,
            0,
            0,
            0,
            0xEE,
            1,
            (sectors - 1).min(u32::MAX as u64) as u32,
        );
        let mut array = vec![0u8; 128 * 128];
        for &(i, t, first, last, name) in entries {
            let e = &mut array[i * 128..i * 128 + 128];
            e[..16].copy_from_slice(&guid_from_str(t).unwrap());
            e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
            put_le64(e, 32, first);
            put_le64(e, 40, last);
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        let array_sectors = (array.len() / ss) as u64;
        put_table(&mut d, ss, 1, sectors - 1, 2, &array, 128);
        put_table(
            &mut d,
            ss,
            sectors - 1,
            1,
            sectors - 1 - array_sectors,
            &array,
            128,
        );
        d
    }

    fn summary(d: &Disk) -> Vec<(u32, u64, u64, String)> {
        partitions(d)
            .unwrap()
            .into_iter()
            .map(|p| {
                let t = p.type_description();
                (p.number, p.start_sector(), p.sectors(), t)
            })
            .collect()
    }

    fn sample(ss: usize, sectors: u64) -> Vec<u8> {
        gpt_disk(
            ss,
            sectors,
            &[
                (0, ESP, 40, 99, "esp"),
                (1, LINUX_FS, 100, 199, "root"),
                (4, LINUX_FS, 300, 399, "five"),
                (11, ESP, 400, 409, ""),
            ],
        )
    }

    fn expected() -> Vec<(u32, u64, u64, String)> {
        vec![
            (1, 40, 60, "EFI System".into()),
            (2, 100, 100, "Linux filesystem".into()),
            (5, 300, 100, "Linux filesystem".into()),
            (12, 400, 10, "EFI System".into()),
        ]
    }

    #[test]
    fn guid_text_round_trip() {
        let b = guid_from_str(LINUX_FS).unwrap();
        assert_eq!(b[..4], [0xAF, 0x3D, 0xC6, 0x0F]);
        assert_eq!(guid_to_string(&b), LINUX_FS);
        assert_eq!(gpt_type_name(&b), Some("Linux filesystem"));
        assert_eq!(gpt_type_name(&[1; 16]), None);
        assert_eq!(guid_from_str("xyz"), None);
        for (g, _) in GPT_TYPES {
            assert_eq!(guid_to_string(&guid_from_str(g).unwrap()), *g);
        }
    }

    #[test]
    fn entries_numbered_by_index() {
        let d = disk(sample(512, 1000), 512);
        assert_eq!(summary(&d), expected());
        let p = partition(&d, 2).unwrap().unwrap();
        assert_eq!((p.start, p.size), (100 * 512, 100 * 512));
        assert_eq!(
            p.kind,
            PartitionKind::Gpt {
                type_guid: guid_from_str(LINUX_FS).unwrap(),
                name: "root".into()
            }
        );
        assert_eq!(partition(&d, 3).unwrap(), None);
    }

    #[test]
    fn four_k_sectors() {
        let d = disk(sample(4096, 1000), 4096);
        assert_eq!(summary(&d), expected());
        let p = partition(&d, 5).unwrap().unwrap();
        assert_eq!((p.start, p.size), (300 * 4096, 100 * 4096));
        // The same table read with 512-byte sectors finds no header at byte 512.
        assert!(partitions(&disk(sample(4096, 1000), 512)).is_err());
    }

    #[test]
    fn damaged_primary_header_uses_backup() {
        let mut d = sample(512, 1000);
        d[512 + 40] ^= 1; // header CRC now wrong
        assert_eq!(summary(&disk(d.clone(), 512)), expected());
        d[512..1024].fill(0); // header gone entirely
        assert_eq!(summary(&disk(d, 512)), expected());
    }

    #[test]
    fn damaged_primary_array_uses_backup() {
        let mut d = sample(512, 1000);
        d[1024 + 4 * 128 + 33] ^= 0xFF; // entry 5's first LBA in the primary array
        assert_eq!(summary(&disk(d, 512)), expected());
    }

    #[test]
    fn both_damaged_is_an_error() {
        let mut d = sample(512, 1000);
        d[1024 + 5] ^= 1;
        d[999 * 512 + 30] ^= 1;
        let e = partitions(&disk(d, 512)).unwrap_err();
        assert!(e.to_string().contains("GPT"), "{e}");
    }

    #[test]
    fn header_checks() {
        let d = sample(512, 1000);
        let h = &d[512..1024];
        assert!(parse_header(h, 1, 1000).is_ok());
        assert!(parse_header(h, 2, 1000).unwrap_err().contains("LBA"));
        assert!(parse_header(h, 1, 500).unwrap_err().contains("usable"));
        let mut bad = h.to_vec();
        put_le32(&mut bad, 12, 1000);
        assert!(parse_header(&bad, 1, 1000).unwrap_err().contains("size"));
    }

    /// Rewrites the primary header with `edit` applied and a correct CRC.
    fn edit_header(d: &mut [u8], edit: impl Fn(&mut [u8])) {
        let h = &mut d[512..1024];
        edit(h);
        put_le32(h, 16, 0);
        let crc = crc32_ieee(&h[..92]);
        put_le32(h, 16, crc);
    }

    #[test]
    fn hostile_headers_fall_back_or_fail_cleanly() {
        type Edit = Box<dyn Fn(&mut [u8])>;
        let edits: Vec<Edit> = vec![
            Box::new(|h| put_le32(h, 80, u32::MAX)), // huge entry count
            Box::new(|h| put_le32(h, 84, 0)),        // zero entry size
            Box::new(|h| put_le32(h, 84, 256)),      // unsupported entry size
            Box::new(|h| put_le64(h, 72, u64::MAX)), // array LBA overflows
            Box::new(|h| put_le64(h, 72, 990)),      // array runs past the end
            Box::new(|h| put_le64(h, 48, u64::MAX)), // last usable past the end
            Box::new(|h| put_le32(h, 12, u32::MAX)), // header size
        ];
        for edit in edits {
            let mut d = sample(512, 1000);
            edit_header(&mut d, &edit);
            assert_eq!(summary(&disk(d.clone(), 512)), expected());
            // Without a backup: an error, never a panic.
            d[999 * 512..].fill(0);
            assert!(partitions(&disk(d, 512)).is_err());
        }
    }

    #[test]
    fn hostile_entries_are_skipped() {
        let d = gpt_disk(
            512,
            1000,
            &[
                (0, LINUX_FS, 200, 100, "backwards"),
                (1, LINUX_FS, 900, 1000, "past the end"),
                (2, LINUX_FS, u64::MAX, u64::MAX, "overflow"),
                (3, LINUX_FS, 0, u64::MAX, "everything"),
                (4, LINUX_FS, 999, 999, "last sector"),
            ],
        );
        assert_eq!(
            summary(&disk(d, 512)),
            vec![(5, 999, 1, "Linux filesystem".into())]
        );
    }

    #[test]
    fn zero_entries() {
        let mut d = sample(512, 1000);
        edit_header(&mut d, |h| {
            put_le32(h, 80, 0);
            put_le32(h, 88, crc32_ieee(&[]));
        });
        assert!(summary(&disk(d, 512)).is_empty());
    }

    #[test]
    fn hybrid_mbr_is_gpt() {
        let mut d = sample(512, 1000);
        put_entry(&mut d, 0, 1, 0x80, 0x83, 100, 100);
        assert_eq!(summary(&disk(d, 512)), expected());
    }
}
