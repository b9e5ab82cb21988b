//! The walking skeleton end to end: real programs read VHDs made by qemu-img
//! (and by other tools) through the library, compared with qemu-img's own
//! conversion and with the data the images were made from.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::fs;
use std::path::Path;

use common::{pattern, qemu_image_from, qemu_raw, run as tool};

/// Images of odd sizes in each VHD flavour, from one deterministic raw disk.
fn flavours(dir: &Path, data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, opts) in [
        ("fixed.vhd", "subformat=fixed"),
        ("dynamic.vhd", "subformat=dynamic"),
        ("forced.vhd", "subformat=dynamic,force_size=on"),
        ("forced-fixed.vhd", "subformat=fixed,force_size=on"),
    ] {
        let img = qemu_image_from(data, dir, name, "vpc", opts);
        let reference = qemu_raw(&img, "vpc");
        // qemu rounds some sizes up to a CHS geometry: the extra tail is zero.
        assert!(reference.len() >= data.len());
        assert_eq!(
            &reference[..data.len()],
            data,
            "{name}: qemu-img disagrees with the source"
        );
        out.push((name.to_string(), reference));
    }
    out
}

#[test]
fn dd_and_cat_read_every_flavour_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Odd size: not a whole number of 2 MiB blocks, not a CHS product.
    let (data, _) = pattern(1, 9_437_184 + 7 * 512);
    for (name, reference) in flavours(dir, &data) {
        let out = dir.join(format!("{name}.dd.raw"));
        preload::run(
            dir,
            "dd",
            &[
                &format!("if={name}"),
                &format!("of={}", out.display()),
                "bs=64k",
            ],
        );
        assert!(
            fs::read(&out).unwrap() == reference,
            "{name}: dd output differs from qemu-img convert"
        );
        // An odd block size: every read is unaligned to sectors and blocks.
        preload::run(
            dir,
            "dd",
            &[
                &format!("if={name}"),
                &format!("of={}", out.display()),
                "bs=3333",
            ],
        );
        assert!(
            fs::read(&out).unwrap() == reference,
            "{name}: dd bs=3333 differs"
        );
        let cat = preload::run(dir, "cat", &[&name]);
        assert!(
            cat.stdout == reference,
            "{name}: cat output differs from qemu-img convert"
        );
        // The container itself is unchanged by reading.
    }
}

#[test]
fn reading_never_modifies_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(2, 3 << 20);
    let img = qemu_image_from(&data, dir, "d.vhd", "vpc", "subformat=dynamic");
    let before = fs::read(&img).unwrap();
    let mtime = fs::metadata(&img).unwrap().modified().unwrap();
    preload::run(dir, "dd", &["if=d.vhd", "of=/dev/null", "bs=1M"]);
    preload::run(dir, "cat", &["d.vhd"]);
    assert!(fs::read(&img).unwrap() == before);
    assert_eq!(fs::metadata(&img).unwrap().modified().unwrap(), mtime);
}

#[test]
fn block_device_view() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(3, 4 << 20);
    qemu_image_from(
        &data,
        dir,
        "d.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let size = preload::run(dir, "blockdev", &["--getsize64", "d.vhd"]);
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (4u64 << 20).to_string()
    );
    // BLKGETSIZE is in 512-byte sectors (the original returned bytes).
    let sectors = preload::run(dir, "blockdev", &["--getsize", "d.vhd"]);
    assert_eq!(
        String::from_utf8_lossy(&sectors.stdout).trim(),
        (8192).to_string()
    );
    let ss = preload::run(dir, "blockdev", &["--getss", "d.vhd"]);
    assert_eq!(String::from_utf8_lossy(&ss.stdout).trim(), "512");
    let st = preload::run(dir, "stat", &["-c", "%F %s", "d.vhd"]);
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim(),
        "block special file 0"
    );
    let st = preload::sh(
        dir,
        "stat -L -c '%F' /dev/stdin < /dev/null; stat -c %F d.vhd",
    );
    assert!(String::from_utf8_lossy(&st.stdout).contains("block special file"));
}

