//! io_uring under the library (issue 14's last silent failure): io_uring
//! requests run in the kernel on raw fds, where an image fd is the empty
//! sealed dummy, so a ring read an image as empty and fio's read job exited 0
//! having read nothing. Setting up a ring now fails with ENOSYS (what a kernel
//! without io_uring answers) and one log line naming `vhdio serve` and the
//! program's psync/libaio mode; `LIBVHD_IO_URING=allow` lets it through for
//! programs that use io_uring on other files. Real programs, under LD_PRELOAD:
//! fio, a C program making raw `syscall()`s, a C program linked with liburing.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{run as tool, sha256_hex};

/// (qemu-img format, file extension, creation options)
const FORMATS: &[(&str, &str, &str)] = &[
    ("vhdx", "vhdx", "subformat=dynamic"),
    ("vdi", "vdi", ""),
    ("vpc", "vhd", "subformat=dynamic"),
    ("vmdk", "vmdk", "subformat=monolithicSparse"),
];

/// The line the library logs when it refuses a ring.
const REFUSAL: &str = "io_uring is not available under libvhdio";

/// A 16 MiB image of `fmt` with data in its first 2 MiB (written by qemu-io),
/// and a byte copy of it beside it.
fn image_with_data(dir: &Path, fmt: &str, ext: &str, opts: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(format!("disk.{ext}"));
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().unwrap(), "16M"]);
    tool("qemu-img", &args);
    tool(
        "qemu-io",
        &[
            "-f",
            fmt,
            "-c",
            "write -q -P 0x5a 0 2M",
            img.to_str().unwrap(),
        ],
    );
    let copy = dir.join(format!("copy.{ext}"));
    fs::copy(&img, &copy).unwrap();
    (img, copy)
}

