//! `vhdio serve` and the nbdkit plugin, against real NBD clients (qemu-img,
//! qemu-io, nbdinfo, nbdcopy) over a Unix socket. The images are made by
//! qemu-img and `vhdio snapshot`, written through the preload library, and
//! read back through it.

mod nbd;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nbd::*;

/// Parent written by qemu: 0x11 in 0..8M and 0x33 in 16M..20M.
fn make_chain(dir: &Path, fmt: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("base.{fmt}"));
    let child = dir.join(format!("child.{fmt}"));
    let opts = if fmt == "vhdx" {
        "block_size=1M"
    } else {
        "static=off"
    };
    ok(
        "qemu-img",
        &["create", "-q", "-f", fmt, "-o", opts, s(&base), "64M"],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            fmt,
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x33 16M 4M",
            s(&base),
        ],
    );
    ok(VHDIO, &["snapshot", s(&base), s(&child)]);
    (base, child)
}

fn served_chain(fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, child) = make_chain(d, fmt);
    // qemu itself cannot open the child.
    let o = run("qemu-img", &["info", "-f", fmt, s(&child)]);
    assert!(
        !o.status.success(),
        "qemu opened the {fmt} child: {}",
        text(&o)
    );
    let o = library_write(&child, 10 * MIB, 2 * MIB, 0x44);
    assert!(o.status.success(), "library write: {}", text(&o));
    let o = library_write(&child, 2 * MIB, MIB, 0x55);
    assert!(o.status.success(), "library write: {}", text(&o));
    let view = library_view(&child, &d.join("view.raw"));
    assert_eq!(view.len() as u64, 64 * MIB);
    let base_before = fs::read(&base).unwrap();

    let mut server = Server::vhdio(d, &[s(&child)]);
    let uri = server.uri.clone();
    assert_eq!(
        ok("nbdinfo", &["--size", &uri]).trim(),
        (64 * MIB).to_string()
    );
    let converted = d.join("converted.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, s(&converted)],
    );
    assert!(
        fs::read(&converted).unwrap() == view,
        "qemu-img convert differs"
    );
    assert_eq!(
        data_extents(&uri),
        [(0, 8 * MIB), (10 * MIB, 12 * MIB), (16 * MIB, 20 * MIB)],
        "nbdinfo --map"
    );
    let map = ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let holes = map
        .lines()
        .filter(|l| l.contains("\"data\": false"))
        .count();
    assert_eq!(holes, 3, "qemu-img map: {map}");
    let copied = d.join("copied.raw");
    ok("nbdcopy", &[&uri, s(&copied)]);
    assert!(fs::read(&copied).unwrap() == view, "nbdcopy differs");

    // A second writer is refused while nbdkit serves the image read-write.
    let o = library_write(&child, 0, 65536, 0x66);
    assert!(
        !o.status.success(),
        "library wrote while served: {}",
        text(&o)
    );

    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "discard 4M 1M",
            &uri,
        ],
    );
    assert!(server.alive());
    drop(server);
    let mut expect = view;
    expect[MIB as usize..(MIB + 65536) as usize].fill(0x5a);
    // discard: the plugin trims through the image layer, which promises
    // zeros afterwards (never the parent's data).
    expect[4 * MIB as usize..5 * MIB as usize].fill(0);
    let after = library_view(&child, &d.join("after.raw"));
    assert!(after == expect, "child after qemu-io differs");
    assert!(fs::read(&base).unwrap() == base_before, "parent changed");
}

#[test]
fn differencing_vhdx_served_to_real_clients() {
    served_chain("vhdx");
}

#[test]
fn differencing_vdi_served_to_real_clients() {
    served_chain("vdi");
}

/// `d/disk.vhdx`, 16 MiB made by qemu-img, its first MiB `byte` written
/// by qemu-io.
fn vhdx_first_mib(d: &Path, byte: u8) -> PathBuf {
    let img = d.join("disk.vhdx");
    ok("qemu-img", &["create", "-q", "-f", "vhdx", s(&img), "16M"]);
    let write = format!("write -P {byte:#04x} 0 1M");
    ok("qemu-io", &["-f", "vhdx", "-c", &write, s(&img)]);
    img
}

