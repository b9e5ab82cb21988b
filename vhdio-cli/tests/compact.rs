//! `vhdio compact` (issue 16): the round trip users want (mkfs.ext4, a
//! 300 MiB file written and deleted, `e2fsck -E discard`, compact: the file
//! is back within one block of its size after mkfs, e2fsck clean), a whole
//! `blkdiscard` leaves only metadata, `--dry-run`, refusal while another
//! process writes the image, and kill -9 during compact.

mod nbd;

use std::fs;
use std::path::Path;
use std::process::Command;

use nbd::*;

const FORMATS: [(&str, &str, &str, u64); 3] = [
    ("vpc", "subformat=dynamic", "vhd", 2 * MIB),
    ("vhdx", "block_size=8M", "vhdx", 8 * MIB),
    ("vdi", "static=off", "vdi", MIB),
];

/// `program args` with the library preloaded, in `dir`; must succeed.
fn preloaded(dir: &Path, program: &str, args: &[&str]) -> String {
    let o = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("LD_PRELOAD", library())
        .output()
        .unwrap();
    assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

fn check_clean(fmt: &str, img: &Path) {
    if fmt == "vpc" {
        ok(VHDIO, &["check", s(img)]);
    } else {
        ok("qemu-img", &["check", "-f", fmt, s(img)]);
    }
}

#[test]
fn round_trip_mkfs_write_delete_fsck_discard_compact() {
    for (fmt, opts, ext, block) in FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let name = format!("fs.{ext}");
        let img = d.join(&name);
        ok(
            "qemu-img",
            &["create", "-q", "-f", fmt, "-o", opts, s(&img), "1G"],
        );
        preloaded(d, "mkfs.ext4", &["-q", "-F", &name]);
        let after_mkfs = len(&img);
        ok(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", s(&d.join("big.bin"))),
                "bs=1M",
                "count=300",
                "status=none",
            ],
        );
        preloaded(d, "debugfs", &["-w", "-R", "write big.bin big", &name]);
        let with_file = len(&img);
        assert!(
            with_file >= after_mkfs + 200 * MIB,
            "{fmt}: the file did not grow: {after_mkfs} -> {with_file}"
        );
        preloaded(d, "debugfs", &["-w", "-R", "rm big", &name]);
        preloaded(d, "e2fsck", &["-fy", "-E", "discard", &name]);
        let out = ok(VHDIO, &["compact", s(&img)]);
        let compacted = len(&img);
        assert!(
            compacted <= after_mkfs + block,
            "{fmt}: {after_mkfs} after mkfs, {with_file} with the file, {compacted} after compact: {out}"
        );
        check_clean(fmt, &img);
        let raw = d.join("fs.raw");
        ok(
            "qemu-img",
            &["convert", "-f", fmt, "-O", "raw", s(&img), s(&raw)],
        );
        ok("e2fsck", &["-fn", s(&raw)]);
        fs::remove_file(&raw).unwrap();
        // A whole-disk discard, then compact: only metadata is left.
        preloaded(d, "blkdiscard", &["-f", &name]);
        ok(VHDIO, &["compact", s(&img)]);
        assert!(
            len(&img) <= 8 * MIB,
            "{fmt}: {} bytes left after blkdiscard + compact",
            len(&img)
        );
        check_clean(fmt, &img);
        let zeros = fs::read(&{
            ok(
                "qemu-img",
                &["convert", "-f", fmt, "-O", "raw", s(&img), s(&raw)],
            );
            raw.clone()
        })
        .unwrap();
        assert!(zeros.iter().all(|&b| b == 0), "{fmt}: not all zeros");
    }
}

