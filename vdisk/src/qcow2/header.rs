//! The qcow2 header (versions 2 and 3) and its extensions, parsed and
//! validated in one place.

use crate::bytes::{be32, be64};
use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Bytes of the header read at open: the first cluster, at most this much.
pub const HEADER_AREA: usize = 64 << 10;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Byte offsets of the header fields this library rewrites.
pub const OFF_REFCOUNT_TABLE: usize = 48;
pub const OFF_INCOMPAT: usize = 72;
pub const OFF_AUTOCLEAR: usize = 88;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Largest L1 table accepted (qemu's limit: 32 MiB).
pub const MAX_L1_ENTRIES: u64 = 4 << 20;
/// Largest refcount table accepted (qemu's limit: 8 MiB).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// From the header extensions.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub has_bitmaps: bool,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// Entries per L2 table (16-byte entries with extended L2).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses and validates the header in `raw` (the first bytes of a file of
    /// `file_len` bytes, at most [`HEADER_AREA`]).
    pub fn parse(raw: &[u8], file_len: u64) -> Result<Header> {
        let bad = |d: String| Error::corrupt("qcow2 header", d);
        if raw.len() < 72 || &raw[..4] != MAGIC {
            return Err(Error::NotAnImage);
        }
        let version = be32(raw, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let cluster_bits = be32(raw, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} (512 B to 2 MiB clusters are valid)"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let (mut incompatible, mut compatible, mut autoclear) = (0, 0, 0);
        let (mut refcount_order, mut header_length) = (4, 72);
        let mut compression = Compression::Zlib;
        if version == 3 {
            if raw.len() < 104 {
                return Err(bad("version 3 header shorter than 104 bytes".into()));
            }
            incompatible = be64(raw, 72);
            compatible = be64(raw, 80);
            autoclear = be64(raw, 88);
            refcount_order = be32(raw, 96);
            header_length = be32(raw, 100);
            if header_length < 104
                || !header_length.is_multiple_of(8)
                || header_length as u64 > cs
                || header_length as usize > raw.len()
            {
                return Err(bad(format!("header_length {header_length}")));
            }
            if header_length > 104 {
                compression = match raw[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => {
                        return Err(Error::unsupported(format!(
                            "qcow2 compression type {t} (zlib and zstd are known)"
                        )));
                    }
                };
            }
        }
        let h_size = be64(raw, 24);
        let crypt_method = be32(raw, 32);
        let mut h = Header {
            version,
            backing_file_offset: be64(raw, 8),
            backing_file_size: be32(raw, 16),
            cluster_bits,
            size: h_size,
            crypt_method,
            l1_size: be32(raw, 36),
            l1_table_offset: be64(raw, 40),
            refcount_table_offset: be64(raw, 48),
            refcount_table_clusters: be32(raw, 56),
            nb_snapshots: be32(raw, 60),
            snapshots_offset: be64(raw, 64),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            backing_file: None,
            backing_format: None,
            data_file: None,
            has_bitmaps: false,
        };
        let names = h.read_extensions(raw)?;
        if crypt_method != 0 {
            let what = match crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::unsupported(format!(
                "encrypted qcow2 image ({what} encryption, crypt_method {crypt_method}): \
                 encryption is not supported; decrypt it with `qemu-img convert --object secret,... --image-opts` first"
            )));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let list: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && *bit == b)
                        .map_or(format!("bit {b}"), |(_, _, n)| format!("'{n}' (bit {b})"))
                })
                .collect();
            return Err(Error::unsupported(format!(
                "qcow2 incompatible features {}",
                list.join(", ")
            )));
        }
        if (incompatible & INCOMPAT_COMPRESSION != 0) != (compression != Compression::Zlib) {
            return Err(bad(
                "compression type bit and compression_type field disagree".into(),
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(bad(format!(
                "extended L2 entries with {cs}-byte clusters (16 KiB at least)"
            )));
        }
        if refcount_order > 6 {
            return Err(bad(format!("refcount_order {refcount_order}")));
        }
        if h.size > i64::MAX as u64 {
            return Err(bad(format!("virtual size {}", h.size)));
        }
        let per_l1 = h.l2_entries() * cs;
        let need_l1 = h.size.div_ceil(per_l1);
        if (h.l1_size as u64) < need_l1 || h.l1_size as u64 > MAX_L1_ENTRIES {
            return Err(bad(format!(
                "L1 table of {} entries for {} bytes (needs {need_l1})",
                h.l1_size, h.size
            )));
        }
        let table_fits = |off: u64, bytes: u64| {
            off.is_multiple_of(cs) && off.checked_add(bytes).is_some_and(|e| e <= file_len)
        };
        if h.l1_size > 0 && !table_fits(h.l1_table_offset, h.l1_size as u64 * 8) {
            return Err(bad(format!(
                "L1 table at {} ({} entries) outside the file",
                h.l1_table_offset, h.l1_size
            )));
        }
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES || !table_fits(h.refcount_table_offset, rt_bytes) {
            return Err(bad(format!(
                "refcount table at {} ({} clusters) outside the file or too large",
                h.refcount_table_offset, h.refcount_table_clusters
            )));
        }
        if h.nb_snapshots > 65536 {
            return Err(bad(format!("{} snapshots", h.nb_snapshots)));
        }
        if h.backing_file_offset != 0 {
            let (off, len) = (h.backing_file_offset, h.backing_file_size as u64);
            if len == 0 || len > 1023 || off.saturating_add(len) > cs.min(raw.len() as u64) {
                return Err(bad(format!(
                    "backing file name at {off} ({len} bytes) outside the first cluster"
                )));
            }
            let name = &raw[off as usize..(off + len) as usize];
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| bad("backing file name is not UTF-8".into()))?,
            );
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 && h.backing_file.is_some() {
            // Allowed by the spec only without the raw bit; qemu allows it.
            log::debug!("qcow2 image with both an external data file and a backing file");
        }
        Ok(h)
    }

    /// Reads the header extensions; returns the feature name table.
    fn read_extensions(&mut self, raw: &[u8]) -> Result<Vec<(u8, u32, String)>> {
        let bad = |d: String| Error::corrupt("qcow2 header extension", d);
        let cs = self.cluster_size() as usize;
        let end = cs.min(raw.len());
        let mut at = self.header_length as usize;
        let mut names = Vec::new();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        // Version 2 images may have extensions too (after the 72 bytes).
        while at + 8 <= end {
            let kind = be32(raw, at);
            let len = be32(raw, at + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_at = at + 8;
            if data_at + len > end {
                return Err(bad(format!(
                    "extension {kind:#x} of {len} bytes runs past the first cluster"
                )));
            }
            let data = &raw[data_at..data_at + len];
            match kind {
                EXT_BACKING_FORMAT => self.backing_format = Some(text(data)),
                EXT_DATA_FILE => self.data_file = Some(text(data)),
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let n = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        names.push((e[0], e[1] as u32, text(&e[2..2 + n])));
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                EXT_CRYPTO => {}
                _ => {}
            }
            at = data_at + len.div_ceil(8) * 8;
        }
        Ok(names)
    }

    /// Names of the features in use, for `describe`.
    pub fn feature_list(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let flags = [
            (self.incompatible & INCOMPAT_DIRTY, "dirty"),
            (self.incompatible & INCOMPAT_CORRUPT, "corrupt"),
            (self.incompatible & INCOMPAT_DATA_FILE, "external data file"),
            (self.incompatible & INCOMPAT_EXTL2, "extended L2"),
            (self.compatible & COMPAT_LAZY_REFCOUNTS, "lazy refcounts"),
            (self.autoclear & AUTOCLEAR_BITMAPS, "bitmaps"),
        ];
        for (on, name) in flags {
            if on != 0 {
                v.push(name);
            }
        }
        if self.compression == Compression::Zstd {
            v.push("zstd");
        }
        v
    }
}
