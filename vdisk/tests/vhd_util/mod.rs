//! VHD test helpers: an independent structural checker (qemu-img has no
//! `check` for vpc) and a builder of differencing children straight from the
//! specification (no tool on Linux writes them). Written from the format
//! description, not from vdisk's own parser, so the two can disagree.
#![allow(dead_code)]

use std::path::Path;

pub const SECTOR: u64 = 512;
pub const UNUSED: u32 = 0xFFFF_FFFF;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// One's complement of the byte sum, with the 4-byte field at `field` as zero.
pub fn vhd_checksum(b: &[u8], field: usize) -> u32 {
    let mut s = 0u32;
    for (i, &x) in b.iter().enumerate() {
        if !(field..field + 4).contains(&i) {
            s = s.wrapping_add(x as u32);
        }
    }
    !s
}

/// Recomputes the footer checksum (field at 64) of a 512-byte footer.
pub fn fix_footer_checksum(f: &mut [u8]) {
    let c = vhd_checksum(&f[..512], 64);
    put32(f, 64, c);
}
/// Recomputes the dynamic header checksum (field at 36) of a 1024-byte header.
pub fn fix_header_checksum(h: &mut [u8]) {
    let c = vhd_checksum(&h[..1024], 36);
    put32(h, 36, c);
}

/// Size of the virtual disk by qemu 10's rule (CHS for `vpc `/`qemu` unless the
/// geometry is the maximal 65535/16/255, else current size).
pub fn footer_virtual_size(f: &[u8]) -> u64 {
    let creator = &f[28..32];
    let (c, h, s) = (be16(f, 56) as u64, f[58] as u64, f[59] as u64);
    let chs = (creator == b"vpc " || creator == b"qemu") && !(c == 65535 && h == 16 && s == 255);
    (if chs { c * h * s * 512 } else { be64(f, 48) }) & !511
}

/// What the checker found in a valid file.
#[derive(Debug, Clone)]
pub struct Layout {
    pub disk_type: u32,
    pub size: u64,
    pub block_size: u64,
    /// (block index, bitmap file offset) of every allocated block.
    pub blocks: Vec<(usize, u64)>,
    pub unique_id: [u8; 16],
}

/// Structural check of a whole VHD file: footer at the end (cookie, checksum,
/// version, type, size), footer copy at 0 of sparse disks, dynamic header
/// (cookie, checksum, data offset all ones, version, table and block size),
/// every BAT entry unused or a sector-aligned block inside the file before the
/// final footer, no two blocks overlapping each other or the footer copy,
/// header, BAT, locator data or blktap batmap. Returns every problem found.
pub fn check(d: &[u8]) -> Result<Layout, String> {
    let mut errs: Vec<String> = Vec::new();
    macro_rules! bad { ($($t:tt)*) => { errs.push(format!($($t)*)) } }
    let len = d.len() as u64;
    if len < 512 {
        return Err(format!("file of {len} bytes has no footer"));
    }
    if !len.is_multiple_of(512) {
        bad!("file length {len} is not a multiple of 512");
    }
    let fe = len as usize - 512;
    let f = &d[fe..];
    if &f[..8] != b"conectix" {
        return Err(format!("no conectix cookie in the footer at {fe}"));
    }
    if vhd_checksum(f, 64) != be32(f, 64) {
        bad!(
            "footer checksum {:#x} should be {:#x}",
            be32(f, 64),
            vhd_checksum(f, 64)
        );
    }
    if be32(f, 12) != 0x0001_0000 {
        bad!("footer format version {:#x}", be32(f, 12));
    }
    if be32(f, 8) & 2 == 0 {
        bad!(
            "footer features {:#x} lack the reserved bit 0x2",
            be32(f, 8)
        );
    }
    let disk_type = be32(f, 60);
    let size = footer_virtual_size(f);
    let current = be64(f, 48);
    if !current.is_multiple_of(512) {
        bad!("current size {current} is not a multiple of 512");
    }
    let unique_id: [u8; 16] = f[68..84].try_into().unwrap();
    let mut layout = Layout {
        disk_type,
        size,
        block_size: 0,
        blocks: Vec::new(),
        unique_id,
    };
    match disk_type {
        2 => {
            if be64(f, 16) != u64::MAX {
                bad!("fixed disk with data offset {:#x}", be64(f, 16));
            }
            if size > len - 512 {
                bad!("fixed disk of {size} bytes in a file of {len}");
            }
        }
        3 | 4 => check_sparse(d, f, size, &mut layout, &mut errs),
        t => bad!("disk type {t}"),
    }
    if errs.is_empty() {
        Ok(layout)
    } else {
        Err(errs.join("; "))
    }
}

