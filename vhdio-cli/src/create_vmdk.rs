//! `vhdio create -f vmdk`: the subformats that are more than one file.

use std::path::Path;

use vdisk::vmdk::create::{DEFAULT_GRAIN, Subformat, create_files, extent_names};

use crate::{EXIT_ERROR, EXIT_OK, Failure, fail, units};

/// Options: subformat=monolithicSparse (default) | monolithicFlat |
/// twoGbMaxExtentSparse | twoGbMaxExtentFlat, grain_size=N (block_size=N).
pub fn create(options: Option<&str>, image: &Path, size: u64) -> Result<u8, Failure> {
    let mut sub = Subformat::MonolithicSparse;
    let mut grain = DEFAULT_GRAIN;
    for item in options
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match item.split_once('=') {
            Some(("subformat", v)) => {
                sub = Subformat::parse(v.trim()).map_err(|e| fail(EXIT_ERROR, e.to_string()))?
            }
            Some(("grain_size" | "block_size" | "cluster_size", v)) => {
                let n = units::parse_size(v.trim()).map_err(|e| fail(EXIT_ERROR, e))?;
                grain =
                    u32::try_from(n).map_err(|_| fail(EXIT_ERROR, format!("grain size {n}")))?;
            }
            _ => {
                return Err(fail(
                    EXIT_ERROR,
                    format!("unknown VMDK option '{item}' (subformat=..., grain_size=N)"),
                ));
            }
        }
    }
    let name = image.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        fail(
            EXIT_ERROR,
            format!("{}: not a UTF-8 file name", image.display()),
        )
    })?;
    let dir = image.parent().unwrap_or(Path::new(""));
    let rounded = size.div_ceil(512) * 512;
    let paths: Vec<_> = std::iter::once(image.to_path_buf())
        .chain(
            extent_names(sub, name, rounded)
                .into_iter()
                .map(|(n, _)| dir.join(n)),
        )
        .collect();
    let mut files = Vec::new();
    let cleanup = |made: &[std::path::PathBuf]| {
        for p in made {
            let _ = std::fs::remove_file(p);
        }
    };
    for (i, p) in paths.iter().enumerate() {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
        {
            Ok(f) => files.push((f, true)),
            Err(e) => {
                cleanup(&paths[..i]);
                return Err(fail(EXIT_ERROR, format!("{}: {e}", p.display())));
            }
        }
    }
    let extents: Vec<&dyn vdisk::Storage> = files[1..]
        .iter()
        .map(|f| f as &dyn vdisk::Storage)
        .collect();
    // Every file durable before success is reported (create_files leaves
    // them to the page cache; a write-back error would otherwise be lost).
    let made = create_files(sub, name, size, grain, &files[0], &extents).and_then(|m| {
        for (f, _) in &files {
            f.sync_all()?;
        }
        Ok(m)
    });
    let made = match made {
        Ok(m) => m,
        Err(e) => {
            drop(files);
            cleanup(&paths);
            return Err(fail(EXIT_ERROR, format!("{}: {e}", image.display())));
        }
    };
    let grain = made
        .block_size
        .map(|b| format!(", {} grains", units::human(b as u64)))
        .unwrap_or_default();
    println!(
        "Created {} (vmdk {}, {} = {} bytes{grain}, {} extent file{})",
        image.display(),
        sub.name(),
        units::human(made.size),
        made.size,
        paths.len() - 1,
        if paths.len() == 2 { "" } else { "s" }
    );
    Ok(EXIT_OK)
}
