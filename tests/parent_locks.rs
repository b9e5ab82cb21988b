//! Parents hold qemu's backing-file locks while a child is open under the
//! library: qemu-io and a library writer are refused on the parent (the
//! library's refusal says why), both work again once the child is closed,
//! two children of one base (a golden image) open at once, and a child whose
//! parent is being written (by the library or by qemu) is refused.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A python program under the library holding `images` open read-only
/// (after reading each) until its stdin closes.
struct Holder {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

const HOLDER_PY: &str = r#"
import os, sys
fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]
print(' '.join(os.pread(fd, 4096, 0)[:1].hex() for fd in fds), flush=True)
sys.stdin.read()
for fd in fds:
    os.close(fd)
print('closed', flush=True)
"#;

impl Holder {
    fn new(dir: &Path, images: &[&Path]) -> Holder {
        let mut args = vec!["-c", HOLDER_PY];
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        let mut child = preload::command(dir, preload::python(), &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let want = vec!["11"; images.len()].join(" ");
        if line.trim() != want {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "holder of {images:?} read {line:?}, not {want:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Holder { child, stdout }
    }
    /// Closes the images; the program exits cleanly.
    fn close(mut self) {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "closed");
        assert!(self.child.wait().unwrap().success());
    }
}

/// base.EXT written by qemu-io with 0x11 (the first byte every holder
/// checks), and two children of it.
fn chain(dir: &Path, qemu: &str, ext: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join(format!("base.{ext}"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    common::run("qemu-img", &["create", "-q", "-f", qemu, &s(&base), "16M"]);
    common::run(
        "qemu-io",
        &["-f", qemu, "-c", "write -P 0x11 0 1M", &s(&base)],
    );
    let children: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| {
            let child = dir.join(format!("child-{n}.{ext}"));
            let file = |p: &Path, w: bool| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(w)
                    .create(w)
                    .truncate(w)
                    .open(p)
                    .unwrap()
            };
            vdisk::snapshot(
                &base,
                &(file(&base, false), false),
                &(file(&child, true), true),
                &child,
            )
            .unwrap();
            child
        })
        .collect();
    (base, children[0].clone(), children[1].clone())
}

fn qemu_write(qemu: &str, img: &Path) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", qemu, "-c", "write -P 0x22 0 4k"])
        .arg(img)
        .output()
        .unwrap()
}

/// A library writer of `img` (python: open read-write, write 4 KiB).
fn library_write(dir: &Path, img: &Path) -> std::process::Output {
    preload::command(
        dir,
        preload::python(),
        &[
            "-c",
            "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.pwrite(fd, b'\\x33'*4096, 8192); os.close(fd)",
            img.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap()
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn an_open_child_keeps_writers_off_its_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (qemu, ext) in [
        ("qcow2", "qcow2"),
        ("vhdx", "vhdx"),
        ("vpc", "vhd"),
        ("vdi", "vdi"),
    ] {
        let (base, a, b) = chain(dir, qemu, ext);
        let holder = Holder::new(dir, &[&a]);

        let q = qemu_write(qemu, &base);
        assert!(
            !q.status.success() && text(&q).contains("Failed to get \"write\" lock"),
            "{ext}: qemu-io wrote the parent of an open child: {}",
            text(&q)
        );
        let l = library_write(dir, &base);
        assert!(
            !l.status.success(),
            "{ext}: a library writer opened the parent of an open child"
        );
        let err = text(&l);
        assert!(
            err.contains("libvhdio[")
                && err.contains(base.to_str().unwrap())
                && err.contains(vdisk::lock::READ_BUSY_MESSAGE),
            "{ext}: {err}"
        );
        // The golden-image case: another child of the same base, in another
        // process and beside the first in one process.
        let second = Holder::new(dir, &[&b]);
        let both = Holder::new(dir, &[&a, &b]);
        both.close();
        second.close();
        // Still refused: the first child is open.
        assert!(!qemu_write(qemu, &base).status.success(), "{ext}");

        holder.close();
        let q = qemu_write(qemu, &base);
        assert!(
            q.status.success(),
            "{ext}: qemu-io after the close: {}",
            text(&q)
        );
        let l = library_write(dir, &base);
        assert!(
            l.status.success(),
            "{ext}: library writer after the close: {}",
            text(&l)
        );
        let raw = common::qemu_raw(&base, qemu);
        assert!(raw[..4096].iter().all(|&b| b == 0x22), "{ext}");
        assert!(raw[8192..12288].iter().all(|&b| b == 0x33), "{ext}");
    }
}

#[test]
fn a_child_is_refused_while_its_parent_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (qemu, ext) in [("qcow2", "qcow2"), ("vhdx", "vhdx")] {
        let (base, a, _) = chain(dir, qemu, ext);
        // qemu-io holding the base open for writing (it has answered one
        // command, so it is open), until its stdin closes.
        let mut q = Command::new("qemu-io")
            .args(["-f", qemu])
            .arg(&base)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = q.stdin.take().unwrap();
        stdin.write_all(b"read 0 512\n").unwrap();
        let mut qout = BufReader::new(q.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("read 512/512 bytes") {
            line.clear();
            assert!(qout.read_line(&mut line).unwrap() > 0, "qemu-io ended");
        }
        let r = preload::command(
            dir,
            preload::python(),
            &[
                "-c",
                "import os,sys\ntry:\n  os.open(sys.argv[1], os.O_RDONLY); print('opened')\nexcept OSError as e: print(e.strerror)",
                a.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
        let out = text(&r);
        assert!(
            out.contains("Device or resource busy")
                && out.contains(base.to_str().unwrap())
                && out.contains(vdisk::lock::PARENT_BUSY_MESSAGE),
            "{ext}: a child opened over a parent qemu writes: {out}"
        );
        drop(stdin);
        assert!(q.wait().unwrap().success());
        // Alone again.
        Holder::new(dir, &[&a]).close();
    }
}

/// The library as the parent's writer: a child of it is refused too, also
/// in the writing process itself.
#[test]
fn a_library_writer_of_a_parent_refuses_its_children() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (base, a, _) = chain(dir, "qcow2", "qcow2");
    let script = "import os,sys\n\
        fd=os.open(sys.argv[1], os.O_RDWR)\n\
        os.pwrite(fd, b'\\x44'*512, 0)\n\
        try:\n  os.open(sys.argv[2], os.O_RDONLY); print('opened')\n\
        except OSError as e: print(e.strerror)\n\
        os.close(fd)\n\
        c=os.open(sys.argv[2], os.O_RDONLY); print(os.pread(c, 1, 0).hex())\n";
    let r = preload::command(
        dir,
        preload::python(),
        &["-c", script, base.to_str().unwrap(), a.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let out = text(&r);
    assert!(r.status.success(), "{out}");
    assert!(
        out.contains("Device or resource busy\n44")
            && out.contains(vdisk::lock::PARENT_BUSY_MESSAGE),
        "{out}"
    );
}
