//! Asynchronous I/O on images (issue 14, item 1): fio's libaio and posixaio
//! engines write and verify through the library on VHD, VHDX and VDI images
//! made by qemu-img, and the data is really in the image (fio verifies it
//! again without the library on qemu-img's raw conversion); a C program
//! checks libaio and POSIX AIO semantics on a mix of image and regular fds.
//! io_uring, which cannot be interposed, is refused: tests/uring.rs.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{qemu_raw, run as tool};

/// (qemu-img format, file extension, creation options)
const FORMATS: &[(&str, &str, &str)] = &[
    ("vpc", "vhd", "subformat=dynamic"),
    ("vhdx", "vhdx", "subformat=dynamic"),
    ("vdi", "vdi", ""),
    ("vmdk", "vmdk", "subformat=monolithicSparse"),
];

fn create(dir: &Path, fmt: &str, ext: &str, opts: &str) -> PathBuf {
    let img = dir.join(format!("disk.{ext}"));
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().unwrap(), "16M"]);
    tool("qemu-img", &args);
    img
}

/// The image's metadata is consistent: `qemu-img check`, or for VHD (which
/// qemu-img cannot check) the vhd_util checker.
fn check_image(img: &Path, fmt: &str) {
    if fmt == "vpc" {
        vhd_util::check_file(img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    } else {
        let out = tool("qemu-img", &["check", "-f", fmt, img.to_str().unwrap()]);
        assert!(out.contains("No errors"), "{}: {out}", img.display());
    }
}

/// What qemu-img reads from `img`, which must be what the library reads.
fn raw_agrees(dir: &Path, img: &Path, fmt: &str) -> Vec<u8> {
    let raw = qemu_raw(img, fmt);
    let name = img.file_name().unwrap().to_str().unwrap();
    let lib = preload::run(dir, "cat", &[name]).stdout;
    assert!(
        lib == raw,
        "{name}: the library reads other data than qemu-img"
    );
    raw
}

const JOB: &[&str] = &[
    "--name=aio",
    "--rw=randwrite",
    "--bs=16k",
    "--size=12M",
    "--iodepth=16",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--thread",
    "--minimal",
];

fn fio(dir: &Path, file: &str, engine: &[&str], extra: &[&str], preload: bool) -> Command {
    // A lost completion would hang fio: killed after a minute instead.
    let limit = ["-s", "KILL", "60", "fio"];
    let mut c = if preload {
        preload::command(dir, "timeout", &limit)
    } else {
        let mut c = Command::new("timeout");
        c.args(limit).current_dir(dir);
        c
    };
    c.arg(format!("--filename={file}"))
        .args(engine)
        .args(JOB)
        .args(extra);
    c
}

#[track_caller]
fn must(mut c: Command, what: &str) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fio_async_engines_write_and_verify_on_every_format() {
    let engines: &[&[&str]] = &[
        &["--ioengine=libaio", "--direct=0"],
        &["--ioengine=libaio", "--direct=1"],
        // fio reads the kernel's completion ring itself.
        &[
            "--ioengine=libaio",
            "--userspace_reap=1",
            "--iodepth_batch_complete_min=0",
        ],
        &["--ioengine=posixaio"],
        &["--ioengine=psync"],
    ];
    for &(fmt, ext, opts) in FORMATS {
        for engine in engines {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let img = create(dir, fmt, ext, opts);
            let name = img.file_name().unwrap().to_str().unwrap();
            let what = format!("fio {engine:?} on {name}");
            // Writes, then fio's own verify pass, through the library.
            must(fio(dir, name, engine, &[], true), &what);
            check_image(&img, fmt);
            let raw = raw_agrees(dir, &img, fmt);
            // The same verification without the library, on qemu-img's view.
            fs::write(dir.join("qemu.raw"), &raw).unwrap();
            must(
                fio(
                    dir,
                    "qemu.raw",
                    &["--ioengine=psync"],
                    &["--verify_only"],
                    false,
                ),
                &format!("{what}: verify of qemu-img's raw conversion"),
            );
        }
    }
}

/// tests/aio/aio_check.c, linked with libaio, or without it (`-DVIA_DLSYM`:
/// the program finds the library's io_* functions with dlsym).
fn aio_check(dir: &Path, with_libaio: bool) -> PathBuf {
    let exe = dir.join("aio_check");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aio/aio_check.c");
    let mut args = vec!["-O1", "-Wall", "-Werror", "-o", exe.to_str().unwrap()];
    args.push(src.to_str().unwrap());
    if with_libaio {
        args.push("-laio");
    } else {
        args.extend(["-DVIA_DLSYM", "-ldl"]);
    }
    args.push("-lpthread");
    tool("cc", &args);
    exe
}

/// Runs aio_check on a new image of `fmt` and checks what it left there.
fn run_aio_check(fmt: &str, ext: &str, opts: &str, with_libaio: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let exe = aio_check(dir, with_libaio);
    let img = create(dir, fmt, ext, opts);
    let name = img.file_name().unwrap().to_str().unwrap();
    let out = preload::run(dir, exe.to_str().unwrap(), &[name, "regular.bin"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    check_image(&img, fmt);
    let raw = raw_agrees(dir, &img, fmt);
    const K: usize = 1024;
    const M: usize = 1024 * K;
    let expect: &[(usize, usize, u8)] = &[
        (0, 64 * K, b'A'),
        (64 * K, 64 * K, 0),
        (M, 4 * K, b'C'),
        (2 * M, 4 * K, b'E'),
        (2 * M + 4 * K, 4 * K, b'e'),
        (3 * M, 8 * K, b'P'),
        (4 * M, 16 * K, b'L'),
        (5 * M, 4 * K, b'T'),
        (6 * M, 4 * K, b'X'),
        (7 * M, M, 0),
    ];
    for &(at, n, b) in expect {
        assert!(
            raw[at..at + n].iter().all(|&x| x == b),
            "{name}: bytes {at}..{} are not {b:#x}",
            at + n
        );
    }
    let reg = fs::read(dir.join("regular.bin")).unwrap();
    assert!(reg[..4 * K].iter().all(|&x| x == b'B'));
    assert!(reg[64 * K..72 * K].iter().all(|&x| x == b'R'));
    assert!(reg[128 * K..132 * K].iter().all(|&x| x == b'W'));
}

#[test]
fn c_program_mixes_image_and_regular_fds_in_libaio_and_posix_aio() {
    for &(fmt, ext, opts) in FORMATS {
        run_aio_check(fmt, ext, opts, true);
    }
}

/// A program that never loads libaio and calls the library's io_* functions
/// (found with dlsym): they make libaio's system calls themselves.
#[test]
fn c_program_without_libaio_loaded() {
    let (fmt, ext, opts) = FORMATS[1];
    run_aio_check(fmt, ext, opts, false);
}