#[test]
fn read_only_and_writer_locks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = vhdx_first_mib(d, 0x77);

    // Read-only: reads work, writes are refused, the image is not locked.
    let server = Server::vhdio(d, &["--read-only", s(&img)]);
    let uri = server.uri.clone();
    let o = run("nbdinfo", &["--can", "write", &uri]);
    assert_eq!(o.status.code(), Some(2), "writable: {}", text(&o));
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 64k", &uri]);
    assert!(
        !o.status.success(),
        "write to a read-only export: {}",
        text(&o)
    );
    let o = ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x77 0 1M", &uri],
    );
    assert!(!o.contains("failed"), "{o}");
    ok(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x78 1M 64k", s(&img)],
    );
    drop(server);

    // Read-write: qemu and the library are refused as second writers.
    let mut server = Server::vhdio(d, &[s(&img)]);
    let o = run("qemu-io", &["-f", "vhdx", "-c", "write 0 64k", s(&img)]);
    assert!(!o.status.success(), "qemu wrote while served: {}", text(&o));
    assert!(text(&o).contains("lock"), "{}", text(&o));
    let o = library_write(&img, 0, 65536, 0x79);
    assert!(
        !o.status.success(),
        "library wrote while served: {}",
        text(&o)
    );
    // A second read-write server refuses to start, with the reason.
    let other = d.join("other");
    fs::create_dir(&other).unwrap();
    let mut c = Command::new(VHDIO);
    c.args(["serve", "--socket", s(&other.join("s.sock")), s(&img)]);
    let (_, out) = failed_start(c);
    assert!(out.contains("another process is writing"), "{out}");
    assert!(server.alive());
    drop(server);
    // Released at exit.
    ok("qemu-io", &["-f", "vhdx", "-c", "write 0 64k", s(&img)]);
}

/// The error text of vdisk for `image`, as `vhdio info` prints it.
fn library_error(image: &Path) -> String {
    let o = run(VHDIO, &["info", s(image)]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    let prefix = format!("vhdio: {}: ", s(image));
    e.trim().strip_prefix(&prefix).unwrap_or(&e).to_string()
}

/// nbdkit with the plugin serving `image` on `socket` fails to start, and
/// its log holds `expected`.
fn assert_plugin_fails_with(socket: &Path, image: &Path, expected: &str) {
    let mut c = Command::new("nbdkit");
    c.args(["--foreground", "--unix", s(socket)])
        .arg(plugin())
        .arg(format!("file={}", s(image)));
    let (_, out) = failed_start(c);
    assert!(
        out.contains(expected),
        "nbdkit log lacks {expected:?}: {out}"
    );
}

#[test]
fn plugin_errors_reach_nbdkits_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A missing parent.
    let (base, child) = make_chain(d, "vhdx");
    fs::rename(&base, d.join("moved.vhdx")).unwrap();
    // vhdio names the parent it looked for as vdisk does (the paths tried
    // differ: vhdio also tries the relative path from the current folder).
    let error = library_error(&child);
    let at = error.find("not found: ").expect(&error) + 11;
    let expected = error[at..error.find("; tried").expect(&error)].to_string();
    assert_plugin_fails_with(&d.join("a.sock"), &child, &expected);
    // A corrupt image: the VDI header's block size zeroed.
    let vdi = d.join("bad.vdi");
    ok("qemu-img", &["create", "-q", "-f", "vdi", s(&vdi), "8M"]);
    let mut bytes = fs::read(&vdi).unwrap();
    bytes[0x178..0x17c].fill(0);
    fs::write(&vdi, &bytes).unwrap();
    let expected = library_error(&vdi);
    assert_plugin_fails_with(&d.join("b.sock"), &vdi, &expected);

    // A read error (the data cut off the file after the open) is EIO to the
    // client; nbdkit keeps serving.
    let img = d.join("cut.vhdx");
    ok("qemu-img", &["create", "-q", "-f", "vhdx", s(&img), "64M"]);
    ok(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x12 0 4M", s(&img)],
    );
    let mut server = Server::nbdkit(d, &[&format!("file={}", s(&img)), "readonly=true"]);
    let uri = server.uri.clone();
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x12 0 64k", &uri],
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &uri]);
    assert!(text(&o).contains("Input/output error"), "{}", text(&o));
    assert!(server.alive(), "nbdkit died on a read error");
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 32M 64k", &uri],
    );
    let log = server.output();
    assert!(log.contains("vhdio"), "{log}");
}

