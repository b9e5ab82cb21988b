//! Creating VHD files: fixed, dynamic and differencing.
//!
//! Layouts (as QEMU's, with the locators of a child after the BAT):
//! * fixed: `[data][footer]`, the data a hole of the file;
//! * dynamic / differencing: `[footer copy][dynamic header at 512][BAT at
//!   1536, padded to 512][locator data...][footer]`; blocks are added by the
//!   writer (`VhdImage::write`) past every structure, data 4 KiB aligned.
//!
//! The footer sizes the disk by `current_size`: the creator application is
//! `vhio`, and QEMU (10 and later), libvhdi, Hyper-V and this crate take
//! `current_size` for every creator but Virtual PC and old QEMU. The CHS
//! geometry is the spec's, which rounds down, so the size need not be a
//! whole number of cylinders.

use crate::bytes::{be32, put_be16, put_be32, put_be64};
use crate::create::{Links, NewImage, random_id, unix_now};
use crate::vhd::dynamic_header::{
    COOKIE as HEADER_COOKIE, DynamicHeader, HEADER_SIZE, ParentLocator,
};
use crate::vhd::footer::{COOKIE, DiskType, FOOTER_SIZE, Footer, NO_DATA_OFFSET};
use crate::{Error, Format, Geometry, Result, Storage};

/// The spec's default block size; also the largest blktap accepts.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Accepted block sizes (the parser's range).
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 28;
/// Creator application written into new footers.
pub const CREATOR_APP: &[u8; 4] = b"vhio";
/// Largest disk: block offsets are 32-bit sector numbers (blocks start below
/// 2 TiB in the file), and QEMU refuses more than 0xFF000000 sectors.
pub const MAX_SIZE: u64 = 0xFF00_0000 * 512;
/// VHD time stamps count seconds from 2000-01-01 00:00 UTC.
const EPOCH_2000: u64 = 946_684_800;
/// Where QEMU and this module put the dynamic header and the BAT.
const HEADER_OFFSET: u64 = 512;
const BAT_OFFSET: u64 = 1536;

/// Cylinders, heads and sectors per track for `size` bytes, by the algorithm
/// of the VHD specification's appendix (rounds down).
pub fn chs_geometry(size: u64) -> Geometry {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    Geometry {
        cylinders: (cth / heads) as u32,
        heads: heads as u32,
        sectors: spt as u32,
    }
}

/// VHD time stamp of now.
fn timestamp() -> u32 {
    unix_now().saturating_sub(EPOCH_2000).min(u32::MAX as u64) as u32
}

/// A new footer.
pub(crate) fn footer(
    kind: DiskType,
    size: u64,
    geometry: Geometry,
    id: [u8; 16],
) -> Result<Footer> {
    let mut b = [0u8; FOOTER_SIZE];
    b[..8].copy_from_slice(COOKIE);
    put_be32(&mut b, 8, 2); // features: reserved bit, always set
    put_be32(&mut b, 12, 0x0001_0000);
    put_be64(
        &mut b,
        16,
        if kind.is_sparse() {
            HEADER_OFFSET
        } else {
            NO_DATA_OFFSET
        },
    );
    put_be32(&mut b, 24, timestamp());
    b[28..32].copy_from_slice(CREATOR_APP);
    let version = env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap_or(0) << 16
        | env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap_or(0);
    put_be32(&mut b, 32, version);
    b[36..40].copy_from_slice(b"Wi2k");
    put_be64(&mut b, 40, size);
    put_be64(&mut b, 48, size);
    put_be16(&mut b, 56, geometry.cylinders.min(65535) as u16);
    b[58] = geometry.heads.min(255) as u8;
    b[59] = geometry.sectors.min(255) as u8;
    put_be32(&mut b, 60, kind.code());
    b[68..84].copy_from_slice(&id);
    let f = Footer::parse(&b)?;
    Ok(Footer {
        raw: f.encode(),
        ..f
    })
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_SIZE {
        return Err(Error::unsupported(format!(
            "VHD virtual size {size} (1 sector to 2040 GiB)"
        )));
    }
    Ok(())
}

fn check_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::unsupported(format!(
            "VHD block size {block_size} (a power of two, 512 B to 256 MiB)"
        )));
    }
    Ok(())
}

/// Writes a new fixed or dynamic VHD of `size` bytes (a multiple of 512) into
/// `storage` (empty).
pub fn create(storage: &dyn Storage, size: u64, fixed: bool, block_size: u32) -> Result<NewImage> {
    check_size(size)?;
    let id = random_id()?;
    if fixed {
        let f = footer(DiskType::Fixed, size, chs_geometry(size), id)?;
        storage.set_len(size)?;
        storage.write_all_at(&f.encode(), size)?;
        storage.sync()?;
        return Ok(NewImage {
            format: Format::Vhd,
            size,
            block_size: None,
            logical_sector_size: 512,
            fixed: true,
            link_id: id,
            parent_id: None,
        });
    }
    check_block_size(block_size)?;
    let f = footer(DiskType::Dynamic, size, chs_geometry(size), id)?;
    write_sparse(storage, &f, size, block_size, None)?;
    Ok(NewImage {
        format: Format::Vhd,
        size,
        block_size: Some(block_size),
        logical_sector_size: 512,
        fixed: false,
        link_id: id,
        parent_id: None,
    })
}

/// What a differencing header says about its parent.
struct ParentFields<'a> {
    unique_id: [u8; 16],
    timestamp: u32,
    links: &'a Links,
}

