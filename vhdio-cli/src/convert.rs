//! `vhdio convert`: copies the disk of an image (its whole chain, flattened)
//! or of a raw file into a new image or raw file, sparse.
//!
//! DEST is written under a temporary name in its folder
//! (`.NAME.vhdio-convert-PID`), flushed and closed, then renamed over DEST:
//! a half-written DEST never appears under its name, and a failed convert
//! removes its temporary file (a killed one leaves it, and the next convert
//! to the same DEST reports it).

use std::fs::File;
use std::path::{Path, PathBuf};

use vdisk::copy::{CopyOptions, RawSource, copy_disk};
use vdisk::{CreateOptions, Disk, Format, OpenOptions, RawImage, StdParentOpener};

use crate::lock::ReadLocks;
use crate::progress::Progress;
use crate::{EXIT_ERROR, EXIT_OK, Failure, chain, fail};

/// What `vhdio convert` was asked.
pub struct ConvertArgs<'a> {
    pub source_format: Option<Format>,
    pub output_format: Format,
    pub options: Option<&'a str>,
    pub backing: Option<&'a Path>,
    pub progress: bool,
    /// `-U`: no reader locks on SOURCE (and BACKING).
    pub force_share: bool,
    pub source: &'a Path,
    pub dest: &'a Path,
}