/// `img` is what it was: the same bytes as `copy`, and the same disk for
/// `qemu-img compare`.
fn unchanged(img: &Path, copy: &Path, fmt: &str) {
    let name = img.display();
    assert_eq!(
        sha256_hex(&fs::read(img).unwrap()),
        sha256_hex(&fs::read(copy).unwrap()),
        "{name} changed"
    );
    tool(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            fmt,
            "-F",
            fmt,
            copy.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
}

/// fio on `file` in `dir`, under the library or not, with `LIBVHD_IO_URING`
/// set to `uring` (or unset); killed after a minute rather than hanging.
fn fio(dir: &Path, file: &str, job: &[&str], preload: bool, uring: Option<&str>) -> Output {
    let limit = ["-s", "KILL", "60", "fio"];
    let mut c = if preload {
        preload::command(dir, "timeout", &limit)
    } else {
        let mut c = Command::new("timeout");
        c.args(limit).current_dir(dir);
        c
    };
    c.env_remove("LIBVHD_IO_URING").env_remove("LIBVHD_IO_LOG");
    if let Some(v) = uring {
        c.env("LIBVHD_IO_URING", v);
    }
    c.arg(format!("--filename={file}"))
        .args(["--name=uring", "--ioengine=io_uring", "--thread"])
        .args(["--minimal", "--size=4M", "--iodepth=8"])
        .args(job);
    c.output().unwrap()
}

const READ_JOB: &[&str] = &["--rw=read", "--bs=64k"];
const WRITE_JOB: &[&str] = &[
    "--rw=randwrite",
    "--bs=16k",
    "--verify=crc32c",
    "--verify_fatal=1",
];

fn text(out: &Output) -> String {
    format!(
        "({}) {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn fio_io_uring_read_and_write_jobs_on_images_fail_naming_what_to_use() {
    for &(fmt, ext, opts) in FORMATS {
        for (what, job) in [("read", READ_JOB), ("write", WRITE_JOB)] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let (img, copy) = image_with_data(dir, fmt, ext, opts);
            let name = img.file_name().unwrap().to_str().unwrap();
            let out = fio(dir, name, job, true, None);
            let all = text(&out);
            assert!(
                !out.status.success(),
                "fio io_uring {what} job on {name} succeeded: {all}"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(REFUSAL) && err.contains("io_uring_setup fails with ENOSYS"),
                "fio io_uring {what} job on {name}: no refusal logged: {all}"
            );
            assert!(
                err.contains("vhdio serve") && err.contains("psync or libaio"),
                "fio io_uring {what} job on {name}: the log does not say what to use: {all}"
            );
            unchanged(&img, &copy, fmt);
        }
    }
}

/// Whether this kernel sets up rings at all (kernel.io_uring_disabled, a
/// kernel built without io_uring): fio io_uring on a plain file, no library.
fn kernel_has_io_uring(dir: &Path) -> bool {
    let out = fio(dir, "probe.bin", WRITE_JOB, false, None);
    let _ = fs::remove_file(dir.join("probe.bin"));
    if !out.status.success() {
        eprintln!(
            "skipped: this kernel refuses io_uring without the library: {}",
            text(&out)
        );
    }
    out.status.success()
}

#[test]
fn allow_lets_fio_use_io_uring_on_a_regular_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    if !kernel_has_io_uring(dir) {
        return;
    }
    let out = fio(dir, "plain.bin", WRITE_JOB, true, Some("allow"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(REFUSAL), "{}", text(&out));
    // Any other value still refuses.
    let out = fio(dir, "plain.bin", WRITE_JOB, true, Some("1"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(REFUSAL), "{}", text(&out));
}

/// With allow, io_uring on an image is the documented escape: its writes hit
/// the sealed dummy (EPERM), never the image.
#[test]
fn allow_keeps_io_uring_writes_off_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    if !kernel_has_io_uring(dir) {
        return;
    }
    let (fmt, ext, opts) = FORMATS[0];
    let (img, copy) = image_with_data(dir, fmt, ext, opts);
    let name = img.file_name().unwrap().to_str().unwrap();
    let out = fio(dir, name, WRITE_JOB, true, Some("allow"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Operation not permitted"),
        "{}",
        text(&out)
    );
    unchanged(&img, &copy, fmt);
}

/// Compiles tests/uring/NAME.c into `dir`.
fn build(dir: &Path, name: &str, libs: &[&str]) -> PathBuf {
    let exe = dir.join(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/uring/{name}.c"));
    let mut args = vec!["-O1", "-Wall", "-Werror", "-o", exe.to_str().unwrap()];
    args.push(src.to_str().unwrap());
    args.extend(libs);
    tool("cc", &args);
    exe
}

/// Runs `exe mode arg` under the library (with `LIBVHD_IO_URING=allow` for
/// mode "allowed"): it must print "ok". Returns its stderr.
fn run_check(dir: &Path, exe: &Path, mode: &str, arg: &str) -> String {
    let mut c = preload::command(dir, exe.to_str().unwrap(), &[mode, arg]);
    c.env_remove("LIBVHD_IO_URING").env_remove("LIBVHD_IO_LOG");
    if mode == "allowed" {
        c.env("LIBVHD_IO_URING", "allow");
    }
    let out = c.output().unwrap();
    let what = format!("{} {mode}", exe.display());
    assert!(out.status.success(), "{what}: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{what}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn raw_syscall_refuses_io_uring_setup_and_passes_everything_else_through() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let exe = build(dir, "syscall_check", &[]);
    // The program calls io_uring_setup twice: one log line.
    let err = run_check(dir, &exe, "refused", "scratch.bin");
    assert_eq!(err.matches(REFUSAL).count(), 1, "{err}");
    if kernel_has_io_uring(dir) {
        let err = run_check(dir, &exe, "allowed", "scratch.bin");
        assert!(!err.contains(REFUSAL), "{err}");
    }
}

#[test]
fn liburing_setup_functions_return_enosys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let exe = build(dir, "liburing_check", &["-luring"]);
    fs::write(dir.join("plain.txt"), b"uring and more").unwrap();
    let err = run_check(dir, &exe, "refused", "plain.txt");
    assert_eq!(err.matches(REFUSAL).count(), 1, "{err}");
    assert!(
        err.contains("io_uring_queue_init fails with ENOSYS"),
        "{err}"
    );
    if kernel_has_io_uring(dir) {
        let err = run_check(dir, &exe, "allowed", "plain.txt");
        assert!(!err.contains(REFUSAL), "{err}");
    }
}