fn check_sparse(d: &[u8], f: &[u8], size: u64, layout: &mut Layout, errs: &mut Vec<String>) {
    macro_rules! bad { ($($t:tt)*) => { errs.push(format!($($t)*)) } }
    let len = d.len() as u64;
    let footer_at = len - 512;
    if d[..512] != *f {
        bad!("the footer copy at 0 differs from the footer at {footer_at}");
    }
    let ho = be64(f, 16);
    if ho < 512 || !ho.is_multiple_of(512) || ho.checked_add(1024).is_none_or(|e| e > footer_at) {
        bad!("dynamic header offset {ho} out of range (file {len})");
        return;
    }
    let h = &d[ho as usize..ho as usize + 1024];
    if &h[..8] != b"cxsparse" {
        bad!("no cxsparse cookie at {ho}");
        return;
    }
    if vhd_checksum(h, 36) != be32(h, 36) {
        bad!(
            "dynamic header checksum {:#x} should be {:#x}",
            be32(h, 36),
            vhd_checksum(h, 36)
        );
    }
    if be64(h, 8) != u64::MAX {
        bad!(
            "dynamic header data offset {:#x} is not all ones",
            be64(h, 8)
        );
    }
    if be32(h, 24) != 0x0001_0000 {
        bad!("dynamic header version {:#x}", be32(h, 24));
    }
    let to = be64(h, 16);
    let entries = be32(h, 28) as u64;
    let bs = be32(h, 32) as u64;
    layout.block_size = bs;
    if !bs.is_power_of_two() || bs < 512 {
        bad!("block size {bs}");
        return;
    }
    if entries * bs < size {
        bad!("{entries} entries of {bs} bytes do not cover the disk size {size}");
    }
    let bat_bytes = (entries * 4).div_ceil(512) * 512;
    if !to.is_multiple_of(512) || to.checked_add(bat_bytes).is_none_or(|e| e > footer_at) {
        bad!("BAT at {to} ({entries} entries) out of range (file {len})");
        return;
    }
    let mut regions: Vec<(u64, u64, String)> = vec![
        (0, 512, "footer copy".into()),
        (ho, ho + 1024, "dynamic header".into()),
        (to, to + bat_bytes, "BAT".into()),
    ];
    if disk_type_is_diff(f) {
        for i in 0..8 {
            let e = &h[576 + 24 * i..600 + 24 * i];
            if e[..4] == [0; 4] {
                continue;
            }
            let space = be32(e, 4) as u64;
            let space = if space < 512 { space * 512 } else { space };
            let dl = be32(e, 8) as u64;
            let off = be64(e, 16);
            if dl > space {
                bad!("locator {i}: {dl} bytes of data in {space} bytes of space");
            }
            if !off.is_multiple_of(512) || off.checked_add(space).is_none_or(|x| x > footer_at) {
                bad!("locator {i}: data at {off} (+{space}) out of range");
                continue;
            }
            regions.push((off, off + space, format!("locator {i}")));
        }
    }
    // blktap batmap, right after the padded BAT.
    let bm = to + bat_bytes;
    if bm + 512 <= footer_at && &d[bm as usize..bm as usize + 8] == b"tdbatmap" {
        let map_off = be64(d, bm as usize + 8);
        let map_len = be32(d, bm as usize + 16) as u64 * 512;
        regions.push((bm, bm + 512, "batmap header".into()));
        if map_off.checked_add(map_len).is_none_or(|e| e > footer_at) {
            bad!("batmap at {map_off} out of range");
        } else {
            regions.push((map_off, map_off + map_len, "batmap".into()));
        }
    }
    let bitmap = (bs / 512).div_ceil(8).div_ceil(512) * 512;
    let used = size.div_ceil(bs);
    for b in 0..entries {
        let e = be32(d, (to + 4 * b) as usize);
        if e == UNUSED {
            continue;
        }
        if b >= used {
            bad!("BAT entry {b} beyond the disk ({used} blocks) is allocated");
        }
        let off = e as u64 * 512;
        let end = off + bitmap + bs;
        if end > footer_at {
            bad!("block {b} at {off}..{end} extends past the final footer at {footer_at}");
            continue;
        }
        layout.blocks.push((b as usize, off));
        regions.push((off, end, format!("block {b}")));
    }
    regions.sort();
    // Sorted by start: a region overlaps an earlier one iff it starts before
    // the furthest end seen so far.
    let mut max_end = (0u64, String::new());
    for r in &regions {
        if r.0 < max_end.0 {
            bad!("{} ({}..{}) overlaps {}", r.2, r.0, r.1, max_end.1);
        }
        if r.1 > max_end.0 {
            max_end = (r.1, r.2.clone());
        }
    }
}