/// Zero blocks written by an earlier tool (no discard: qemu-io writes
/// zeros) are found, reported by --dry-run without change, and given back.
#[test]
fn dry_run_reports_and_compact_unmaps_zero_blocks() {
    for (fmt, opts, ext, block) in FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join(format!("z.{ext}"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", fmt, "-o", opts, s(&img), "64M"],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "write -P 0x61 0 64M",
                "-c",
                "write -P 0 8M 32M",
                s(&img),
            ],
        );
        let before = fs::read(&img).unwrap();
        let out = ok(VHDIO, &["compact", "--dry-run", s(&img)]);
        let zero_blocks = 32 * MIB / block;
        assert!(
            out.contains(&format!("{zero_blocks} of them only zeros")),
            "{fmt}: {out}"
        );
        assert!(
            fs::read(&img).unwrap() == before,
            "{fmt}: --dry-run changed the image"
        );
        let allocated = 64 * MIB / block;
        let checked = ok(VHDIO, &["check", s(&img)]);
        assert!(
            checked.contains(&format!(
                "{zero_blocks} of {allocated} allocated blocks hold only zeros"
            )),
            "{fmt}: {checked}"
        );
        let info = ok(VHDIO, &["info", s(&img)]);
        assert!(
            info.contains(&format!("blocks: {allocated} of ")),
            "{fmt}: {info}"
        );
        let view = qemu_raw(fmt, &img);
        ok(VHDIO, &["compact", s(&img)]);
        assert!(
            len(&img) <= 32 * MIB + 8 * MIB,
            "{fmt}: {} bytes after compact",
            len(&img)
        );
        assert!(
            qemu_raw(fmt, &img) == view,
            "{fmt}: compact changed the disk"
        );
        check_clean(fmt, &img);
    }
}

fn qemu_raw(fmt: &str, img: &Path) -> Vec<u8> {
    let raw = img.with_extension("raw");
    ok(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", s(img), s(&raw)],
    );
    let v = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    v
}

#[test]
fn compact_refuses_while_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("busy.vhdx");
    ok("qemu-img", &["create", "-q", "-f", "vhdx", s(&img), "64M"]);
    let before = fs::read(&img).unwrap();
    let server = Server::vhdio(d, &[s(&img)]);
    let o = run(VHDIO, &["compact", s(&img)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("another process is writing"),
        "{}",
        text(&o)
    );
    drop(server);
    assert!(fs::read(&img).unwrap() == before);
}

/// kill -9 at moments spread over a compact (each of a fresh copy): each
/// time the image reads the same disk; a compact after it completes it.
#[test]
fn kill_during_compact_keeps_the_disk() {
    for (fmt, opts, ext, _) in FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join(format!("k.{ext}"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", fmt, "-o", opts, s(&img), "128M"],
        );
        let mut cmd = vec!["-f", fmt];
        let writes: Vec<String> = (0..16)
            .map(|i| format!("write -P {} {}M 4M", i + 1, i * 8))
            .collect();
        for w in &writes {
            cmd.extend(["-c", w.as_str()]);
        }
        cmd.push(s(&img));
        ok("qemu-io", &cmd);
        // Zero every other written run: holes all over the file.
        let zero: Vec<String> = (0..16)
            .step_by(2)
            .map(|i| format!("write -z {}M 4M", i * 8))
            .collect();
        let mut cmd = vec!["-f", fmt];
        for w in &zero {
            cmd.extend(["-c", w.as_str()]);
        }
        cmd.push(s(&img));
        ok("qemu-io", &cmd);
        let view = qemu_raw(fmt, &img);
        let original = fs::read(&img).unwrap();
        let t = std::time::Instant::now();
        ok(VHDIO, &["compact", s(&img)]);
        let full_ms = t.elapsed().as_millis() as u64;
        println!("{fmt}: compact takes {full_ms} ms");
        // Each kill interrupts a fresh compact at another moment of it.
        for k in 1..=6u64 {
            fs::write(&img, &original).unwrap();
            let delay_ms = full_ms * k / 7;
            let mut child = Command::new(VHDIO)
                .args(["compact", s(&img)])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            let _ = child.kill();
            let _ = child.wait();
            // A VHDX log left active is replayed by a writer (vhdio's readers
            // replay it in memory only: a read never changes an image):
            // qemu's documented way, which also checks the result.
            if fmt == "vhdx" {
                ok("qemu-img", &["check", "-r", "all", "-f", "vhdx", s(&img)]);
            }
            assert!(
                qemu_raw(fmt, &img) == view,
                "{fmt}: disk differs after kill at {delay_ms} ms"
            );
        }
        ok(VHDIO, &["compact", s(&img)]);
        assert!(
            qemu_raw(fmt, &img) == view,
            "{fmt}: disk differs after compact"
        );
        check_clean(fmt, &img);
    }
}
