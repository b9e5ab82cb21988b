//! Entry points for the fuzz targets (`fuzz/`) and for the test that replays
//! their regression corpus (`tests/fuzz_regressions.rs`). Not a stable API.
//!
//! Every target takes arbitrary bytes, must return (never panic, hang or
//! allocate without bound) and never writes: images are opened read-only over
//! a read-only [`MemStorage`], parents are refused.
//!
//! # Sparse file encoding
//!
//! Image files are megabytes of mostly zeros (a VHDX puts its regions at
//! 1 MiB boundaries), too big for a fuzzer to mutate usefully. The image
//! targets therefore take a *sparse file*: a little-endian `u32` header whose
//! low 31 bits are the file length in 512-byte units (capped at
//! [`MAX_FILE`]) and whose top bit selects 4096-byte sectors for the raw disk
//! of [`partitions`]; then records `u32 offset, u16 length, bytes` copied
//! into an otherwise zero file (clipped at its end; a short last record
//! copies what is there). [`encode_sparse`] makes one from a real file.

use std::path::Path;

use crate::vhdx::guid::Guid;
use crate::{Disk, Error, Format, MemStorage, ParentOpener, Result, Storage};

/// Largest file a sparse input decodes to.
pub const MAX_FILE: u64 = 32 << 20;
/// Most bytes a target reads from one virtual disk.
pub const READ_CAP: u64 = 8 << 20;
/// The log GUID of the [`vhdx_log`] target's template.
pub const LOG_GUID: Guid = Guid([
    0x6c, 0x6f, 0x67, 0x20, 0x66, 0x75, 0x7a, 0x7a, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80,
]);

/// A parent opener that refuses everything.
pub struct NoParents;

impl ParentOpener for NoParents {
    fn open_parent(&self, path: &Path) -> std::io::Result<Box<dyn Storage>> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("fuzzing: no parents ({})", path.display()),
        ))
    }
    fn list_dir(&self, _: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        Ok(Vec::new())
    }
}

/// Decodes a sparse file: the bytes and whether 4096-byte sectors were asked for.
pub fn decode_sparse(data: &[u8]) -> (Vec<u8>, bool) {
    if data.len() < 4 {
        return (data.to_vec(), false);
    }
    let head = u32::from_le_bytes(data[..4].try_into().unwrap());
    let len = ((head & 0x7FFF_FFFF) as u64 * 512).min(MAX_FILE) as usize;
    let mut file = vec![0u8; len];
    let mut rest = &data[4..];
    while rest.len() >= 6 {
        let off = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let n = u16::from_le_bytes([rest[4], rest[5]]) as usize;
        rest = &rest[6..];
        let n = n.min(rest.len());
        if off < len {
            let m = n.min(len - off);
            file[off..off + m].copy_from_slice(&rest[..m]);
        }
        rest = &rest[n..];
    }
    (file, head & 0x8000_0000 != 0)
}

/// Encodes `file` (length rounded up to 512 bytes) as a sparse file: one
/// record per run of non-zero 512-byte sectors, at most 32 KiB each.
pub fn encode_sparse(file: &[u8], sector_4k: bool) -> Vec<u8> {
    let sectors = file.len().div_ceil(512) as u32;
    let mut out = (sectors | if sector_4k { 0x8000_0000 } else { 0 })
        .to_le_bytes()
        .to_vec();
    let nonzero = |s: usize| {
        file[s * 512..((s + 1) * 512).min(file.len())]
            .iter()
            .any(|&b| b != 0)
    };
    let mut s = 0usize;
    let total = sectors as usize;
    while s < total {
        if !nonzero(s) {
            s += 1;
            continue;
        }
        let start = s;
        while s < total && nonzero(s) && s - start < 64 {
            s += 1;
        }
        let (a, b) = (start * 512, (s * 512).min(file.len()));
        out.extend_from_slice(&(a as u32).to_le_bytes());
        out.extend_from_slice(&((b - a) as u16).to_le_bytes());
        out.extend_from_slice(&file[a..b]);
    }
    out
}

