//! `vhdio serve` of a child (the nbdkit plugin) holds qemu's backing-file
//! locks on its parent: qemu-io and the preload library cannot write the
//! parent while it serves, both can once it stops; two servers of two
//! children of one base run at once; and a child whose parent the library
//! is writing is refused at startup.

mod nbd;

use std::path::{Path, PathBuf};
use std::process::Command;

use nbd::*;

/// base.EXT (0x11 in its first MiB, by qemu-io) and two children of it.
fn chain(dir: &Path, fmt: &str, ext: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join(format!("base.{ext}"));
    ok("qemu-img", &["create", "-q", "-f", fmt, s(&base), "16M"]);
    ok(
        "qemu-io",
        &["-f", fmt, "-c", "write -P 0x11 0 1M", s(&base)],
    );
    let a = dir.join(format!("a.{ext}"));
    let b = dir.join(format!("b.{ext}"));
    ok(VHDIO, &["snapshot", s(&base), s(&a)]);
    ok(VHDIO, &["snapshot", s(&base), s(&b)]);
    (base, a, b)
}

fn serve(dir: &Path, image: &Path) -> Server {
    let sub = dir.join(image.file_name().unwrap()).with_extension("srv");
    std::fs::create_dir_all(&sub).unwrap();
    Server::vhdio(&sub, &[s(image)])
}

fn qemu_write(fmt: &str, img: &Path) -> std::process::Output {
    run("qemu-io", &["-f", fmt, "-c", "write -P 0x22 0 4k", s(img)])
}

/// The first byte of the served disk, read by qemu-io over NBD.
fn served_first_byte_is_0x11(server: &Server) -> bool {
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x11 0 4k", &server.uri],
    );
    o.status.success() && !text(&o).contains("Pattern verification failed")
}

#[test]
fn a_served_child_keeps_writers_off_its_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (fmt, ext) in [("qcow2", "qcow2"), ("vhdx", "vhdx"), ("vpc", "vhd")] {
        let (base, a, b) = chain(d, fmt, ext);
        let mut first = serve(d, &a);
        assert!(served_first_byte_is_0x11(&first), "{ext}");

        let q = qemu_write(fmt, &base);
        assert!(
            !q.status.success() && text(&q).contains("Failed to get \"write\" lock"),
            "{ext}: qemu-io wrote the parent of a served child: {}",
            text(&q)
        );
        let l = library_write(&base, 8192, 4096, 0x33);
        let err = text(&l);
        assert!(
            !l.status.success() && err.contains(vdisk::lock::READ_BUSY_MESSAGE),
            "{ext}: the library wrote the parent of a served child: {err}"
        );
        // A golden image: a second child of the same base served at once.
        let mut second = serve(d, &b);
        assert!(served_first_byte_is_0x11(&second), "{ext}");
        assert!(second.alive());
        drop(second);
        assert!(first.alive());
        drop(first);

        let q = qemu_write(fmt, &base);
        assert!(
            q.status.success(),
            "{ext}: qemu-io after the server: {}",
            text(&q)
        );
        let l = library_write(&base, 8192, 4096, 0x33);
        assert!(
            l.status.success(),
            "{ext}: library after the server: {}",
            text(&l)
        );
    }
}

#[test]
fn a_child_is_not_served_while_its_parent_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (base, a, _) = chain(d, "qcow2", "qcow2");
    // The library writes the base (python holds it after one write) while
    // vhdio serve starts on the child.
    let script = "import os,sys\nfd=os.open(sys.argv[1], os.O_RDWR)\nos.pwrite(fd, b'L'*512, 0)\nprint('ready',flush=True)\nsys.stdin.read()\n";
    let mut writer = Command::new("python3")
        .args(["-c", script, s(&base)])
        .env("LD_PRELOAD", library())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(writer.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let mut c = Command::new(VHDIO);
    c.args(["serve", "--socket", s(&d.join("s.sock")), s(&a)]);
    let (_, out) = failed_start(c);
    assert!(
        out.contains(s(&base)) && out.contains(vdisk::lock::PARENT_BUSY_MESSAGE),
        "{out}"
    );
    drop(writer.stdin.take());
    assert!(writer.wait().unwrap().success());
    let server = serve(d, &a);
    drop(server);
}