#[test]
fn third_party_images_match_their_digests() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/images");
    if !shared.join("README.md").exists() {
        eprintln!("SKIPPED: ../shared/images is absent; third-party image tests did not run");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (name, sha) in [
        (
            "ext2.vhd",
            "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99",
        ),
        (
            "image.vhd",
            "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25",
        ),
    ] {
        fs::copy(shared.join(name), dir.join(name)).unwrap();
        let out = preload::run(dir, "dd", &[&format!("if={name}"), "of=out.raw", "bs=1M"]);
        let got = tool("sha256sum", &[dir.join("out.raw").to_str().unwrap()]);
        assert_eq!(got.split_whitespace().next(), Some(sha), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if name == "image.vhd" {
            assert!(
                stderr.contains("checksum"),
                "no checksum warning for image.vhd: {stderr}"
            );
        } else {
            assert!(
                !stderr.contains("warning"),
                "unexpected warning for {name}: {stderr}"
            );
        }
    }
    // The ext2 file system inside is intact, as debugfs sees it through the library.
    let ls = preload::run(dir, "debugfs", &["-R", "ls -l /", "ext2.vhd"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("lost+found"));
}

#[test]
fn non_images_behave_as_without_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(4, 1 << 20);
    fs::write(dir.join("plain.raw"), &data).unwrap();
    // A file named like an image that is not one.
    fs::write(dir.join("fake.vhd"), &data[..70000]).unwrap();
    let cat = preload::run(dir, "cat", &["plain.raw"]);
    assert!(cat.stdout == data);
    let cat = preload::run(dir, "cat", &["fake.vhd"]);
    assert!(cat.stdout == data[..70000]);
    let st = preload::run(dir, "stat", &["-c", "%F %s", "fake.vhd"]);
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim(),
        "regular file 70000"
    );
    // Creating and truncating a new .vhd file with dd is an ordinary write.
    preload::run(
        dir,
        "dd",
        &["if=plain.raw", "of=new.vhd", "bs=4096", "count=3"],
    );
    assert_eq!(fs::read(dir.join("new.vhd")).unwrap(), data[..3 * 4096]);
    // Missing files fail as usual.
    let out = preload::command(dir, "cat", &["missing.vhd"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
}

#[test]
fn dd_writes_into_dynamic_and_fixed_vhds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 6 << 20;
    let (data, _) = pattern(5, size);
    let (patch, _) = pattern(6, 3 << 20);
    for (name, opts) in [
        ("dyn.vhd", "subformat=dynamic,force_size=on"),
        ("fix.vhd", "subformat=fixed,force_size=on"),
    ] {
        let img = qemu_image_from(&data, dir, name, "vpc", opts);
        fs::write(dir.join("patch.raw"), &patch).unwrap();
        let mut expect = data.clone();
        // Unaligned offset and length, crossing a 2 MiB block boundary.
        let off = 1_234_567;
        let len = 2_500_001;
        expect[off..off + len].copy_from_slice(&patch[..len]);
        preload::run(
            dir,
            "dd",
            &[
                "if=patch.raw",
                &format!("of={name}"),
                "bs=1",
                &format!("seek={off}"),
                &format!("count={len}"),
                "conv=notrunc",
                "iflag=fullblock",
                "status=none",
                "obs=65536",
            ],
        );
        let got = qemu_raw(&img, "vpc");
        assert!(
            got[..size] == expect[..],
            "{name}: qemu-img reads back different data"
        );
    }
    // Writing past the end of the disk fails with ENOSPC after the part that fits.
    let out = preload::command(
        dir,
        "dd",
        &[
            "if=patch.raw",
            "of=dyn.vhd",
            "bs=1M",
            &format!("seek={}", 5),
            "conv=notrunc",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fork_exec_chains_share_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(7, 3 << 20);
    qemu_image_from(
        &data,
        dir,
        "d.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    fs::write(dir.join("ref.raw"), &data).unwrap();
    let md5 = |d: &[u8]| {
        fs::write(dir.join("tmp.bin"), d).unwrap();
        tool("md5sum", &[dir.join("tmp.bin").to_str().unwrap()])
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let whole = md5(&data);
    let tail = md5(&data[512..]);
    // The offset lives in the dummy: head consumes 512 bytes, md5sum the rest.
    let out = preload::sh(dir, "(head -c 512 >/dev/null; md5sum) < d.vhd");
    assert_eq!(preload::first_word(&out), tail);
    // A child that lost LD_PRELOAD (env -i) still reads the disk on an inherited fd.
    let out = preload::sh(dir, "exec 3<d.vhd; env -i /usr/bin/md5sum /dev/fd/3");
    assert_eq!(preload::first_word(&out), whole);
    // md5sum < image from a shell WITHOUT the library: fd 0 is adopted.
    let out = std::process::Command::new("sh")
        .current_dir(dir)
        .args([
            "-c",
            &format!("LD_PRELOAD={} md5sum < d.vhd", preload::library().display()),
        ])
        .output()
        .unwrap();
    assert_eq!(preload::first_word(&out), whole);
    // /dev/stdin and python's open() name the same virtual disk.
    let out = preload::sh(dir, "md5sum /dev/stdin < d.vhd");
    assert_eq!(preload::first_word(&out), whole);
    let out = preload::run(
        dir,
        "python3",
        &[
            "-c",
            "import hashlib;print(hashlib.md5(open('d.vhd','rb').read()).hexdigest())",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), whole);
}

/// Paths under /dev and /proc that are not /dev/fd/N-style names are ordinary
/// paths: an image in /dev/shm is virtualised like any other.
#[test]
fn images_under_dev_shm() {
    if !Path::new("/dev/shm").is_dir() {
        eprintln!("SKIPPED: no /dev/shm");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("vhdio-test")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(8, 2 << 20);
    qemu_image_from(
        &data,
        dir,
        "s.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let abs = dir.join("s.vhd");
    let out = preload::run(Path::new("/"), "cat", &[abs.to_str().unwrap()]);
    assert!(
        out.stdout == data,
        "cat of an image under /dev/shm read the container"
    );
    let out = preload::run(Path::new("/"), "md5sum", &[abs.to_str().unwrap()]);
    let want = tool("md5sum", &[dir.join("s.vhd.src.raw").to_str().unwrap()]);
    assert_eq!(
        Some(preload::first_word(&out).as_str()),
        want.split_whitespace().next()
    );
}

/// preadv2/pwritev2 (python calls them when flags are given): offset -1 is the
/// file offset, which then advances; an explicit offset leaves it alone.
#[test]
fn preadv2_and_pwritev2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(9, 3 << 20);
    let img = qemu_image_from(
        &data,
        dir,
        "v.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let script = r#"
import os
fd = os.open('v.vhd', os.O_RDWR)
a, b = bytearray(1000), bytearray(3000)
os.lseek(fd, 5000, os.SEEK_SET)
assert os.preadv(fd, [a, b], -1, os.RWF_HIPRI) == 4000
assert os.lseek(fd, 0, os.SEEK_CUR) == 9000, os.lseek(fd, 0, os.SEEK_CUR)
c = bytearray(700)
assert os.preadv(fd, [c], 2_000_000, os.RWF_HIPRI) == 700
assert os.lseek(fd, 0, os.SEEK_CUR) == 9000
assert os.pwritev(fd, [b'x' * 600, b'y' * 424], 1_000_001, os.RWF_DSYNC) == 1024
assert os.pwritev(fd, [b'z' * 100], -1, os.RWF_DSYNC) == 100
assert os.lseek(fd, 0, os.SEEK_CUR) == 9100
open('out.bin', 'wb').write(bytes(a) + bytes(b) + bytes(c))
"#;
    preload::run(dir, "python3", &["-c", script]);
    let out = fs::read(dir.join("out.bin")).unwrap();
    assert!(out[..4000] == data[5000..9000]);
    assert!(out[4000..] == data[2_000_000..2_000_700]);
    let mut expect = data.clone();
    expect[1_000_001..1_000_601].fill(b'x');
    expect[1_000_601..1_001_025].fill(b'y');
    expect[9000..9100].fill(b'z');
    assert!(qemu_raw(&img, "vpc")[..data.len()] == expect[..]);
}
