//! The reader locks of the `vhdio` commands that read a chain (qemu's
//! shared read lock: byte 100 held, 201 and 203 denied): a running convert
//! refuses qemu-io's writes, the library's writer open and vhdio's own
//! writers on every image of its source chain; a running writer (vhdio
//! serve) makes convert, compare, map, info and check refuse, unless -U.

mod nbd;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use nbd::*;
use vdisk::lock::Holder;

/// A parent VHDX with data, and a child written through the library.
fn chain(d: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let parent = d.join("parent.vhdx");
    let child = d.join("child.vhdx");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            s(&parent),
            "16M",
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x5a 0 3M", s(&parent)],
    );
    ok(VHDIO, &["snapshot", s(&parent), s(&child)]);
    let o = library_write(&child, MIB + 4096, 8192, 0xc3);
    assert!(o.status.success(), "{}", text(&o));
    (parent, child)
}

/// A pipe whose buffer is full: a process writing to it blocks until the
/// reader end is read.
fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    let (r, mut w) = std::io::pipe().unwrap();
    let fd = w.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    let chunk = [b'#'; 4096];
    loop {
        match w.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    (r, w)
}

/// Waits (bounded) until someone holds reader locks on `path`.
fn wait_for_readers(path: &Path, child: &mut std::process::Child) {
    for _ in 0..2000 {
        if vdisk::holder_of(path).unwrap() == Holder::Readers {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("convert ended ({status}) before it was seen holding {path:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no reader locks on {path:?}");
}

#[test]
fn a_running_convert_refuses_writers_on_its_whole_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (parent, child) = chain(d);
    let want = library_view(&child, &d.join("want.raw"));
    let parent_bytes = fs::read(&parent).unwrap();
    let out = d.join("out.raw");
    // Its progress goes to a full pipe: the convert blocks at its first
    // progress line, with its source open and locked, until we read.
    let (mut progress, w) = full_pipe();
    let mut convert = Command::new(VHDIO)
        .args(["convert", "-p", "-O", "raw", s(&child), s(&out)])
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::null())
        .stderr(w)
        .spawn()
        .unwrap();
    wait_for_readers(&child, &mut convert);
    wait_for_readers(&parent, &mut convert);

    // qemu-io refuses to write the parent ("Failed to get "write" lock").
    let o = run(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x11 0 4k", s(&parent)],
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("Failed to get \"write\" lock"),
        "qemu-io wrote the parent under a convert: {t}"
    );
    // The library refuses a writer open of the parent (and of the child).
    for img in [&parent, &child] {
        let o = library_write(img, 0, 4096, 0x22);
        assert!(!o.status.success(), "library wrote {img:?} under a convert");
        assert!(text(&o).contains("busy"), "{img:?}: {}", text(&o));
    }
    // vhdio's own writers are refused, naming the readers.
    let o = run(VHDIO, &["resize", s(&parent), "+1M"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "vhdio: {}: another process reads this image and refuses writers",
            s(&parent)
        )),
        "{}",
        text(&o)
    );
    // Readers share.
    ok(VHDIO, &["info", s(&child)]);
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            s(&parent),
            s(&d.join("p.raw")),
        ],
    );

    // Let it finish: it then reads what it read before.
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        progress.read_to_end(&mut sink).unwrap();
    });
    let status = convert.wait().unwrap();
    drain.join().unwrap();
    assert!(status.success(), "convert: {status}");
    assert!(fs::read(&out).unwrap() == want, "convert output differs");
    assert!(fs::read(&parent).unwrap() == parent_bytes, "parent changed");
    // The locks went with the process.
    assert_eq!(vdisk::holder_of(&parent).unwrap(), Holder::Nobody);
    ok(VHDIO, &["resize", s(&parent), "+1M"]);
}

#[test]
fn readers_refuse_an_image_being_written_unless_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (parent, child) = chain(d);
    let out = d.join("out.raw");
    // The parent is written by a server (never do this to a parent: here
    // it only holds the writer locks).
    let server = Server::vhdio(d, &[s(&parent)]);
    let refused = format!(
        "vhdio: {}: another process is writing this image; refusing to read it (-U/--force-share reads it anyway)",
        s(&parent)
    );
    let raw = d.join("other.raw");
    fs::write(&raw, vec![0u8; 16 << 20]).unwrap();
    for args in [
        vec!["convert", "-O", "raw", s(&child), s(&out)],
        vec!["convert", "-O", "vdi", s(&parent), s(&out)],
        vec!["compare", s(&raw), s(&child)],
        vec!["map", s(&child)],
        vec!["info", s(&child)],
        vec!["info", "--output=json", s(&parent)],
        vec!["check", s(&child)],
        vec!["check", "--output=json", s(&parent)],
    ] {
        let o = run(VHDIO, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(&refused), "{args:?}: {}", text(&o));
        assert!(!out.exists(), "{args:?} wrote its output");
    }
    // Writers that only read the parent are refused too.
    let o = run(VHDIO, &["rebase", "-b", "", s(&child)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains(&format!(
        "vhdio: {}: another process is writing",
        s(&parent)
    )));
    // -U reads anyway.
    ok(VHDIO, &["convert", "-U", "-O", "raw", s(&child), s(&out)]);
    ok(VHDIO, &["info", "-U", s(&child)]);
    ok(VHDIO, &["map", "--force-share", s(&child)]);
    ok(VHDIO, &["check", "-U", s(&child)]);
    let o = run(VHDIO, &["compare", "-U", s(&out), s(&child)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    drop(server);
    // Written by nobody: no refusal.
    fs::remove_file(&out).unwrap();
    ok(VHDIO, &["convert", "-O", "raw", s(&child), s(&out)]);
}
