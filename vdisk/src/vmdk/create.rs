//! Creating VMDK images: monolithicSparse (one file, through
//! [`crate::create`]), the multi-file kinds through [`create_files`] (the
//! caller makes the files [`extent_names`] lists), and children
//! ("snapshots", monolithicSparse with `parentCID` and
//! `parentFileNameHint`).
//!
//! Sparse extents are laid out as qemu and VMware do: header, embedded
//! descriptor (monolithic only, 20 sectors), redundant grain directory and
//! its tables, grain directory and its tables, grains from the next grain
//! boundary. Every grain table is preallocated.

use super::descriptor::{self, Descriptor, NO_PARENT};
use super::header::{self, FLAG_NEWLINE_TEST, FLAG_REDUNDANT_GT, SparseHeader};
use crate::create::Links;
use crate::{Error, Format, NewImage, Result, Storage};

/// 64 KiB grains (128 sectors), VMware's and qemu's default.
pub const DEFAULT_GRAIN: u32 = 64 << 10;
/// Extent size of the twoGbMaxExtent kinds (qemu's: 2 GiB less nothing).
pub const TWO_GB_EXTENT: u64 = 2 << 30;
const GTES: u32 = 512;
const DESC_SECTORS: u64 = 20;

/// The kinds [`create_files`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    MonolithicSparse,
    MonolithicFlat,
    TwoGbMaxExtentSparse,
    TwoGbMaxExtentFlat,
}

impl Subformat {
    pub fn parse(s: &str) -> Result<Subformat> {
        Ok(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => {
                return Err(Error::unsupported(
                    "creating streamOptimized VMDKs (read-only here; qemu-img convert -O vmdk -o subformat=streamOptimized makes them)",
                ));
            }
            _ => {
                return Err(Error::unsupported(format!(
                    "VMDK subformat '{s}' (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat)"
                )));
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
        }
    }
    fn sparse(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicSparse | Subformat::TwoGbMaxExtentSparse
        )
    }
}

/// The extent files (name, bytes of disk) a descriptor file named `name`
/// uses, as qemu names them: `d-flat.vmdk`, `d-s001.vmdk`, `d-f001.vmdk`.
/// Empty for monolithicSparse (the descriptor file is the extent).
pub fn extent_names(sub: Subformat, name: &str, size: u64) -> Vec<(String, u64)> {
    let stem = name.strip_suffix(".vmdk").unwrap_or(name);
    match sub {
        Subformat::MonolithicSparse => Vec::new(),
        Subformat::MonolithicFlat => vec![(format!("{stem}-flat.vmdk"), size)],
        Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat => {
            let letter = if sub.sparse() { 's' } else { 'f' };
            let n = size.div_ceil(TWO_GB_EXTENT);
            (0..n)
                .map(|i| {
                    let len = TWO_GB_EXTENT.min(size - i * TWO_GB_EXTENT);
                    (format!("{stem}-{letter}{:03}.vmdk", i + 1), len)
                })
                .collect()
        }
    }
}

/// Descriptor text.
fn descriptor_text(
    cid: u32,
    parent: Option<(u32, &str)>,
    create_type: &str,
    extents: &[String],
    sectors: u64,
) -> String {
    let (parent_cid, hint) = match parent {
        Some((c, h)) => (c, format!("parentFileNameHint=\"{h}\"\n")),
        None => (NO_PARENT, String::new()),
    };
    let (heads, spt) = (16u64, 63u64);
    let cylinders = (sectors / (heads * spt)).clamp(1, 16383);
    format!(
        "{}\nversion=1\nCID={cid:08x}\nparentCID={parent_cid:08x}\ncreateType=\"{create_type}\"\n{hint}\n\
         # Extent description\n{}\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"{spt}\"\nddb.adapterType = \"ide\"\n",
        descriptor::MAGIC_LINE,
        extents.join("\n")
    )
}