/// Reads a capped sample of `disk` in odd-sized chunks: the first and last
/// MiB and blocks spread over the rest, at most [`READ_CAP`] bytes. Returns
/// how many bytes were read (errors end a chunk, not the sample).
pub fn read_sample(disk: &Disk) -> u64 {
    let size = disk.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut read_range = |start: u64, len: u64, total: &mut u64| {
        let end = start.saturating_add(len).min(size);
        let mut off = start;
        let mut step = 4096 + 511;
        while off < end && *total < READ_CAP {
            let n = (step as u64).min(end - off) as usize;
            if disk.read_at(&mut buf[..n], off).is_ok() {
                *total += n as u64;
            } else {
                *total += 1;
            }
            off += n as u64;
            step = (step * 3 + 7) % ((1 << 20) - 1) + 1;
        }
    };
    if size <= 4 << 20 {
        read_range(0, size, &mut total);
        return total;
    }
    read_range(0, 1 << 20, &mut total);
    read_range(size - (1 << 20), 1 << 20, &mut total);
    // 64 samples of 64 KiB spread over the disk.
    let stride = size / 64;
    for i in 1..64 {
        read_range(i * stride, 64 << 10, &mut total);
    }
    total
}

/// Opens `file` read-only as `format` (or by probing, for `None`) without
/// parents, then reads a sample. `Err` is a refusal, which is fine.
pub fn open_read(file: Vec<u8>, format: Option<Format>) -> Result<u64> {
    let storage = Box::new(MemStorage::read_only(file));
    let format = match format {
        Some(f) => f,
        None => crate::probe(storage.as_ref())?.ok_or(Error::NotAnImage)?,
    };
    let path = Path::new("/fuzz/image");
    let image = crate::open_image(
        storage,
        format,
        path,
        crate::OpenOptions { writable: false },
    )?;
    // Parent discovery runs (and is refused); the child reads zeros for what it
    // does not hold.
    let _ = image.find_parent(path, &NoParents);
    let _ = image.describe();
    let disk = Disk::new(vec![image])?;
    let n = read_sample(&disk);
    let _ = crate::part::partitions(&disk);
    Ok(n)
}

/// The image targets: a sparse file opened as `format`.
pub fn open_sparse(data: &[u8], format: Option<Format>) -> Result<u64> {
    open_read(decode_sparse(data).0, format)
}

/// The partition target: a sparse file as a raw disk, its partition table parsed.
pub fn partitions(data: &[u8]) -> Result<usize> {
    let (file, big) = decode_sparse(data);
    let disk = Disk::new(vec![Box::new(crate::RawImage::new(
        Box::new(MemStorage::read_only(file)),
        if big { 4096 } else { 512 },
    )?)])?;
    let parts = crate::part::partitions(&disk)?;
    for p in &parts {
        assert!(
            p.start
                .checked_add(p.size)
                .is_some_and(|e| e <= disk.size()),
            "partition outside the disk: {p:?}"
        );
        let _ = p.type_description();
    }
    Ok(parts.len())
}

/// A dynamic 2 MiB VHDX with 1 MiB blocks and a 1 MiB log, made by vdisk.
pub fn vhdx_template() -> Vec<u8> {
    static TEMPLATE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let s = MemStorage::new(Vec::new());
            let mut opts = crate::vhdx::create::CreateOptions::dynamic(2 << 20);
            opts.block_size = 1 << 20;
            crate::vhdx::create::create(&s, &opts).expect("VHDX template");
            s.into_inner()
        })
        .clone()
}

/// Where the template's log lies.
pub fn vhdx_template_log() -> (u64, u64) {
    let t = vhdx_template();
    let (h, _) =
        crate::vhdx::header::read_current(&MemStorage::read_only(t)).expect("template header");
    (h.log_offset, h.log_length as u64)
}

