//! Bounded mutation test: thousands of deterministic mutants of the metadata
//! of real images (headers, footers, BAT/block map, region tables, metadata,
//! log area, locators, sector bitmaps), each opened read-only and read.
//!
//! Asserts no panic (each mutant under `catch_unwind`), no hang (every mutant
//! under 2 s, and each format's batch in a child process with a timeout), no
//! write (the storage counts write and set_len calls and must see none;
//! its bytes must stay as they were), and no unbounded allocation (the batch
//! runs under `ulimit -v`, so an allocation beyond it aborts the child and
//! fails the test).
//!
//! Base images: qemu-img conversions of a patterned 4 MiB raw disk with an
//! MBR (VHD dynamic, VHD fixed, VHDX with 1 MiB blocks, VDI), and a VHD
//! differencing child built from the specification (`vhd_util`) over the
//! dynamic VHD as its parent, which the parent opener serves from memory.

#[path = "common/mod.rs"]
mod common;
#[path = "vhd_util/mod.rs"]
mod vhd_util;

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vdisk::{MemStorage, OpenOptions, ParentOpener, Storage};

const CHILD_ENV: &str = "VDISK_MUTANTS_CHILD";
const FORMATS: [&str; 11] = [
    "vhd-dynamic",
    "vhd-fixed",
    "vhdx",
    "vhdx-dirty-log",
    "vdi",
    "vhd-diff",
    "vmdk-sparse",
    "vmdk-stream",
    "qcow2",
    "qcow2-zlib",
    "qcow2-overlay",
];
/// Mutants per format.
const PER_FORMAT: usize = 4000;
/// Address-space limit of the child, in KiB.
const ULIMIT_KB: u64 = 2_000_000;
const MUTANT_LIMIT: Duration = Duration::from_secs(2);
const BATCH_LIMIT: Duration = Duration::from_secs(120);

/// A read-only storage that counts every attempt to change the file.
struct Watched {
    inner: MemStorage,
    writes: Arc<AtomicUsize>,
}

impl Storage for Watched {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        false
    }
}

