//! Helpers shared by vhdio-cli's integration tests that run the `vhdio`
//! binary directly (each test file is its own crate and includes this with
//! `mod vhdio_util;`, beside vdisk's `common` module, which it uses). Not
//! every file uses every helper, hence the `allow(dead_code)`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");

/// Runs `vhdio args...` without the preload library (a test run under
/// LD_PRELOAD must not serve the binary's own file accesses).
pub fn vhdio(args: &[&str]) -> Output {
    Command::new(VHDIO)
        .args(args)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap()
}

/// Runs `vhdio args...`, which must exit 0; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = vhdio(args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "vhdio {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vhdio check` finds no problem in `img`, nor does `qemu-img check`
/// (but for `vpc`: qemu-img cannot check VHD).
pub fn check_clean(img: &Path, fmt: &str) {
    let out = ok(&["check", s(img)]);
    assert!(out.contains("No problems found"), "{out}");
    if fmt != "vpc" {
        crate::common::run("qemu-img", &["check", "-f", fmt, s(img)]);
    }
}
