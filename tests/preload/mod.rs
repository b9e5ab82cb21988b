//! Running real programs with the library preloaded.
#![allow(dead_code)]

pub mod fuse;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The release build of libvhdio.so, built once per test binary (cargo test
/// does not build a cdylib-only package's library for integration tests).
pub fn library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--lib",
                "-p",
                "vhdio",
                "--manifest-path",
            ])
            .arg(root.join("Cargo.toml"))
            .status()
            .expect("cannot run cargo to build libvhdio.so");
        assert!(status.success(), "building libvhdio.so failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let lib = target.join("release/libvhdio.so");
        assert!(lib.exists(), "{} missing after build", lib.display());
        lib
    })
}

/// `program args...` with LD_PRELOAD set, in `dir`.
pub fn command(dir: &Path, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).current_dir(dir).env("LD_PRELOAD", library());
    c.env_remove("LIBVHD_IO_DEBUG")
        .env_remove("LIBVHD_IO_DUMP")
        .env_remove("LIBVHD_IO_PROBE_ALL");
    c
}

/// Runs `program` under the library; it must succeed. Returns its output.
pub fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    let out = command(dir, program, args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The first word a program printed (a checksum, a size).
pub fn first_word(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Runs a shell command line under the library.
pub fn sh(dir: &Path, script: &str) -> Output {
    run(dir, "sh", &["-c", script])
}

/// The system python: the pyenv shim is a shell script around it.
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

const PWRITE_PY: &str = r#"
import os, sys
path, ops, blob = sys.argv[1:4]
data = memoryview(open(blob, 'rb').read())
fd = os.open(path, os.O_RDWR)
for line in open(ops):
    off, n, at = map(int, line.split())
    done = 0
    while done < n:
        w = os.pwrite(fd, data[at + done:at + n], off + done)
        assert w > 0, w
        done += w
os.fsync(fd)
os.close(fd)
"#;

/// Runs `ops` as os.pwrite calls on `image` in python under the library.
pub fn pwrite_through_library(dir: &Path, image: &Path, ops: &[(u64, Vec<u8>)]) {
    let mut blob = Vec::new();
    let mut lines = String::new();
    for (off, d) in ops {
        lines.push_str(&format!("{off} {} {}\n", d.len(), blob.len()));
        blob.extend_from_slice(d);
    }
    fs::write(dir.join("pwrite.py"), PWRITE_PY).unwrap();
    fs::write(dir.join("ops.txt"), lines).unwrap();
    fs::write(dir.join("blob.bin"), blob).unwrap();
    run(
        dir,
        python(),
        &["pwrite.py", image.to_str().unwrap(), "ops.txt", "blob.bin"],
    );
}