/// A shared read-only file in memory (the parent, not copied per mutant).
struct Shared(Arc<Vec<u8>>);

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = &self.0;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(d.len());
        let n = buf.len().min(d.len() - start);
        buf[..n].copy_from_slice(&d[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
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

/// Serves the parent image from memory for every path; counts writes too.
struct MemParent {
    data: Option<Arc<Vec<u8>>>,
    writes: Arc<AtomicUsize>,
}

/// Counts write attempts on the parent.
struct WatchedParent {
    inner: Shared,
    writes: Arc<AtomicUsize>,
}

impl Storage for WatchedParent {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        false
    }
}

impl ParentOpener for MemParent {
    fn open_parent(&self, _: &Path) -> io::Result<Box<dyn Storage>> {
        match &self.data {
            Some(d) => Ok(Box::new(WatchedParent {
                inner: Shared(d.clone()),
                writes: self.writes.clone(),
            })),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
    fn list_dir(&self, _: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// A metadata area to mutate and how to re-seal it after a mutation.
#[derive(Clone, Copy, Debug)]
enum Seal {
    None,
    /// VHD one's-complement checksum over `len` bytes at `at`, field at `at + field`.
    Vhd {
        at: usize,
        len: usize,
        field: usize,
    },
    /// CRC-32C over `len` bytes at `at`, field at `at + 4`.
    Crc {
        at: usize,
        len: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Area {
    start: usize,
    len: usize,
    seal: Seal,
    big_endian: bool,
}

fn area(start: usize, len: usize, seal: Seal, big_endian: bool) -> Area {
    Area {
        start,
        len,
        seal,
        big_endian,
    }
}

/// The metadata areas of a VHD (footer, footer copy, header, locators, BAT, bitmaps).
fn vhd_areas(d: &[u8]) -> Vec<Area> {
    let n = d.len();
    let footer = Seal::Vhd {
        at: n - 512,
        len: 512,
        field: 64,
    };
    let mut v = vec![area(n - 512, 512, footer, true)];
    if be32(d, n - 512 + 60) == 2 {
        return v; // fixed: the footer is all there is
    }
    v.push(area(
        0,
        512,
        Seal::Vhd {
            at: 0,
            len: 512,
            field: 64,
        },
        true,
    ));
    let h = 512;
    v.push(area(
        h,
        1024,
        Seal::Vhd {
            at: h,
            len: 1024,
            field: 36,
        },
        true,
    ));
    for i in 0..8 {
        let e = h + 576 + 24 * i;
        let off = be64(d, e + 16) as usize;
        let len = be32(d, e + 8) as usize;
        if d[e..e + 4] != [0; 4] && off < n && len > 0 {
            v.push(area(off, len.min(n - off).min(1024), Seal::None, true));
        }
    }
    let table = be64(d, h + 16) as usize;
    let entries = be32(d, h + 28) as usize;
    v.push(area(table, (entries * 4).min(n - table), Seal::None, true));
    for b in 0..entries {
        let e = be32(d, table + 4 * b);
        if e != u32::MAX {
            v.push(area(e as usize * 512, 512, Seal::None, true));
        }
    }
    v
}

fn vhdx_areas(d: &[u8]) -> Vec<Area> {
    const K: usize = 1024;
    let mut v = vec![area(0, 512, Seal::None, false)];
    for h in [64 * K, 128 * K] {
        v.push(area(h, 80, Seal::Crc { at: h, len: 4096 }, false));
    }
    for r in [192 * K, 256 * K] {
        v.push(area(
            r,
            16 + 32 * 2,
            Seal::Crc { at: r, len: 64 * K },
            false,
        ));
    }
    // Regions from the first table.
    let r = 192 * K;
    for i in 0..le32(d, r + 8).min(8) as usize {
        let e = r + 16 + 32 * i;
        let off = le64(d, e + 16) as usize;
        let len = le32(d, e + 24) as usize;
        if off >= d.len() {
            continue;
        }
        // BAT or metadata: the table, and the items the metadata table names.
        v.push(area(
            off,
            len.min(4096).min(d.len() - off),
            Seal::None,
            false,
        ));
        if &d[off..off + 8] == b"metadata" {
            for j in 0..le32(d, off + 10).min(16) as usize {
                let m = off + 32 + 32 * j;
                let item = off + le32(d, m + 16) as usize;
                let ilen = le32(d, m + 20) as usize;
                if item < d.len() && ilen > 0 {
                    v.push(area(
                        item,
                        ilen.min(1024).min(d.len() - item),
                        Seal::None,
                        false,
                    ));
                }
            }
        }
    }
    // The log area (empty in a clean file: mutants there must be ignored).
    let log = le64(d, 64 * K + 72) as usize;
    if log > 0 && log + 8192 <= d.len() {
        v.push(area(log, 8192, Seal::None, false));
    }
    v
}

fn vdi_areas(d: &[u8]) -> Vec<Area> {
    let mut v = vec![area(0x40, 0x1D8 - 0x40, Seal::None, false)];
    let blocks = le32(d, 0x154) as usize;
    let count = le32(d, 0x180) as usize;
    if blocks < d.len() {
        v.push(area(
            blocks,
            (count * 4).min(d.len() - blocks),
            Seal::None,
            false,
        ));
    }
    v
}

/// VMDK sparse (and stream-optimized): the header, the embedded
/// descriptor, both grain directories and the first tables they name, the
/// footer and the first compressed grains.
fn vmdk_areas(d: &[u8]) -> Vec<Area> {
    let n = d.len();
    let mut v = vec![area(0, 80, Seal::None, false)];
    let mut h = 0;
    if le64(d, 56) == u64::MAX && n >= 1536 {
        h = n - 1024;
        v.push(area(n - 1536, 1536, Seal::None, false));
    }
    let (desc, desc_len) = (le64(d, 28) as usize * 512, le64(d, 36) as usize * 512);
    if desc > 0 && desc < n {
        v.push(area(
            desc,
            desc_len.min(n - desc).min(1024),
            Seal::None,
            false,
        ));
    }
    for dir in [le64(d, h + 48), le64(d, h + 56)] {
        let dir = dir as usize * 512;
        if dir == 0 || dir >= n {
            continue;
        }
        v.push(area(dir, 64.min(n - dir), Seal::None, false));
        for i in 0..4 {
            let t = le32(d, dir + 4 * i) as usize * 512;
            if t > 0 && t + 2048 <= n {
                v.push(area(t, 2048, Seal::None, false));
                let g = le32(d, t) as usize * 512;
                if le32(d, 8) & (1 << 16) != 0 && g > 0 && g + 512 <= n {
                    v.push(area(g, 512, Seal::None, false));
                }
            }
        }
    }
    v
}

/// qcow2: header cluster, L1 table, refcount table, the L2 tables and
/// the first refcount block.
fn qcow2_areas(d: &[u8]) -> Vec<Area> {
    let cs = 1usize << be32(d, 20);
    let mut v = vec![area(0, cs.min(4096), Seal::None, true)];
    let l1 = be64(d, 40) as usize;
    let l1_len = be32(d, 36) as usize * 8;
    v.push(area(l1, l1_len, Seal::None, true));
    let rt = be64(d, 48) as usize;
    v.push(area(rt, be32(d, 56) as usize * cs, Seal::None, true));
    let rb = be64(d, rt) as usize;
    if rb != 0 && rb < d.len() {
        v.push(area(rb, cs.min(d.len() - rb), Seal::None, true));
    }
    for i in 0..l1_len / 8 {
        let l2 = (be64(d, l1 + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 != 0 && l2 + cs <= d.len() {
            v.push(area(l2, cs, Seal::None, true));
        }
    }
    v
}

const INTERESTING: [u64; 22] = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x1FF,
    0x200,
    0x1000,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
    0x1_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Mutant `i` of `base`: one to three edits inside one metadata area, then
/// (for every other mutant) the area's checksum recomputed so the parser
/// gets past it.
fn mutate(base: &[u8], areas: &[Area], i: usize) -> Vec<u8> {
    let mut d = base.to_vec();
    let mut rng = common::Rng((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let a = areas[rng.next() as usize % areas.len()];
    let edits = 1 + (rng.next() % 3) as usize;
    for _ in 0..edits {
        let pos = a.start + rng.next() as usize % a.len.max(1);
        if pos >= d.len() {
            continue;
        }
        match rng.next() % 6 {
            0 => d[pos] ^= 1 << (rng.next() % 8),
            1 => d[pos] = 0,
            2 => d[pos] = 0xFF,
            3 => d[pos] = rng.next() as u8,
            _ => {
                let v = INTERESTING[rng.next() as usize % INTERESTING.len()];
                let v = if rng.next().is_multiple_of(4) {
                    v.wrapping_add(d.len() as u64)
                } else {
                    v
                };
                let width = [2usize, 4, 8][rng.next() as usize % 3];
                let pos = pos & !(width - 1);
                if pos + width <= d.len() {
                    let bytes = if a.big_endian {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    let src = if a.big_endian {
                        &bytes[8 - width..]
                    } else {
                        &bytes[..width]
                    };
                    d[pos..pos + width].copy_from_slice(src);
                }
            }
        }
    }
    if i.is_multiple_of(2) {
        match a.seal {
            Seal::None => {}
            Seal::Vhd { at, len, field } => {
                let c = vhd_util::vhd_checksum(&d[at..at + len], field);
                d[at + field..at + field + 4].copy_from_slice(&c.to_be_bytes());
            }
            Seal::Crc { at, len } => {
                d[at + 4..at + 8].fill(0);
                let c = vdisk::crc::crc32c(&d[at..at + len]);
                d[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
    d
}

struct Base {
    /// The virtual disk the image holds.
    expect: Vec<u8>,
    image: Vec<u8>,
    parent: Option<Arc<Vec<u8>>>,
    areas: Vec<Area>,
}

fn patterned_raw() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let raw = common::sfdisk_raw(
        tmp.path(),
        "m.raw",
        4 << 20,
        "label: dos\n,1M,L\n,1M,E\n,512K,L\n,,L\n",
    );
    let mut d = std::fs::read(raw).unwrap();
    let mut rng = common::Rng(77);
    for (at, len) in [
        (1usize << 20, 8192usize),
        ((2 << 20) + 4096, 4096),
        ((4 << 20) - 65536, 65536),
    ] {
        for b in &mut d[at..at + len] {
            *b = rng.next() as u8;
        }
    }
    d
}

fn qemu(raw: &[u8], fmt: &str, opts: &str) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::qemu_image_from(raw, tmp.path(), "m.img", fmt, opts);
    std::fs::read(img).unwrap()
}

fn base(format: &str) -> Base {
    let raw = patterned_raw();
    let mut expect = raw.clone();
    let (image, parent) = match format {
        "vhd-dynamic" => (qemu(&raw, "vpc", "subformat=dynamic"), None),
        "vhd-fixed" => (qemu(&raw, "vpc", "subformat=fixed,force_size=on"), None),
        "vhdx" => (qemu(&raw, "vhdx", "block_size=1M,log_size=1M"), None),
        "vdi" => (qemu(&raw, "vdi", ""), None),
        "vmdk-sparse" => (qemu(&raw, "vmdk", ""), None),
        "vmdk-stream" => (qemu(&raw, "vmdk", "subformat=streamOptimized"), None),
        "qcow2" => (qemu(&raw, "qcow2", "cluster_size=4k,extended_l2=off"), None),
        "qcow2-zlib" => {
            let tmp = tempfile::tempdir().unwrap();
            let (src, img) = (tmp.path().join("m.raw"), tmp.path().join("m.qcow2"));
            // Compressible runs, so that clusters are stored compressed.
            for (i, b) in expect[(1 << 20)..(1 << 20) + 8192].iter_mut().enumerate() {
                *b = (i / 64) as u8;
            }
            std::fs::write(&src, &expect).unwrap();
            common::run(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4k",
                ]
                .into_iter()
                .chain([src.to_str().unwrap(), img.to_str().unwrap()])
                .collect::<Vec<_>>(),
            );
            (std::fs::read(img).unwrap(), None)
        }
        "qcow2-overlay" => {
            // A qcow2 over a raw backing file, served from memory.
            let tmp = tempfile::tempdir().unwrap();
            let img = tmp.path().join("child.qcow2");
            std::fs::write(tmp.path().join("parent.raw"), &raw).unwrap();
            common::run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"]
                    .into_iter()
                    .chain([
                        "-b",
                        "parent.raw",
                        "-F",
                        "raw",
                        "-u",
                        img.to_str().unwrap(),
                        "4M",
                    ])
                    .collect::<Vec<_>>(),
            );
            common::run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 209 4096 8192",
                    "-c",
                    "write -z 65536 4096",
                ]
                .into_iter()
                .chain(["-c", "write -P 210 3M 4096", img.to_str().unwrap()])
                .collect::<Vec<_>>(),
            );
            vhd_util::apply(
                &mut expect,
                &[(4096, vec![209; 8192]), (3 << 20, vec![210; 4096])],
            );
            expect[65536..65536 + 4096].fill(0);
            (std::fs::read(img).unwrap(), Some(Arc::new(raw.clone())))
        }
        "vhd-diff" => {
            let parent = qemu(&raw, "vpc", "subformat=dynamic");
            let tmp = tempfile::tempdir().unwrap();
            let ppath = tmp.path().join("parent.vhd");
            std::fs::write(&ppath, &parent).unwrap();
            let mut child = vhd_util::Child::new(vhd_util::parent_info(&ppath), 3);
            child.parent_name = "parent.vhd".into();
            child.locators = vec![
                vhd_util::w2ru(r".\parent.vhd", vhd_util::Space::Sectors),
                vhd_util::macx("file://./parent.vhd", vhd_util::Space::Bytes),
            ];
            child.data = vec![(4096, vec![0xD1; 8192]), (3 << 20, vec![0xD2; 4096])];
            vhd_util::apply(&mut expect, &child.data);
            (child.build(), Some(Arc::new(parent)))
        }
        "vhdx-dirty-log" => {
            let (image, disk) = dirty_vhdx();
            expect = disk;
            (image, None)
        }
        f => panic!("unknown format {f}"),
    };
    let areas = match format {
        "vhdx" => vhdx_areas(&image),
        "vhdx-dirty-log" => {
            // The log entry (sealed by its CRC-32C) and the headers naming it.
            let log = le64(&image, 64 * 1024 + 72) as usize;
            let len = le32(&image, log + 8) as usize;
            let mut v = vec![area(log, len, Seal::Crc { at: log, len }, false)];
            v.extend(
                vhdx_areas(&image)
                    .into_iter()
                    .filter(|a| a.start < 192 * 1024),
            );
            v
        }
        "vdi" => vdi_areas(&image),
        "vmdk-sparse" | "vmdk-stream" => vmdk_areas(&image),
        f if f.starts_with("qcow2") => qcow2_areas(&image),
        _ => vhd_areas(&image),
    };
    Base {
        expect,
        image,
        parent,
        areas,
    }
}

/// A VHDX whose headers name an active log: vdisk's template with one entry
/// that allocates block 0 (past the end of the file) and fills its first
/// sector. Read-only opens replay it in memory. Returns the file and its disk.
fn dirty_vhdx() -> (Vec<u8>, Vec<u8>) {
    use vdisk::vhdx::header::{self, SLOTS};
    let mut file = vdisk::fuzz::vhdx_template();
    let tlen = file.len() as u64;
    let (mut h, _) = header::read_current(&MemStorage::read_only(file.clone())).unwrap();
    h.log_guid = vdisk::fuzz::LOG_GUID;
    for (i, slot) in SLOTS.iter().enumerate() {
        h.sequence += i as u64;
        let b = h.encode();
        file[*slot as usize..*slot as usize + b.len()].copy_from_slice(&b);
    }
    let regions = vdisk::vhdx::region::read(&MemStorage::read_only(file.clone()), tlen).unwrap();
    let bat = regions.bat.offset as usize;
    let mut bat_sector = file[bat..bat + 4096].to_vec();
    bat_sector[..8].copy_from_slice(&(tlen | 6).to_le_bytes());
    let sector: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut e =
        vdisk::fuzz::vhdx_log_entry(1, 0, tlen, &[(bat as u64, &bat_sector), (tlen, &sector)]);
    e[56..64].copy_from_slice(&(tlen + (1 << 20)).to_le_bytes());
    e[4..8].fill(0);
    let crc = vdisk::crc::crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    let log = h.log_offset as usize;
    file[log..log + e.len()].copy_from_slice(&e);
    let mut disk = vec![0u8; 2 << 20];
    disk[..4096].copy_from_slice(&sector);
    (file, disk)
}

/// Opens `data` read-only and reads a sample of the disk.
fn open_and_read(
    data: Vec<u8>,
    parent: Option<Arc<Vec<u8>>>,
    writes: &Arc<AtomicUsize>,
) -> Result<u64, vdisk::Error> {
    let storage = Watched {
        inner: MemStorage::read_only(data),
        writes: writes.clone(),
    };
    let opener = MemParent {
        data: parent,
        writes: writes.clone(),
    };
    let disk = vdisk::open_disk(
        Box::new(storage),
        Path::new("/m/child.img"),
        OpenOptions { writable: false },
        &opener,
    )?;
    let n = vdisk::fuzz::read_sample(&disk);
    let _ = vdisk::part::partitions(&disk);
    // A write must be refused without touching the file.
    let _ = disk.write_at(&[1u8; 512], 0);
    let _ = disk.flush();
    Ok(n)
}

/// The batch for one format; runs in the child process.
fn run_batch(format: &str) {
    let b = base(format);
    // The unmutated image must open and read like qemu does.
    let writes = Arc::new(AtomicUsize::new(0));
    open_and_read(b.image.clone(), b.parent.clone(), &writes)
        .unwrap_or_else(|e| panic!("{format}: base image: {e}"));
    let storage = MemStorage::read_only(b.image.clone());
    let opener = MemParent {
        data: b.parent.clone(),
        writes: writes.clone(),
    };
    let disk = vdisk::open_disk(
        Box::new(storage),
        Path::new("/m/child.img"),
        OpenOptions { writable: false },
        &opener,
    )
    .unwrap();
    let got = common::read_all(&disk);
    let n = got.len().min(b.expect.len());
    assert!(
        n >= 2 << 20 && got[..n] == b.expect[..n],
        "{format}: the base image does not read as its raw disk"
    );
    std::panic::set_hook(Box::new(|info| eprintln!("PANIC {info}")));
    let (mut crashes, mut hangs, mut write_count, mut opened) = (0usize, 0usize, 0usize, 0usize);
    let mut slowest = Duration::ZERO;
    for i in 0..PER_FORMAT {
        let m = mutate(&b.image, &b.areas, i);
        let writes = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| {
            open_and_read(m, b.parent.clone(), &writes)
        }));
        let took = t.elapsed();
        slowest = slowest.max(took);
        match r {
            Err(_) => {
                crashes += 1;
                eprintln!("CRASH {format} mutant {i}");
            }
            Ok(Ok(_)) => opened += 1,
            Ok(Err(_)) => {}
        }
        if took > Duration::from_millis(250) {
            eprintln!("SLOW {format} mutant {i}: {took:?}");
        }
        if took > MUTANT_LIMIT {
            hangs += 1;
            eprintln!("HANG {format} mutant {i}: {took:?}");
        }
        if writes.load(Ordering::SeqCst) != 0 {
            write_count += 1;
            eprintln!(
                "WRITE {format} mutant {i}: {} calls",
                writes.load(Ordering::SeqCst)
            );
        }
    }
    println!(
        "RESULT {format} mutants={PER_FORMAT} opened={opened} crashes={crashes} hangs={hangs} writes={write_count} slowest_ms={}",
        slowest.as_millis()
    );
}

/// The child entry point: runs the batch named by the environment.
#[test]
#[ignore = "run by mutants_do_not_crash_hang_or_write in a child process"]
fn mutant_batch_child() {
    let format = std::env::var(CHILD_ENV).expect("run through mutants_do_not_crash_hang_or_write");
    run_batch(&format);
}

#[test]
fn mutants_do_not_crash_hang_or_write() {
    let exe = std::env::current_exe().unwrap();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for format in FORMATS {
        let t = Instant::now();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {ULIMIT_KB}; exec \"$0\" \"$@\""))
            .arg(&exe)
            .args([
                "--exact",
                "mutant_batch_child",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, format)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drain the pipes in threads so the child never blocks on them.
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            io::Read::read_to_string(&mut so, &mut s).ok();
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            io::Read::read_to_string(&mut se, &mut s).ok();
            s
        });
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > BATCH_LIMIT {
                child.kill().ok();
                child.wait().ok();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (out, err) = (out_t.join().unwrap(), err_t.join().unwrap());
        let result = out
            .lines()
            .find_map(|l| l.find("RESULT ").map(|i| l[i + 7..].to_string()));
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        match (status, result) {
            (None, _) => failures.push(format!("{format}: batch hung (over {BATCH_LIMIT:?})")),
            (Some(s), Some(r)) if s.success() => {
                if !r.contains("crashes=0 hangs=0 writes=0") {
                    failures.push(format!(
                        "{r}\n{}",
                        err.lines()
                            .filter(|l| !l.starts_with("PANIC"))
                            .take(20)
                            .collect::<Vec<_>>()
                            .join("\n")
                    ));
                }
                report.push(format!("{r} ({:.1} s)", t.elapsed().as_secs_f64()));
            }
            (Some(s), _) => failures.push(format!(
                "{format}: child failed ({s}), under ulimit -v {ULIMIT_KB}:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )),
        }
    }
    for r in &report {
        println!("{r}");
    }
    assert!(
        failures.is_empty(),
        "mutation test failures:\n{}",
        failures.join("\n\n")
    );
}
