//! `vhdio map`: the allocation map of an image through its chain, in
//! qemu-img map's terms: each extent's depth (the layer that decides how it
//! reads, 0 = the image itself), whether it is present (decided by some
//! layer: data, a zero mark, or the end of the chain), zero, data, and for
//! data the offset in that layer's file. Adjacent extents of the same kind
//! (data continuing in the same file) are merged.

use std::path::{Path, PathBuf};

use vdisk::{Image, Mapping};

use crate::json::Json;
use crate::lock::ReadLocks;
use crate::{EXIT_ERROR, EXIT_OK, Failure, chain, fail};

/// One extent of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub zero: bool,
    /// File offset of data in layer `depth`.
    pub offset: Option<u64>,
    /// Data stored compressed (qcow2): no plain file offset.
    pub compressed: bool,
}

impl Extent {
    fn continues(&self, prev: &Extent) -> bool {
        prev.start + prev.length == self.start
            && prev.depth == self.depth
            && prev.zero == self.zero
            && prev.compressed == self.compressed
            && match (prev.offset, self.offset) {
                (Some(p), Some(o)) => p + prev.length == o,
                (None, None) => true,
                _ => false,
            }
    }
}

/// How the run at `offset` (at most `len` bytes) reads, looking down from
/// layer `level`; returns the extent.
fn extent_at(layers: &[&dyn Image], level: usize, offset: u64, len: u64) -> vdisk::Result<Extent> {
    let last = layers.len() - 1;
    let image = layers[level];
    let inside = image.virtual_size().saturating_sub(offset);
    let zero = |depth: usize, length: u64| Extent {
        start: offset,
        length,
        depth,
        zero: true,
        offset: None,
        compressed: false,
    };
    if inside == 0 {
        // Past the end of a smaller parent: zeros, decided here.
        return Ok(zero(level, len));
    }
    let want = len.min(inside);
    let (mapping, run) = image.map(offset, want)?;
    if run == 0 || run > want {
        return Err(vdisk::Error::corrupt(
            "mapping",
            format!("layer {level} mapped {run} bytes of {want}"),
        ));
    }
    Ok(match mapping {
        Mapping::Data { file_offset } => Extent {
            start: offset,
            length: run,
            depth: level,
            zero: false,
            offset: Some(file_offset),
            compressed: false,
        },
        Mapping::Compressed => Extent {
            start: offset,
            length: run,
            depth: level,
            zero: false,
            offset: None,
            compressed: true,
        },
        Mapping::Zero => zero(level, run),
        Mapping::Unallocated if level == last => zero(level, run),
        Mapping::Unallocated => extent_at(layers, level + 1, offset, run)?,
    })
}

/// The merged map of the whole disk.
pub fn extents(layers: &[&dyn Image]) -> vdisk::Result<Vec<Extent>> {
    let size = layers[0].virtual_size();
    let mut out: Vec<Extent> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let e = extent_at(layers, 0, offset, (size - offset).min(1 << 40))?;
        offset += e.length;
        match out.last_mut() {
            Some(prev) if e.continues(prev) => prev.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

pub fn map(path: &Path, json: bool, locks: &ReadLocks) -> Result<u8, Failure> {
    let layers = chain::open_chain(path, locks)?;
    let paths: Vec<PathBuf> = layers.iter().map(|l| l.path.clone()).collect();
    let images: Vec<&dyn Image> = layers.iter().map(|l| l.image.as_ref()).collect();
    let map = extents(&images).map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", path.display())))?;
    if json {
        let lines: Vec<String> = map
            .iter()
            .map(|e| {
                let mut o = Json::obj(vec![
                    ("start", Json::Num(e.start)),
                    ("length", Json::Num(e.length)),
                    ("depth", Json::Num(e.depth as u64)),
                    ("present", Json::Bool(true)),
                    ("zero", Json::Bool(e.zero)),
                    ("data", Json::Bool(e.offset.is_some() || e.compressed)),
                    ("compressed", Json::Bool(e.compressed)),
                ]);
                if let Some(off) = e.offset {
                    o.push("offset", Json::Num(off));
                }
                if e.offset.is_some() || e.compressed {
                    o.push("file", Json::str(paths[e.depth].to_string_lossy()));
                }
                o.line()
            })
            .collect();
        println!("[{}]", lines.join(",\n"));
    } else {
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for e in &map {
            if let Some(off) = e.offset {
                println!(
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(off),
                    paths[e.depth].display()
                );
            }
        }
    }
    Ok(EXIT_OK)
}

/// As qemu-img map prints offsets: `0`, `0x200000`.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}