#[test]
fn partition_by_number_and_by_link() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.vhdx");
    ok("qemu-img", &["create", "-q", "-f", "vhdx", s(&img), "16M"]);
    let mut sfdisk = Command::new("sfdisk")
        .arg(&img)
        .env("LD_PRELOAD", library())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=4096, type=83\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    assert!(library_write(&img, MIB, 65536, 0x3c).status.success());
    let link = d.join("disk.vhdx1");
    std::os::unix::fs::symlink("disk.vhdx", &link).unwrap();
    for args in [vec!["--partition", "1", s(&img)], vec![s(&link)]] {
        let server = Server::vhdio(d, &args);
        let uri = server.uri.clone();
        assert_eq!(
            ok("nbdinfo", &["--size", &uri]).trim(),
            (2 * MIB).to_string()
        );
        let o = ok("qemu-io", &["-f", "raw", "-c", "read -P 0x3c 0 64k", &uri]);
        assert!(!o.contains("failed"), "{args:?}: {o}");
    }
}

#[test]
fn missing_nbdkit_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.vhdx");
    ok(VHDIO, &["create", "-f", "vhdx", s(&img), "1M"]);
    let o = Command::new(VHDIO)
        .args(["serve", s(&img)])
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    assert!(text(&o).contains("apt-get install nbdkit"), "{}", text(&o));
}

#[test]
fn sector_4k_vhdx_block_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk4k.vhdx");
    ok(
        VHDIO,
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "sector_size=4096",
            s(&img),
            "8M",
        ],
    );
    let server = Server::vhdio(d, &[s(&img)]);
    let uri = server.uri.clone();
    let info = ok("nbdinfo", &["--json", &uri]);
    assert!(info.contains("\"block_size_minimum\": 4096"), "{info}");
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x4b 12k 8k",
            "-c",
            "flush",
            &uri,
        ],
    );
    drop(server);
    let view = library_view(&img, &d.join("view.raw"));
    assert!(view[12288..20480].iter().all(|&b| b == 0x4b));
    assert!(view[..12288].iter().chain(&view[20480..]).all(|&b| b == 0));
}

/// Plain `nbdkit vhdio` learns of `-r` only when a client connects: with
/// `-r` it reads beside another writer; without, a client's open is refused.
#[test]
fn plain_nbdkit_locks_at_first_client() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = vhdx_first_mib(d, 0x21);
    let writer_dir = d.join("writer");
    fs::create_dir(&writer_dir).unwrap();
    let mut writer = Server::vhdio(&writer_dir, &[s(&img)]);

    let reader_dir = d.join("reader");
    fs::create_dir(&reader_dir).unwrap();
    let mut c = Command::new("nbdkit");
    c.args(["--foreground", "-r", "--unix"])
        .arg(reader_dir.join("s.sock"))
        .arg(plugin())
        .arg(format!("file={}", s(&img)));
    let reader = Server::start(c, reader_dir.join("s.sock"));
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x21 0 1M", &reader.uri],
    );
    drop(reader);

    let mut lazy = Server::nbdkit(d, &[&format!("file={}", s(&img))]);
    let o = run("nbdinfo", &["--size", &lazy.uri]);
    assert!(!o.status.success(), "opened beside a writer: {}", text(&o));
    assert!(lazy.alive());
    let log = lazy.output();
    assert!(log.contains("another process is writing"), "{log}");
    assert!(writer.alive());
}