/// Writes an empty sparse extent of `sectors` into `storage`, with `desc`
/// embedded if given.
fn write_sparse(storage: &dyn Storage, sectors: u64, grain: u64, desc: Option<&str>) -> Result<()> {
    let gs = grain / 512;
    let coverage = gs * GTES as u64;
    let tables = sectors.div_ceil(coverage);
    let gd_sectors = (tables * 4).div_ceil(512);
    let gt_sectors = (GTES as u64 * 4).div_ceil(512);
    let (desc_offset, desc_size) = if desc.is_some() {
        (1, DESC_SECTORS)
    } else {
        (0, 0)
    };
    let rgd = 1 + desc_size;
    let gd = rgd + gd_sectors + tables * gt_sectors;
    let end = gd + gd_sectors + tables * gt_sectors;
    let overhead = end.div_ceil(gs) * gs;
    if overhead + sectors > (u32::MAX as u64) {
        return Err(Error::unsupported(
            "a sparse VMDK extent of more than 2 TiB (use twoGbMaxExtentSparse)",
        ));
    }
    let h = SparseHeader {
        cowd: false,
        version: 1,
        flags: FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT,
        capacity: sectors,
        grain_sectors: gs,
        desc_offset,
        desc_size,
        gtes_per_gt: GTES,
        rgd_offset: rgd,
        gd_offset: gd,
        overhead,
        compress: 0,
    };
    let mut meta = vec![0u8; (overhead * 512) as usize];
    meta[..512].copy_from_slice(&h.encode());
    if let Some(d) = desc {
        if d.len() as u64 > DESC_SECTORS * 512 {
            return Err(Error::unsupported("a VMDK descriptor of more than 10 KiB"));
        }
        meta[512..512 + d.len()].copy_from_slice(d.as_bytes());
    }
    for (dir, first_table) in [(rgd, rgd + gd_sectors), (gd, gd + gd_sectors)] {
        for t in 0..tables {
            let at = (dir * 512 + t * 4) as usize;
            let table = (first_table + t * gt_sectors) as u32;
            meta[at..at + 4].copy_from_slice(&table.to_le_bytes());
        }
    }
    storage.write_all_at(&meta, 0)?;
    Ok(())
}

fn check_new(storage: &dyn Storage) -> Result<()> {
    if !storage.is_writable() {
        return Err(Error::ReadOnly);
    }
    if storage.len()? != 0 {
        return Err(Error::unsupported("creating an image needs an empty file"));
    }
    Ok(())
}

fn check_grain(grain: u32) -> Result<u64> {
    let g = grain as u64;
    if !(512..=(header::MAX_GRAIN_SECTORS * 512)).contains(&g) || !g.is_power_of_two() {
        return Err(Error::unsupported(format!(
            "VMDK grain size {grain} (a power of two, 512 bytes to 1 GiB)"
        )));
    }
    Ok(g)
}

fn new_image(
    size: u64,
    grain: Option<u32>,
    fixed: bool,
    cid: u32,
    parent: Option<u32>,
) -> NewImage {
    NewImage {
        format: Format::Vmdk,
        size,
        block_size: grain,
        logical_sector_size: 512,
        fixed,
        link_id: super::cid_id(cid),
        parent_id: parent.map(super::cid_id),
    }
}

/// A new monolithicSparse image in `storage` (`fixed` is refused: a flat
/// VMDK is two files, see [`create_files`]).
pub fn create(storage: &dyn Storage, size: u64, fixed: bool, grain: u32) -> Result<NewImage> {
    create_named(storage, size, fixed, grain, "disk.vmdk")
}

/// [`create`], the embedded descriptor naming the file `name` (VMware reads
/// the extent line; qemu and this crate take the file itself).
fn create_named(
    storage: &dyn Storage,
    size: u64,
    fixed: bool,
    grain: u32,
    name: &str,
) -> Result<NewImage> {
    if fixed {
        return Err(Error::unsupported(
            "a fixed VMDK in one file (monolithicFlat is a descriptor and a flat file: vhdio create -f vmdk -o subformat=monolithicFlat)",
        ));
    }
    check_new(storage)?;
    let g = check_grain(grain)?;
    let sectors = size.div_ceil(512);
    let cid = super::new_cid(NO_PARENT);
    let ext = format!("RW {sectors} SPARSE \"{name}\"");
    let text = descriptor_text(cid, None, "monolithicSparse", &[ext], sectors);
    write_sparse(storage, sectors, g, Some(&text))?;
    Ok(new_image(sectors * 512, Some(grain), false, cid, None))
}