/// An opened source: its disk, the paths of its layers, and for a raw file
/// its exact length (the disk is that rounded up to a sector).
pub struct Source {
    pub disk: Disk,
    pub paths: Vec<PathBuf>,
    pub raw_len: Option<u64>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Failure {
    fail(EXIT_ERROR, format!("{}: {e}", path.display()))
}

/// Opens `path` read-only with its chain, each file with reader locks as
/// `locks` says (held while the source is open); a file that is not an
/// image (or `-f raw`) is a raw disk. `forced` must match what the file is.
pub fn open_source(
    path: &Path,
    forced: Option<Format>,
    locks: &ReadLocks,
) -> Result<Source, Failure> {
    let storage = chain::open_file(path, locks)?;
    let probed = vdisk::probe(storage.as_ref()).map_err(|e| err(path, e))?;
    let format = match (forced, probed) {
        (Some(Format::Raw), _) | (None, None) => Format::Raw,
        (None, Some(f)) => f,
        (Some(f), Some(p)) if f == p => f,
        (Some(f), found) => {
            let what = found.map_or("a raw file".to_string(), |p| format!("a {p} image"));
            return Err(err(path, format!("is {what}, not {f}")));
        }
    };
    if format == Format::Raw {
        let raw = RawSource::new(storage).map_err(|e| err(path, e))?;
        let raw_len = raw.file_len();
        if raw_len == 0 {
            return Err(err(path, "empty file (a disk of 0 bytes)"));
        }
        let disk = Disk::new(vec![Box::new(raw)]).map_err(|e| err(path, e))?;
        return Ok(Source {
            disk,
            paths: vec![path.to_path_buf()],
            raw_len: Some(raw_len),
        });
    }
    let layers = chain::open_chain(path, locks)?;
    drop(storage);
    let (disk, infos) = chain::into_disk(layers);
    Ok(Source {
        disk,
        paths: infos.into_iter().map(|l| l.path).collect(),
        raw_len: None,
    })
}

/// The temporary name DEST is written under: hidden, in DEST's folder (so
/// the rename is atomic), naming the process.
fn temp_path(dest: &Path) -> Result<PathBuf, Failure> {
    let name = dest
        .file_name()
        .ok_or_else(|| err(dest, "not a file name"))?
        .to_string_lossy();
    Ok(dest.with_file_name(format!(".{name}.vhdio-convert-{}", std::process::id())))
}

/// Temporary files an earlier, killed convert to `dest` left behind.
fn leftovers(dest: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (folder(dest), dest.file_name()) else {
        return Vec::new();
    };
    let prefix = format!(".{}.vhdio-convert-", name.to_string_lossy());
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn folder(p: &Path) -> Option<&Path> {
    match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

/// Removes the temporary file unless disarmed (on success it was renamed).
pub struct TempFile(Option<PathBuf>);

impl TempFile {
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The absolute path `p` will have (its folder canonicalised).
pub fn absolute_new(p: &Path) -> Result<PathBuf, Failure> {
    let dir = folder(p).ok_or_else(|| err(p, "not a file name"))?;
    let name = p.file_name().ok_or_else(|| err(p, "not a file name"))?;
    Ok(std::fs::canonicalize(dir)
        .map_err(|e| err(dir, e))?
        .join(name))
}

/// `-o` for convert: `create`'s options plus `azure` (VHD).
fn parse_options(
    format: Format,
    size: u64,
    text: Option<&str>,
) -> Result<(CreateOptions, bool), Failure> {
    let mut opts = CreateOptions::new(format, size);
    let mut azure = false;
    let mut rest = Vec::new();
    for item in text.unwrap_or("").split(',').map(str::trim) {
        match item {
            "" => {}
            "azure" => azure = true,
            other => rest.push(other),
        }
    }
    if format == Format::Raw && (azure || !rest.is_empty()) {
        return Err(fail(EXIT_ERROR, "raw output takes no options (-o)"));
    }
    crate::apply_options(&mut opts, &rest.join(",")).map_err(|e| fail(EXIT_ERROR, e))?;
    if azure {
        if format != Format::Vhd {
            return Err(fail(
                EXIT_ERROR,
                "option 'azure' is for VHD output (-O vhd)",
            ));
        }
        // Azure takes fixed VHDs only.
        opts.fixed = true;
    }
    Ok((opts, azure))
}

pub fn convert(a: ConvertArgs) -> Result<u8, Failure> {
    let locks = ReadLocks::unless(a.force_share);
    let source = open_source(a.source, a.source_format, &locks)?;
    let size = source.disk.size();
    let backing = match a.backing {
        Some(b) => Some(open_source(b, None, &locks)?),
        None => None,
    };
    if let Some(b) = &backing {
        if b.raw_len.is_some() {
            return Err(err(
                a.backing.unwrap_or(a.dest),
                "a backing file must be an image",
            ));
        }
        if b.disk.format() != a.output_format {
            return Err(fail(
                EXIT_ERROR,
                format!(
                    "-B: the backing image is {}, the output {} (a child has its parent's format)",
                    b.disk.format(),
                    a.output_format
                ),
            ));
        }
        if b.disk.size() != size {
            return Err(fail(
                EXIT_ERROR,
                format!(
                    "-B: the backing image has {} bytes, the source {size}",
                    b.disk.size()
                ),
            ));
        }
    }
    let (opts, azure) = parse_options(a.output_format, size, a.options)?;
    // DEST is replaced by a rename: it must not be a file being read.
    let dest_abs = absolute_new(a.dest)?;
    if let Ok(dest_real) = std::fs::canonicalize(a.dest) {
        let read = source
            .paths
            .iter()
            .chain(backing.iter().flat_map(|b| b.paths.iter()));
        for p in read {
            if std::fs::canonicalize(p).is_ok_and(|r| r == dest_real) {
                return Err(err(
                    a.dest,
                    format!("is read by this convert ({})", p.display()),
                ));
            }
        }
    }
    for stale in leftovers(a.dest) {
        eprintln!(
            "vhdio: {}: left by an interrupted convert (not removed)",
            stale.display()
        );
    }
    let tmp = temp_path(a.dest)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| err(&tmp, e))?;
    let mut guard = TempFile(Some(tmp.clone()));
    let shown = a.dest;
    let storage = (file, true);
    match (&backing, a.backing) {
        (Some(_), Some(b)) => {
            let parent_abs = std::fs::canonicalize(b).map_err(|e| err(b, e))?;
            let ps = (File::open(&parent_abs).map_err(|e| err(b, e))?, false);
            vdisk::snapshot(&parent_abs, &ps, &storage, &dest_abs).map_err(|e| err(shown, e))?;
        }
        _ if azure => {
            vdisk::vhd::azure::create_fixed(&storage, size).map_err(|e| err(shown, e))?;
        }
        _ if a.output_format == Format::Raw => {}
        _ => {
            vdisk::create(&storage, opts).map_err(|e| err(shown, e))?;
        }
    }
    let file = storage.0;
    let dst = open_dest(
        file.try_clone().map_err(|e| err(&tmp, e))?,
        a.output_format,
        size,
        &dest_abs,
    )
    .map_err(|e| err(shown, e))?;
    let mut progress = Progress::new(a.progress);
    let copy_opts = CopyOptions::default();
    let stats = copy_disk(
        &source.disk,
        &dst,
        backing.as_ref().map(|b| &b.disk),
        copy_opts,
        &mut |done, total| progress.update(done, total),
    )
    .map_err(|e| err(a.source, e))?;
    progress.finish();
    dst.flush().map_err(|e| err(shown, e))?;
    dst.close().map_err(|e| err(shown, e))?;
    drop(dst);
    if a.output_format == Format::Raw
        && let Some(len) = source.raw_len
    {
        // A raw file of a raw file keeps its exact length.
        file.set_len(len).map_err(|e| err(shown, e))?;
    }
    file.sync_all().map_err(|e| err(shown, e))?;
    drop(file);
    std::fs::rename(&tmp, a.dest).map_err(|e| err(a.dest, e))?;
    guard.disarm();
    // The rename is durable only once the folder is: a failure here would
    // otherwise report success for a DEST a power loss can take away.
    if let Some(dir) = folder(a.dest) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
            err(
                dir,
                format!(
                    "cannot sync the folder after writing {}: {e}",
                    a.dest.display()
                ),
            )
        })?;
    }
    log::debug!(
        "converted {} bytes: {} read, {} written",
        size,
        stats.read,
        stats.written
    );
    Ok(EXIT_OK)
}

/// The new DEST, opened for writing as a disk.
fn open_dest(file: File, format: Format, size: u64, path: &Path) -> vdisk::Result<Disk> {
    if format == Format::Raw {
        file.set_len(size)?;
        let raw = RawImage::new(Box::new((file, true)), 512)?;
        return Disk::new(vec![Box::new(raw)]);
    }
    vdisk::open_disk(
        Box::new((file, true)),
        path,
        OpenOptions { writable: true },
        &StdParentOpener,
    )
}