/// qemu cannot open a dirty VHDX read-only; the plugin replays its log in
/// memory and leaves the file alone.
#[test]
fn dirty_vhdx_served_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("dirty.vhdx");
    let expect = dirty_vhdx(&img);
    let before = fs::read(&img).unwrap();
    let server = Server::vhdio(d, &["--read-only", s(&img)]);
    let out = d.join("out.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &server.uri, s(&out)],
    );
    drop(server);
    assert!(fs::read(&out).unwrap() == expect, "served disk differs");
    assert!(
        fs::read(&img).unwrap() == before,
        "a read-only serve wrote the image"
    );
}

/// A VMDK chain (monolithicFlat base, child by `vhdio snapshot`) served by
/// `vhdio serve`: qemu-img reads over NBD what qemu-img reads from the
/// files (qemu opens VMDK chains itself), and a write over NBD lands.
#[test]
fn vmdk_chain_served_to_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vmdk");
    let child = d.join("child.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            s(&base),
            "64M",
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x11 0 8M", s(&base)],
    );
    ok(VHDIO, &["snapshot", s(&base), s(&child)]);
    let o = library_write(&child, 2 * MIB, MIB, 0x55);
    assert!(o.status.success(), "library write: {}", text(&o));
    let flat_before = fs::read(d.join("base-flat.vmdk")).unwrap();
    let direct = d.join("direct.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&child), s(&direct)],
    );
    let mut server = Server::vhdio(d, &[s(&child)]);
    let uri = server.uri.clone();
    let served = d.join("served.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, s(&served)],
    );
    assert!(
        fs::read(&served).unwrap() == fs::read(&direct).unwrap(),
        "NBD view differs"
    );
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 20M 1M", &uri],
    );
    let _ = server.output();
    let r = ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "vmdk",
            "-c",
            "read -P 0x66 20M 1M",
            "-c",
            "read -P 0x55 2M 1M",
            "-c",
            "read -P 0x11 4M 1M",
            s(&child),
        ],
    );
    assert!(!r.contains("failed"), "{r}");
    assert!(ok("qemu-img", &["check", "-f", "vmdk", s(&child)]).contains("No errors"));
    assert!(
        fs::read(d.join("base-flat.vmdk")).unwrap() == flat_before,
        "parent changed"
    );
}

/// `vhdio serve --punch-holes` (the plugin's punch-holes=true): an NBD trim
/// on a fixed VHDX punches holes in the file; without it, it does not. The
/// range reads zeros either way.
#[test]
fn punch_holes_parameter_of_the_plugin() {
    use std::os::unix::fs::MetadataExt;
    for punch in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw = d.join("src.raw");
        let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8 | 1).collect();
        fs::write(&raw, &data).unwrap();
        let img = d.join("d.vhdx");
        ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vhdx",
                "-o",
                "subformat=fixed",
                s(&raw),
                s(&img),
            ],
        );
        let before = fs::metadata(&img).unwrap().blocks() * 512;
        let mut args = vec![s(&img)];
        if punch {
            args.insert(0, "--punch-holes");
        }
        let mut server = Server::vhdio(d, &args);
        let uri = server.uri.clone();
        ok("qemu-io", &["-f", "raw", "-c", "discard 2M 4M", &uri]);
        assert!(server.alive());
        drop(server);
        let after = fs::metadata(&img).unwrap().blocks() * 512;
        if punch {
            assert!(
                after + 4 * MIB <= before,
                "punch-holes: {before} -> {after}"
            );
        } else {
            assert!(after >= before, "no punch-holes: {before} -> {after}");
        }
        let mut expect = data;
        expect[2 * MIB as usize..6 * MIB as usize].fill(0);
        assert!(
            library_view(&img, &d.join("view.raw")) == expect,
            "punch={punch}: view"
        );
        ok("qemu-img", &["check", "-f", "vhdx", s(&img)]);
    }
}
