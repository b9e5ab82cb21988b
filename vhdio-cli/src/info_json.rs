//! `vhdio info --output=json`, in qemu-img info's keys, and `vhdio info` of
//! a differencing image whose chain does not open (a missing parent): the
//! image's own fields, the parent it names, then the error.
//!
//! Keys: `filename`, `format`, `virtual-size`, `actual-size` (bytes the file
//! occupies on disk), `cluster-size` (block size; absent for a fixed VHD),
//! `dirty-flag`, `backing-filename` (where the parent was found, as the
//! child's locator resolves it), `full-backing-filename` (its canonical
//! path), `backing-filename-format`, `backing-image` (the parent's object,
//! recursively), and vhdio's own: `subformat` (fixed, dynamic,
//! differencing...), `identity`, `parent-link` (what the child records),
//! `allocated-size` (bytes stored in this file).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vdisk::StdParentOpener;

use crate::chain::{self, Layer, OpenError};
use crate::json::Json;
use crate::lock::ReadLocks;
use crate::units::human;
use crate::{EXIT_ERROR, EXIT_OK, Failure, fail, info};

fn actual_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// What the layer records about its parent, if it has one.
fn parent_link(layer: &Layer) -> Option<String> {
    match layer.image.parent_link() {
        Some(l) => Some(l.description.clone()),
        None => match layer.image.find_parent(&layer.path, &StdParentOpener) {
            Ok(Some(l)) => Some(l.description),
            Ok(None) => None,
            Err(e) => Some(format!("({e})")),
        },
    }
}

/// One layer's own keys.
fn layer_object(layer: &Layer) -> Result<Json, Failure> {
    let (data, _) = info::allocation(layer.image.as_ref())
        .map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", layer.path.display())))?;
    let mut o = Json::obj(vec![
        ("virtual-size", Json::Num(layer.image.virtual_size())),
        ("filename", Json::str(layer.path.to_string_lossy())),
    ]);
    if let Some(b) = layer.block_size {
        o.push("cluster-size", Json::Num(b));
    }
    o.push("format", Json::str(format_name(layer)));
    o.push("actual-size", Json::Num(actual_size(&layer.path)));
    o.push("dirty-flag", Json::Bool(dirty(layer)));
    o.push("subformat", Json::str(&layer.kind));
    o.push("identity", Json::str(&layer.id));
    o.push("allocated-size", Json::Num(data));
    o.push("file-length", Json::Num(layer.file_len));
    if let Some(link) = parent_link(layer) {
        o.push("parent-link", Json::str(link));
    }
    Ok(o)
}

/// Whether the file holds changes not yet applied: a VHDX whose log is not
/// empty (a writer did not finish; the next writable open replays it).
fn dirty(layer: &Layer) -> bool {
    // The layer itself holds the reader locks: none here.
    layer.format == vdisk::Format::Vhdx
        && chain::open_file(&layer.path, &ReadLocks::Skip)
            .ok()
            .and_then(|s| vdisk::vhdx::header::read_current(s.as_ref()).ok())
            .is_some_and(|(h, _)| !h.log_guid.is_zero())
}

/// qemu-img's format names (vpc for VHD).
fn format_name(layer: &Layer) -> String {
    match layer.format {
        vdisk::Format::Vhd => "vpc".into(),
        f => f.to_string(),
    }
}

pub fn info_json(path: &Path, locks: &ReadLocks) -> Result<u8, Failure> {
    let layers = match chain::open_chain(path, locks) {
        Ok(l) => l,
        Err(e) => return broken_chain(path, e, true, locks),
    };
    // Built from the base up, each object nesting its parent's.
    let mut below: Option<Json> = None;
    for (i, layer) in layers.iter().enumerate().rev() {
        let mut o = layer_object(layer)?;
        if let (Some(parent), Some(pobj)) = (layers.get(i + 1), below.take()) {
            o.push("backing-filename", Json::str(parent.path.to_string_lossy()));
            let full = std::fs::canonicalize(&parent.path).unwrap_or(parent.path.clone());
            o.push("full-backing-filename", Json::str(full.to_string_lossy()));
            o.push("backing-filename-format", Json::str(format_name(parent)));
            o.push("backing-image", pobj);
        }
        below = Some(o);
    }
    if let Some(o) = below {
        println!("{}", o.pretty());
    }
    Ok(EXIT_OK)
}

/// The chain of `path` did not open: if the image itself opens, show it and
/// the parent it names, then fail with the chain's error.
pub fn broken_chain(
    path: &Path,
    e: OpenError,
    json: bool,
    locks: &ReadLocks,
) -> Result<u8, Failure> {
    let msg = match &e {
        OpenError::Unreadable(m) | OpenError::Broken(m) => m.clone(),
        // Refused, not broken: nothing is shown of an image being written.
        OpenError::Locked(_) => return Err(e.into()),
    };
    let Ok(top) = chain::open_file(path, locks).and_then(|s| chain::open_layer(s, path)) else {
        return Err(e.into());
    };
    if json {
        let mut o = layer_object(&top)?;
        o.push("error", Json::str(&msg));
        println!("{}", o.pretty());
    } else {
        let size = top.image.virtual_size();
        println!("image: {}", path.display());
        println!("format: {} {}", top.format, top.kind);
        println!("virtual size: {} ({size} bytes)", human(size));
        match top.block_size {
            Some(b) => println!("block size: {} ({b} bytes)", human(b)),
            None => println!("block size: none (fixed layout)"),
        }
        println!(
            "file size: {} ({} bytes)",
            human(top.file_len),
            top.file_len
        );
        println!("identity: {}", top.id);
        println!("details: {}", top.image.describe());
        if let Some(link) = parent_link(&top) {
            println!("parent: {link}");
        }
        println!("chain: does not open (see the error)");
    }
    Err(e.into())
}