/// The locators of a child: (platform code, payload).
pub(crate) fn locators(links: &Links) -> Vec<([u8; 4], Vec<u8>)> {
    let utf16le = |s: &str| {
        s.encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>()
    };
    vec![
        (*b"W2ru", utf16le(&links.relative_windows())),
        (*b"W2ku", utf16le(&links.absolute_windows())),
        (
            *b"MacX",
            format!("file://{}", url_escape(&links.absolute)).into_bytes(),
        ),
    ]
}

/// Percent-escapes what may not stand in a file URL path (RFC 2396).
fn url_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Header, BAT (all unused), locators and both footers of a sparse disk.
fn write_sparse(
    storage: &dyn Storage,
    f: &Footer,
    size: u64,
    block_size: u32,
    parent: Option<ParentFields>,
) -> Result<()> {
    let entries = size.div_ceil(block_size as u64);
    let entries = u32::try_from(entries)
        .map_err(|_| Error::unsupported(format!("VHD of {entries} blocks")))?;
    let bat_len = (entries as u64 * 4).next_multiple_of(512);
    let mut end = BAT_OFFSET + bat_len;

    let mut h = [0u8; HEADER_SIZE];
    h[..8].copy_from_slice(HEADER_COOKIE);
    put_be64(&mut h, 8, u64::MAX);
    put_be64(&mut h, 16, BAT_OFFSET);
    put_be32(&mut h, 24, 0x0001_0000);
    put_be32(&mut h, 28, entries);
    put_be32(&mut h, 32, block_size);
    let mut payloads = Vec::new();
    if let Some(p) = &parent {
        h[40..56].copy_from_slice(&p.unique_id);
        put_be32(&mut h, 56, p.timestamp);
        let name: Vec<u16> = p.links.file_name.encode_utf16().collect();
        if name.len() > 256 {
            return Err(Error::unsupported(
                "VHD parent file name longer than 256 UTF-16 units",
            ));
        }
        for (i, u) in name.iter().enumerate() {
            put_be16(&mut h, 64 + 2 * i, *u);
        }
        for (i, (code, data)) in locators(p.links).into_iter().enumerate() {
            let space = (data.len() as u64).max(1).next_multiple_of(512);
            let loc = ParentLocator {
                platform_code: code,
                // Bytes, as Windows and blktap write (a multiple of 512, so
                // blktap's rule reads it as bytes too).
                data_space: space as u32,
                data_length: data.len() as u32,
                data_offset: end,
            };
            let o = 576 + 24 * i;
            h[o..o + 4].copy_from_slice(&loc.platform_code);
            put_be32(&mut h, o + 4, loc.data_space);
            put_be32(&mut h, o + 8, loc.data_length);
            put_be64(&mut h, o + 16, loc.data_offset);
            payloads.push((end, data));
            end += space;
        }
    }
    let header = DynamicHeader::parse(&h)?;

    storage.set_len(end + FOOTER_SIZE as u64)?;
    storage.write_all_at(&f.encode(), 0)?;
    storage.write_all_at(&header.encode(), HEADER_OFFSET)?;
    storage.write_all_at(&vec![0xFF; bat_len as usize], BAT_OFFSET)?;
    for (at, data) in payloads {
        storage.write_all_at(&data, at)?;
    }
    storage.write_all_at(&f.encode(), end)?;
    storage.sync()?;
    Ok(())
}

/// Makes `child` a differencing VHD of the VHD in `parent`.
pub fn snapshot(parent: &dyn Storage, child: &dyn Storage, links: &Links) -> Result<NewImage> {
    let len = parent.len()?;
    let pf = crate::vhd::read_footer(parent, len)?;
    let size = pf.virtual_size();
    check_size(size)?;
    let block_size = match pf.disk_type {
        DiskType::Fixed => DEFAULT_BLOCK_SIZE,
        _ => {
            let mut raw = [0u8; HEADER_SIZE];
            let at = pf.data_offset;
            if at == NO_DATA_OFFSET || at.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
                return Err(Error::corrupt(
                    "VHD footer",
                    format!("dynamic header offset {at}"),
                ));
            }
            parent.read_exact_at(&mut raw, at)?;
            DynamicHeader::parse(&raw)?.block_size
        }
    };
    check_block_size(block_size)?;
    let id = random_id()?;
    // The child shows the parent's disk: same size and geometry.
    let f = footer(DiskType::Differencing, size, pf.geometry, id)?;
    let fields = ParentFields {
        unique_id: pf.unique_id,
        timestamp: be32(&pf.raw, 24),
        links,
    };
    write_sparse(child, &f, size, block_size, Some(fields))?;
    Ok(NewImage {
        format: Format::Vhd,
        size,
        block_size: Some(block_size),
        logical_sector_size: 512,
        fixed: false,
        link_id: id,
        parent_id: Some(pf.unique_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_spec_and_qemu() {
        // qemu-img create -f vpc 100M: 1004/12/17 (rounded up to CHS by qemu).
        let g = chs_geometry(104_865_792);
        assert_eq!((g.cylinders, g.heads, g.sectors), (1004, 12, 17));
        let g = chs_geometry(200 << 30);
        assert_eq!((g.cylinders, g.heads, g.sectors), (65535, 16, 255));
        let g = chs_geometry(4 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors), (120, 4, 17));
    }

    #[test]
    fn url_escapes() {
        assert_eq!(url_escape("/a b/c%d.vhd"), "/a%20b/c%25d.vhd");
    }
}