/// Writes a `sub` image: the descriptor into `descriptor` (a file named
/// `name`), the extents into `extents`, one per entry of
/// [`extent_names`]`(sub, name, size)`, all empty and writable.
pub fn create_files(
    sub: Subformat,
    name: &str,
    size: u64,
    grain: u32,
    descriptor: &dyn Storage,
    extents: &[&dyn Storage],
) -> Result<NewImage> {
    let size = size.div_ceil(512) * 512;
    if size == 0 {
        return Err(Error::unsupported("a virtual disk of 0 bytes"));
    }
    if sub == Subformat::MonolithicSparse {
        return create_named(descriptor, size, false, grain, name);
    }
    check_new(descriptor)?;
    let names = extent_names(sub, name, size);
    if names.len() != extents.len() {
        return Err(Error::unsupported(format!(
            "{} extent files for {} extents",
            extents.len(),
            names.len()
        )));
    }
    let g = check_grain(grain)?;
    let mut lines = Vec::new();
    for ((file, len), s) in names.iter().zip(extents) {
        check_new(*s)?;
        let sectors = len / 512;
        if sub.sparse() {
            write_sparse(*s, sectors, g, None)?;
            lines.push(format!("RW {sectors} SPARSE \"{file}\""));
        } else {
            s.set_len(*len)?;
            lines.push(format!("RW {sectors} FLAT \"{file}\" 0"));
        }
    }
    let cid = super::new_cid(NO_PARENT);
    let text = descriptor_text(cid, None, sub.name(), &lines, size / 512);
    descriptor.write_all_at(text.as_bytes(), 0)?;
    Ok(new_image(
        size,
        sub.sparse().then_some(grain),
        !sub.sparse(),
        cid,
        None,
    ))
}

/// The CID and size in sectors of the VMDK whose descriptor (text, or
/// embedded in a sparse file) is in `storage`.
pub(super) fn identity(storage: &dyn Storage) -> Result<(u32, u64)> {
    let len = storage.len()?;
    let mut head = vec![0u8; len.min(512) as usize];
    storage.read_exact_at(&mut head, 0)?;
    if head.len() == 512 && head.starts_with(header::KDMV) {
        let h = SparseHeader::parse(&head)?;
        if h.desc_offset == 0 || h.desc_size == 0 {
            return Ok((super::DEFAULT_CID, h.capacity));
        }
        let room = h.desc_size.saturating_mul(512).min(descriptor::MAX_TEXT);
        let at = h.desc_offset.saturating_mul(512);
        if at.saturating_add(room) > len {
            return Err(Error::corrupt(
                "VMDK sparse header",
                "descriptor outside the file",
            ));
        }
        let mut raw = vec![0u8; room as usize];
        storage.read_exact_at(&mut raw, at)?;
        let d = Descriptor::parse(&raw)?;
        let sectors = if h.capacity != 0 {
            h.capacity
        } else {
            d.sectors().unwrap_or(0)
        };
        return Ok((d.cid, sectors));
    }
    if len <= descriptor::MAX_TEXT && descriptor::looks_like_text(&head) {
        let mut raw = vec![0u8; len as usize];
        storage.read_exact_at(&mut raw, 0)?;
        let d = Descriptor::parse(&raw)?;
        let sectors = d
            .sectors()
            .ok_or_else(|| Error::corrupt("VMDK descriptor", "extents too large"))?;
        return Ok((d.cid, sectors));
    }
    Err(Error::unsupported(
        "a VMDK parent that is not a descriptor or a sparse file",
    ))
}

/// A monolithicSparse child of the VMDK in `parent`, naming it by the
/// relative path (qemu's and VMware's `parentFileNameHint`).
pub fn snapshot(
    parent: &dyn Storage,
    child: &dyn Storage,
    links: &Links,
    child_path: &std::path::Path,
) -> Result<NewImage> {
    check_new(child)?;
    let (parent_cid, sectors) = identity(parent)?;
    if sectors == 0 {
        return Err(Error::corrupt("VMDK parent", "size 0"));
    }
    let cid = super::new_cid(parent_cid);
    let hint = links.relative.strip_prefix("./").unwrap_or(&links.relative);
    let name = child_path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("child.vmdk");
    let ext = format!("RW {sectors} SPARSE \"{name}\"");
    let text = descriptor_text(
        cid,
        Some((parent_cid, hint)),
        "monolithicSparse",
        &[ext],
        sectors,
    );
    write_sparse(child, sectors, DEFAULT_GRAIN as u64, Some(&text))?;
    Ok(new_image(
        sectors * 512,
        Some(DEFAULT_GRAIN),
        false,
        cid,
        Some(parent_cid),
    ))
}