fn disk_type_is_diff(f: &[u8]) -> bool {
    be32(f, 60) == 4
}

pub fn check_file(path: &Path) -> Result<Layout, String> {
    check(&std::fs::read(path).unwrap()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Asserts that `img` is clean for its format's checker: this checker for
/// VHD (`fmt` "vpc"; qemu-img has no check for it), `qemu-img check` else.
pub fn assert_clean(fmt: &str, img: &Path) {
    if fmt == "vpc" {
        check_file(img).unwrap_or_else(|e| panic!("VHD check: {e}"));
        return;
    }
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", fmt])
        .arg(img)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img (install it: see README): {e}"));
    assert!(
        out.status.success(),
        "qemu-img check -f {fmt} {img:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads the sector bitmap of an allocated block (MSB first).
pub fn bitmap_of(d: &[u8], bitmap_offset: u64, block_size: u64) -> Vec<u8> {
    let n = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
    d[bitmap_offset as usize..(bitmap_offset + n) as usize].to_vec()
}

// ---------------------------------------------------------------------------
// Building differencing children from the specification.

/// How a locator's platform data space is recorded.
#[derive(Clone, Copy, Debug)]
pub enum Space {
    /// In sectors, as the specification says.
    Sectors,
    /// In bytes, as Windows and blktap write.
    Bytes,
}

#[derive(Clone, Debug)]
pub struct Locator {
    pub code: [u8; 4],
    pub payload: Vec<u8>,
    pub space: Space,
}

pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// W2ru: relative Windows path in UTF-16LE, e.g. `.\parent.vhd`.
pub fn w2ru(rel: &str, space: Space) -> Locator {
    Locator {
        code: *b"W2ru",
        payload: utf16le(rel),
        space,
    }
}
/// W2ku: absolute Windows path in UTF-16LE.
pub fn w2ku(abs: &str, space: Space) -> Locator {
    Locator {
        code: *b"W2ku",
        payload: utf16le(abs),
        space,
    }
}
/// MacX: UTF-8 file URL.
pub fn macx(url: &str, space: Space) -> Locator {
    Locator {
        code: *b"MacX",
        payload: url.as_bytes().to_vec(),
        space,
    }
}
/// Wi2r: deprecated relative Windows path, ANSI.
pub fn wi2r(rel: &str, space: Space) -> Locator {
    Locator {
        code: *b"Wi2r",
        payload: rel.as_bytes().to_vec(),
        space,
    }
}

/// What the parent footer says about itself.
#[derive(Clone, Debug)]
pub struct ParentInfo {
    pub unique_id: [u8; 16],
    pub timestamp: u32,
    pub size: u64,
    pub geometry: [u8; 4],
}

pub fn parent_info(path: &Path) -> ParentInfo {
    let d = std::fs::read(path).unwrap();
    let f = &d[d.len() - 512..];
    ParentInfo {
        unique_id: f[68..84].try_into().unwrap(),
        timestamp: be32(f, 24),
        size: footer_virtual_size(f),
        geometry: f[56..60].try_into().unwrap(),
    }
}

/// A differencing child to build.
#[derive(Clone, Debug)]
pub struct Child {
    pub parent: ParentInfo,
    /// Written UTF-16BE into the header's parent unicode name.
    pub parent_name: String,
    pub locators: Vec<Locator>,
    pub block_size: u32,
    pub unique_id: [u8; 16],
    pub creator: [u8; 4],
    /// Header parent time stamp; `None`: the parent footer's time stamp.
    pub parent_timestamp: Option<u32>,
    /// Sector-aligned (offset, data) stored in the child from the start.
    pub data: Vec<(u64, Vec<u8>)>,
    /// 4 (differencing) or 3: a dynamic disk of the parent's size and no parent.
    pub disk_type: u32,
    /// Bytes left between the last block and the footer (Windows leaves a gap).
    pub gap: Vec<u8>,
}

impl Child {
    pub fn new(parent: ParentInfo, id_seed: u8) -> Child {
        let mut unique_id = [0u8; 16];
        for (i, b) in unique_id.iter_mut().enumerate() {
            *b = id_seed.wrapping_mul(31).wrapping_add(i as u8 * 7 + 1);
        }
        unique_id[0] = 0xC0;
        unique_id[1] = id_seed;
        Child {
            parent,
            parent_name: String::new(),
            locators: Vec::new(),
            block_size: 2 << 20,
            unique_id,
            creator: *b"win ",
            parent_timestamp: None,
            data: Vec::new(),
            disk_type: 4,
            gap: Vec::new(),
        }
    }

    /// The file: footer copy, header at 512, locator data, BAT, blocks
    /// (data 4 KiB aligned, bitmap in the sector before), footer.
    pub fn build(&self) -> Vec<u8> {
        let size = self.parent.size;
        let bs = self.block_size as u64;
        let entries = size.div_ceil(bs);
        let bitmap = (bs / 512).div_ceil(8).div_ceil(512) * 512;

        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        put32(&mut footer, 8, 2);
        put32(&mut footer, 12, 0x0001_0000);
        put64(&mut footer, 16, 512);
        put32(&mut footer, 24, self.parent.timestamp.wrapping_add(3600));
        footer[28..32].copy_from_slice(&self.creator);
        put32(&mut footer, 32, 0x000A_0000);
        footer[36..40].copy_from_slice(b"Wi2k");
        put64(&mut footer, 40, size);
        put64(&mut footer, 48, size);
        footer[56..60].copy_from_slice(&self.parent.geometry);
        put32(&mut footer, 60, self.disk_type);
        footer[68..84].copy_from_slice(&self.unique_id);
        fix_footer_checksum(&mut footer);

        let mut file = vec![0u8; 1536];
        file[..512].copy_from_slice(&footer);
        let mut h = vec![0u8; 1024];
        h[..8].copy_from_slice(b"cxsparse");
        put64(&mut h, 8, u64::MAX);
        put32(&mut h, 24, 0x0001_0000);
        put32(&mut h, 28, entries as u32);
        put32(&mut h, 32, self.block_size);
        if self.disk_type == 4 {
            h[40..56].copy_from_slice(&self.parent.unique_id);
            put32(
                &mut h,
                56,
                self.parent_timestamp.unwrap_or(self.parent.timestamp),
            );
        }
        let name: Vec<u8> = self
            .parent_name
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert!(name.len() <= 512);
        h[64..64 + name.len()].copy_from_slice(&name);
        // Locator data, each in its reserved space.
        for (i, loc) in self.locators.iter().enumerate() {
            let off = file.len() as u64;
            let reserved = (loc.payload.len() as u64).div_ceil(512).max(1) * 512;
            let (space_field, reserved) = match loc.space {
                Space::Sectors => (reserved / 512, reserved),
                // Windows reserves generously, in bytes.
                Space::Bytes => (reserved.max(4096), reserved.max(4096)),
            };
            file.extend_from_slice(&loc.payload);
            file.resize((off + reserved) as usize, 0);
            let e = 576 + 24 * i;
            h[e..e + 4].copy_from_slice(&loc.code);
            put32(&mut h, e + 4, space_field as u32);
            put32(&mut h, e + 8, loc.payload.len() as u32);
            put64(&mut h, e + 16, off);
        }
        // BAT, then blocks.
        let to = file.len().div_ceil(4096) * 4096;
        file.resize(to, 0);
        put64(&mut h, 16, to as u64);
        fix_header_checksum(&mut h);
        file[512..1536].copy_from_slice(&h);
        let bat_bytes = (entries * 4).div_ceil(512) * 512;
        file.resize(to + bat_bytes as usize, 0xFF);
        let mut bat = vec![UNUSED; entries as usize];
        for (off, data) in &self.data {
            assert!(off % 512 == 0 && data.len() % 512 == 0 && off + data.len() as u64 <= size);
            let mut pos = 0usize;
            while pos < data.len() {
                let v = off + pos as u64;
                let b = (v / bs) as usize;
                let n = ((bs - v % bs) as usize).min(data.len() - pos);
                if bat[b] == UNUSED {
                    let data_at = (file.len() as u64 + bitmap).div_ceil(4096) * 4096;
                    let bm_at = data_at - bitmap;
                    bat[b] = (bm_at / 512) as u32;
                    file.resize((data_at + bs) as usize, 0);
                }
                let bm_at = bat[b] as u64 * 512;
                let in_block = v % bs;
                let d0 = (bm_at + bitmap + in_block) as usize;
                file[d0..d0 + n].copy_from_slice(&data[pos..pos + n]);
                for s in in_block / 512..(in_block + n as u64) / 512 {
                    file[(bm_at + s / 8) as usize] |= 0x80 >> (s % 8);
                }
                pos += n;
            }
        }
        for (b, e) in bat.iter().enumerate() {
            file[to + 4 * b..to + 4 * b + 4].copy_from_slice(&e.to_be_bytes());
        }
        assert!(self.gap.len().is_multiple_of(512));
        file.extend_from_slice(&self.gap);
        file.extend_from_slice(&footer);
        file
    }
}

/// Applies the sector-aligned data of `child` to a model of the disk.
pub fn apply(model: &mut [u8], data: &[(u64, Vec<u8>)]) {
    for (off, d) in data {
        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
}

// ---------------------------------------------------------------------------
// Random writes.

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Unaligned writes for a disk of `size` bytes with `block`-byte blocks: the
/// first and last byte, a run ending exactly at the end of the disk, runs
/// crossing block boundaries, lengths from 1 byte to 5 MiB, some all zeros.
pub fn random_writes(seed: u64, size: u64, block: u64, count: usize) -> Vec<(u64, Vec<u8>)> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ops = vec![(size - 1, vec![0xA5]), (0, vec![0x5A])];
    let tail = 3 * 512 + 7;
    ops.push((size - tail, r.bytes(tail as usize)));
    if block * 2 + 1024 < size {
        ops.push((block - 100, r.bytes(300)));
        ops.push((block * 2 - 511, vec![0; 1024]));
    }
    for i in 0..count {
        let len = match r.below(5) {
            0 => 1 + r.below(3),
            1 => 1 + r.below(700),
            2 => 1 + r.below(70_000),
            3 => 1 + r.below(600_000),
            _ => 1 + r.below(5 << 20),
        }
        .min(size / 2);
        let off = if i % 3 == 0 && size > block {
            // Straddle a block boundary.
            let k = 1 + r.below((size - 1) / block);
            (k * block)
                .saturating_sub(len / 2 + r.below(3))
                .min(size - len)
        } else {
            r.below(size - len + 1)
        };
        let data = if r.below(4) == 0 {
            vec![0u8; len as usize]
        } else {
            r.bytes(len as usize)
        };
        ops.push((off, data));
    }
    // One write that covers the last block entirely, to the very end.
    let last = (size - 1) / block * block;
    ops.push((last, r.bytes((size - last) as usize)));
    ops.push((size - 2, vec![0, 0]));
    ops
}

pub fn apply_writes(model: &mut [u8], ops: &[(u64, Vec<u8>)]) {
    for (off, d) in ops {
        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
}

/// Bytes and modification time of a file, to prove it unchanged.
pub fn snapshot(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

pub fn assert_unchanged(path: &Path, before: &(Vec<u8>, std::time::SystemTime)) {
    let now = snapshot(path);
    assert!(now.0 == before.0, "{} changed", path.display());
    assert_eq!(now.1, before.1, "{}: mtime changed", path.display());
}
