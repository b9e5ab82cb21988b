//! `vhdio run`: executes a command with libvhdio.so preloaded, like
//! `eatmydata` does with its library.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::{EXIT_CANNOT_EXEC, EXIT_ERROR, EXIT_NOT_FOUND, Failure, fail};

/// File name of the preload library.
pub const LIBRARY: &str = "libvhdio.so";

/// Where to look for the library, relative to the folder of the vhdio
/// binary: beside it (cargo's target folder, or a private install), the
/// library folder of its prefix (`make install`: `PREFIX/bin/vhdio` and
/// `PREFIX/lib/libvhdio.so`), a package folder below it, then the other cargo
/// profile (a debug vhdio finds a release library and the reverse; a test
/// binary in target/debug/deps finds target/debug).
pub fn candidates(exe_dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![
        exe_dir.join(LIBRARY),
        exe_dir.join("../lib").join(LIBRARY),
        exe_dir.join("../lib/libvhdio").join(LIBRARY),
        exe_dir.join("../lib64").join(LIBRARY),
    ];
    for profile in ["release", "debug"] {
        v.push(exe_dir.join("..").join(profile).join(LIBRARY));
        v.push(exe_dir.join("../..").join(profile).join(LIBRARY));
    }
    v
}

/// The library to preload: `explicit`, or the first candidate that exists.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, Failure> {
    if let Some(p) = explicit {
        return std::fs::canonicalize(p)
            .ok()
            .filter(|p| p.is_file())
            .ok_or_else(|| fail(EXIT_ERROR, format!("library {}: not found", p.display())));
    }
    let exe = std::env::current_exe()
        .map_err(|e| fail(EXIT_ERROR, format!("cannot find the vhdio binary: {e}")))?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let list = candidates(dir);
    for c in &list {
        if c.is_file() {
            return Ok(std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()));
        }
    }
    let tried: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
    Err(fail(
        EXIT_ERROR,
        format!(
            "{LIBRARY} not found (looked in {}); install it, or name it with --library",
            tried.join(", ")
        ),
    ))
}

/// LD_PRELOAD with `lib` first, keeping what was there (without a second copy of `lib`).
pub fn preload_value(lib: &Path, existing: Option<&OsStr>) -> OsString {
    let mut out = OsString::from(lib);
    if let Some(old) = existing {
        for entry in old
            .as_bytes()
            .split(|&c| c == b':' || c == b' ')
            .filter(|e| !e.is_empty())
        {
            if Path::new(OsStr::from_bytes(entry)) != lib {
                out.push(":");
                out.push(OsStr::from_bytes(entry));
            }
        }
    }
    out
}

pub fn run(
    library: Option<&Path>,
    force: bool,
    as_file: bool,
    command: &[OsString],
) -> Result<u8, Failure> {
    let lib = find_library(library)?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| fail(EXIT_ERROR, "no command given"))?;
    if !force {
        crate::inspect::refuse_unreachable(program)?;
    }
    let preload = preload_value(&lib, std::env::var_os("LD_PRELOAD").as_deref());
    log::debug!("LD_PRELOAD={}", preload.to_string_lossy());
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env("LD_PRELOAD", &preload);
    if as_file {
        cmd.env("LIBVHD_IO_AS_FILE", "1");
    }
    // exec only returns on failure.
    let e = cmd.exec();
    let status = if e.kind() == std::io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXEC
    };
    Err(fail(
        status,
        format!("cannot run '{}': {e}", program.to_string_lossy()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_is_prepended_once() {
        let lib = Path::new("/usr/lib/libvhdio.so");
        assert_eq!(preload_value(lib, None), "/usr/lib/libvhdio.so");
        assert_eq!(
            preload_value(lib, Some(OsStr::new(""))),
            "/usr/lib/libvhdio.so"
        );
        assert_eq!(
            preload_value(lib, Some(OsStr::new("/a.so /usr/lib/libvhdio.so:/b.so"))),
            "/usr/lib/libvhdio.so:/a.so:/b.so"
        );
    }

    #[test]
    fn candidate_order() {
        let c = candidates(Path::new("/usr/bin"));
        assert_eq!(c[0], Path::new("/usr/bin/libvhdio.so"));
        assert_eq!(c[1], Path::new("/usr/bin/../lib/libvhdio.so"));
        assert_eq!(c[2], Path::new("/usr/bin/../lib/libvhdio/libvhdio.so"));
    }
}