/// The log target: `data` is the content of the log region of the template
/// VHDX (at most the log's length), whose headers name [`LOG_GUID`] as the
/// active log. The file is opened read-only (the log is replayed in memory)
/// and read. If `data` is longer than the log, the rest extends the file.
///
/// So that the fuzzer gets past the checksums, the CRC-32C of every entry
/// header (`loge` at a 4 KiB boundary of `data`, its length inside `data`)
/// is recomputed first; damaged checksums are the mutation test's job.
pub fn vhdx_log(data: &[u8]) -> Result<u64> {
    let mut data = data.to_vec();
    let mut pos = 0usize;
    while pos + 12 <= data.len() {
        let len = u32::from_le_bytes(data[pos + 8..pos + 12].try_into().unwrap()) as usize;
        if &data[pos..pos + 4] == b"loge" && len >= 64 && len <= data.len() - pos {
            data[pos + 4..pos + 8].fill(0);
            let crc = crate::crc::crc32c(&data[pos..pos + len]);
            data[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        }
        pos += 4096;
    }
    let data = &data[..];
    use crate::vhdx::header::{self, SLOTS};
    let mut file = vhdx_template();
    let (mut h, _) = header::read_current(&MemStorage::read_only(file.clone()))?;
    h.log_guid = LOG_GUID;
    for (i, slot) in SLOTS.iter().enumerate() {
        h.sequence += i as u64;
        let b = h.encode();
        file[*slot as usize..*slot as usize + b.len()].copy_from_slice(&b);
    }
    let (off, len) = (h.log_offset as usize, h.log_length as usize);
    let n = data.len().min(len);
    file[off..off + n].copy_from_slice(&data[..n]);
    if data.len() > len {
        let extra = (data.len() - len).min(MAX_FILE as usize);
        file.extend_from_slice(&data[len..len + extra]);
    }
    open_read(file, Some(Format::Vhdx))
}

/// A log entry for [`vhdx_log`] seeds: `sectors` written at log position `tail`.
pub fn vhdx_log_entry(seq: u64, tail: u64, file_len: u64, sectors: &[(u64, &[u8])]) -> Vec<u8> {
    crate::vhdx::log::encode_entry(LOG_GUID, seq, tail, file_len, sectors)
}

/// Runs `target` on `data` by name (the regression replay uses the file's folder name).
pub fn run_target(target: &str, data: &[u8]) -> Option<bool> {
    let ok = match target {
        "open_vhd" => open_sparse(data, Some(Format::Vhd)).is_ok(),
        "open_vhdx" => open_sparse(data, Some(Format::Vhdx)).is_ok(),
        "open_vdi" => open_sparse(data, Some(Format::Vdi)).is_ok(),
        "open_qcow2" => open_sparse(data, Some(Format::Qcow2)).is_ok(),
        "open_any" => open_sparse(data, None).is_ok(),
        "vhdx_log" => vhdx_log(data).is_ok(),
        "partitions" => partitions(data).is_ok(),
        "open_vmdk" => open_vmdk(data).is_ok(),
        _ => return None,
    };
    Some(ok)
}

/// Serves one in-memory file, read-only, for every extent path.
struct OneExtent(Vec<u8>);

impl ParentOpener for OneExtent {
    fn open_parent(&self, _: &Path) -> std::io::Result<Box<dyn Storage>> {
        Ok(Box::new(MemStorage::read_only(self.0.clone())))
    }
    fn list_dir(&self, _: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        Ok(Vec::new())
    }
}

/// The VMDK target: a sparse file. A sparse extent (`KDMV`, `COWD`) is
/// opened alone; otherwise the bytes up to the first NUL are a text
/// descriptor and the rest, from the next 512-byte boundary, is the file
/// every extent line opens (flat or sparse).
pub fn open_vmdk(data: &[u8]) -> Result<u64> {
    let (file, _) = decode_sparse(data);
    if file.starts_with(b"KDMV") || file.starts_with(b"COWD") {
        return open_read(file, Some(Format::Vmdk));
    }
    let nul = file.iter().position(|&b| b == 0).unwrap_or(file.len());
    let rest = file.get(nul.div_ceil(512) * 512..).unwrap_or(&[]).to_vec();
    let path = Path::new("/fuzz/image.vmdk");
    let image = crate::open_image_with(
        Box::new(MemStorage::read_only(file[..nul].to_vec())),
        Format::Vmdk,
        path,
        crate::OpenOptions { writable: false },
        &OneExtent(rest),
    )?;
    let _ = image.describe();
    let disk = Disk::new(vec![image])?;
    Ok(read_sample(&disk))
}
