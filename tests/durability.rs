//! When writes reach the image file (group commit, issue 15): a process that
//! ends without closing its image, one that execs, and a forked child that
//! exits while its parent writes. Allocations keep their table entries in
//! the writer's memory until a commit: every way a process image ends must
//! commit them (exit, exec), and a forked copy must never commit (or trim)
//! the parent's state.
//!
//! Each program writes through the library into a fresh image made by
//! qemu-img; the result is read by `qemu-img convert` (an independent reader)
//! and checked (`qemu-img check`, or the VHD spec checker).

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::path::Path;
use std::process::Command;

const FORMATS: [(&str, &str); 4] = [
    ("vpc", "vhd"),
    ("vhdx", "vhdx"),
    ("vdi", "vdi"),
    ("vmdk", "vmdk"),
];

fn new_image(dir: &Path, qemu: &str, ext: &str) -> std::path::PathBuf {
    let img = dir.join(format!("d.{ext}"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", qemu])
        .arg(&img)
        .arg("64M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// The image checks clean and reads `want` at each offset (qemu-img's view).
fn verify(img: &Path, qemu: &str, want: &[(usize, &[u8])], what: &str) {
    if qemu == "vpc" {
        vhd_util::check_file(img).unwrap_or_else(|e| panic!("{what}: VHD check: {e}"));
    } else {
        let out = Command::new("qemu-img")
            .args(["check", "-f", qemu])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let raw = common::qemu_raw(img, qemu);
    for (off, data) in want {
        assert!(
            &raw[*off..*off + data.len()] == *data,
            "{what}: the bytes written at {off} are not in the image"
        );
    }
}

/// stdio buffers a small fwrite until exit, which flushes it after the
/// library's destructor: the library flushes stdio first (red before).
#[test]
fn buffered_stdio_write_without_fclose_reaches_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("nofclose.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "r+");
    if (!f) return 1;
    char b[1000];
    memset(b, 'K', sizeof b);
    if (fseek(f, 7 << 20, SEEK_SET)) return 2;
    if (fwrite(b, 1, sizeof b, f) != sizeof b) return 3;
    return 0; /* no fclose, no fflush */
}
"#,
    )
    .unwrap();
    let bin = tmp.path().join("nofclose");
    let cc = Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    for (qemu, ext) in FORMATS {
        let img = new_image(tmp.path(), qemu, ext);
        preload::run(tmp.path(), bin.to_str().unwrap(), &[img.to_str().unwrap()]);
        verify(
            &img,
            qemu,
            &[(7 << 20, &[b'K'; 1000])],
            &format!("{ext}: fwrite, exit"),
        );
    }
}

/// A python writer that exits without closing, one that execs another
/// program, and one whose forked child exits while the parent goes on
/// writing (the child must not commit or trim the parent's state).
#[test]
fn exit_exec_and_fork_commit_what_the_writer_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let a = [b'A'; 65536];
    let b = [b'B'; 65536];
    for (qemu, ext) in FORMATS {
        let img = new_image(tmp.path(), qemu, ext);
        let path = img.to_str().unwrap();
        // Exit without close.
        preload::run(
            tmp.path(),
            preload::python(),
            &[
                "-c",
                "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.pwrite(fd, b'A'*65536, 3<<20)",
                path,
            ],
        );
        verify(&img, qemu, &[(3 << 20, &a)], &format!("{ext}: exit"));
        // exec after writing.
        preload::run(
            tmp.path(),
            preload::python(),
            &[
                "-c",
                "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.pwrite(fd, b'B'*65536, 9<<20); os.execv('/bin/true', ['true'])",
                path,
            ],
        );
        verify(
            &img,
            qemu,
            &[(3 << 20, &a), (9 << 20, &b)],
            &format!("{ext}: exec"),
        );
        // A forked child exits (running the library's destructor) between
        // the parent's allocating writes.
        preload::run(
            tmp.path(),
            preload::python(),
            &[
                "-c",
                "import os,sys\n\
                 fd=os.open(sys.argv[1], os.O_RDWR)\n\
                 for i in range(8): os.pwrite(fd, bytes([65+i])*65536, (20+i)<<20)\n\
                 pid=os.fork()\n\
                 if pid == 0:\n    os.pread(fd, 4096, 20<<20); sys.exit(0)\n\
                 os.waitpid(pid, 0)\n\
                 for i in range(8, 16): os.pwrite(fd, bytes([65+i])*65536, (20+i)<<20)\n",
                path,
            ],
        );
        let blocks: Vec<Vec<u8>> = (0..16u8).map(|i| vec![65 + i; 65536]).collect();
        let mut want: Vec<(usize, &[u8])> = vec![(3 << 20, &a), (9 << 20, &b)];
        for (i, d) in blocks.iter().enumerate() {
            want.push(((20 + i) << 20, d));
        }
        verify(&img, qemu, &want, &format!("{ext}: fork"));
    }
}
