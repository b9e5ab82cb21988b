//! The `vhdio` command: every subcommand, its output and exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");

fn vhdio(args: &[&str]) -> Output {
    vhdio_at(Path::new(VHDIO), args)
}

fn vhdio_at(bin: &Path, args: &[&str]) -> Output {
    output(Command::new(bin).args(args).env_remove("LD_PRELOAD"))
}

/// Runs `cmd`, retrying while its program is "text file busy": a copy of
/// the binary made by this test can still be open in a child that another
/// test thread forked before its exec closed the copy's fd.
fn output(cmd: &mut Command) -> Output {
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
    cmd.output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = vhdio(args);
    assert_eq!(code(&o), 0, "vhdio {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_size(img: &Path, fmt: &str) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt, s(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.rfind("\"virtual-size\":").unwrap() + 15;
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn help_version_and_usage_errors() {
    let h = ok(&["--help"]);
    assert!(
        h.contains("Usage") && h.contains("snapshot") && h.contains("Exit status"),
        "{h}"
    );
    assert!(ok(&["--version"]).starts_with("vhdio "));
    assert!(ok(&["create", "--help"]).contains("block_size"));
    for bad in [
        &[][..],
        &["frobnicate"],
        &["create", "-f", "qed", "x", "1M"],
        &["create", "-f", "vhd", "x", "12Q"],
        &["run"],
    ] {
        let o = vhdio(bad);
        assert_eq!(code(&o), 2, "{bad:?}");
        assert!(stderr(&o).starts_with("vhdio: "), "{bad:?}: {}", stderr(&o));
    }
}

#[test]
fn create_info_check_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("vhd", "vpc", "", 10u64 << 20, "10M"),
        ("vhd", "vpc", "fixed", 3 << 20, "3M"),
        ("vhdx", "vhdx", "block_size=1M", 33 << 20, "33M"),
        ("vhdx", "vhdx", "fixed,block_size=2M", 5 << 20, "5M"),
        ("vdi", "vdi", "dynamic", 1536 << 10, "1.5M"),
        ("vdi", "vdi", "fixed", 4 << 20, "4M"),
    ];
    for (i, (fmt, qfmt, opts, size, size_arg)) in cases.iter().enumerate() {
        let img = tmp.path().join(format!("i{i}.{fmt}"));
        let mut args = vec!["create", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&img), size_arg]);
        let out = ok(&args);
        assert!(out.starts_with("Created "), "{out}");
        assert_eq!(qemu_size(&img, qfmt), *size, "{args:?}");
        let info = ok(&["info", s(&img)]);
        assert!(
            info.contains(&"virtual size: ".to_string())
                && info.contains(&format!("({size} bytes)")),
            "{info}"
        );
        let kind = if opts.contains("fixed") {
            "fixed"
        } else {
            "dynamic"
        };
        assert!(info.contains(&format!("format: {fmt} {kind}")), "{info}");
        assert!(info.contains("partitions: none"), "{info}");
        let check = ok(&["check", s(&img)]);
        assert!(check.contains("No problems found."), "{check}");
        if *qfmt != "vpc" {
            let q = Command::new("qemu-img")
                .args(["check", "-f", qfmt, s(&img)])
                .output()
                .unwrap();
            assert!(
                q.status.success(),
                "qemu-img check {}: {}",
                img.display(),
                String::from_utf8_lossy(&q.stdout)
            );
        }
        // An existing file is never overwritten.
        let before = std::fs::read(&img).unwrap();
        let o = vhdio(&args);
        assert_eq!(code(&o), 2);
        assert!(stderr(&o).starts_with("vhdio: "), "{}", stderr(&o));
        assert!(std::fs::read(&img).unwrap() == before);
    }
    // 4 KiB sectors (VHDX), and options each format refuses.
    let img = tmp.path().join("4k.vhdx");
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "sector_size=4096",
        s(&img),
        "8M",
    ]);
    assert!(ok(&["info", s(&img)]).contains("sector size: 4096 logical"));
    for (fmt, o) in [
        ("vhd", "sector_size=4096"),
        ("vdi", "block_size=3000"),
        ("vhdx", "bogus"),
    ] {
        let p = tmp.path().join(format!("bad.{fmt}"));
        let out = vhdio(&["create", "-f", fmt, "-o", o, s(&p), "1M"]);
        assert_eq!(code(&out), 2, "{fmt} {o}");
        assert!(
            !p.exists(),
            "{fmt} {o}: a refused image must not be left behind"
        );
    }
}

#[test]
fn snapshot_chain_info_and_check() {
    let tmp = tempfile::tempdir().unwrap();
    for fmt in ["vhd", "vhdx", "vdi"] {
        let dir = tmp.path().join(fmt);
        std::fs::create_dir_all(dir.join("snaps")).unwrap();
        let base = dir.join(format!("base.{fmt}"));
        let s1 = dir.join(format!("snaps/s1.{fmt}"));
        let s2 = dir.join(format!("snaps/s2.{fmt}"));
        ok(&["create", "-f", fmt, s(&base), "20M"]);
        let out = ok(&["snapshot", s(&base), s(&s1)]);
        assert!(out.contains("differencing"), "{out}");
        ok(&["snapshot", s(&s1), s(&s2)]);
        let info = ok(&["info", s(&s2)]);
        assert!(info.contains("chain (3 images, top first):"), "{info}");
        assert!(
            info.contains(&format!("format: {fmt} differencing")),
            "{info}"
        );
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
        let listed: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| {
                l.trim_start()
                    .strip_prefix('[')
                    .and_then(|l| l.split_once("] "))
                    .map(|(_, p)| canon(Path::new(p)))
            })
            .collect();
        assert_eq!(listed, vec![canon(&s2), canon(&s1), canon(&base)], "{info}");
        let check = ok(&["check", s(&s2)]);
        assert!(
            check.contains("chain: 3 images") && check.contains("No problems found."),
            "{check}"
        );
        // The child must not exist yet; the parent must be an image.
        assert_eq!(code(&vhdio(&["snapshot", s(&base), s(&s1)])), 2);
        let not_image = dir.join("plain.txt");
        std::fs::write(&not_image, vec![7u8; 4096]).unwrap();
        assert_eq!(
            code(&vhdio(&[
                "snapshot",
                s(&not_image),
                s(&dir.join(format!("x.{fmt}")))
            ])),
            2
        );
        // A missing parent is a problem for check, an error for info.
        std::fs::rename(&s1, dir.join("gone")).unwrap();
        let o = vhdio(&["check", s(&s2)]);
        assert_eq!(code(&o), 1, "{}", stdout(&o));
        assert!(stdout(&o).contains("chain: problem"), "{}", stdout(&o));
        assert_eq!(code(&vhdio(&["info", s(&s2)])), 2);
    }
}

#[test]
fn check_finds_vhd_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.vhd");
    ok(&["create", "-f", "vhd", s(&img), "8M"]);
    let good = std::fs::read(&img).unwrap();
    let damage = |f: &dyn Fn(&mut Vec<u8>), want: &str| {
        let mut b = good.clone();
        f(&mut b);
        std::fs::write(&img, &b).unwrap();
        let o = vhdio(&["check", s(&img)]);
        assert_eq!(code(&o), 1, "{want}: {}", stdout(&o));
        assert!(
            stdout(&o).contains(want),
            "want '{want}' in:\n{}",
            stdout(&o)
        );
    };
    let n = good.len();
    // Footer checksum (both copies), header checksum, BAT past the file, overlapping blocks.
    damage(&|b| b[n - 512 + 100] ^= 1, "footer checksum");
    damage(&|b| b[100] ^= 1, "footer copy (offset 0) checksum");
    damage(&|b| b[512 + 700] ^= 1, "dynamic header checksum");
    damage(
        &|b| b[1536..1540].copy_from_slice(&0x4000u32.to_be_bytes()),
        "extends past the footer",
    );
    damage(
        &|b| {
            // Two blocks sharing one place (and the BAT's own sector).
            b[1536..1540].copy_from_slice(&3u32.to_be_bytes());
            b[1540..1544].copy_from_slice(&3u32.to_be_bytes());
            let footer = b[n - 512..].to_vec();
            b.resize(n + (4 << 20), 0);
            let m = b.len();
            b[m - 512..].copy_from_slice(&footer);
        },
        "overlaps",
    );
    // Not an image, no file: status 2.
    let plain = tmp.path().join("plain.vhd");
    std::fs::write(&plain, vec![0u8; 4096]).unwrap();
    let o = vhdio(&["check", s(&plain)]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).starts_with("vhdio: "), "{}", stderr(&o));
    assert_eq!(
        code(&vhdio(&["check", s(&tmp.path().join("missing.vhd"))])),
        2
    );
}

#[test]
fn run_finds_the_library_and_prepends_it() {
    let tmp = tempfile::tempdir().unwrap();
    // A private install: bin/vhdio with a (fake) lib/libvhdio.so.
    let bin = tmp.path().join("prefix/bin");
    let lib = tmp.path().join("prefix/lib");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    let exe = bin.join("vhdio");
    std::fs::copy(VHDIO, &exe).unwrap();
    // No library anywhere near it: a clear error.
    let o = vhdio_at(&exe, &["run", "true"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("libvhdio.so not found"),
        "{}",
        stderr(&o)
    );

    let fake = lib.join("libvhdio.so");
    std::fs::write(&fake, b"not really a library").unwrap();
    let fake = std::fs::canonicalize(&fake).unwrap();
    let o = output(
        Command::new(&exe)
            .args(["run", "--", "sh", "-c", "printf %s \"$LD_PRELOAD\"; exit 3"])
            .env("LD_PRELOAD", "/nonexistent/other.so"),
    );
    assert_eq!(code(&o), 3, "the command's status: {}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("{}:/nonexistent/other.so", fake.display())
    );
    // Options of the command are the command's.
    let o = vhdio_at(&exe, &["run", "sh", "-c", "echo -n $0", "-x"]);
    assert_eq!(stdout(&o), "-x");
    // --library wins; a missing command is 127.
    let o = vhdio(&[
        "run",
        "--library",
        s(&fake),
        "sh",
        "-c",
        "printf %s \"$LD_PRELOAD\"",
    ]);
    assert_eq!(stdout(&o), fake.to_str().unwrap());
    // --as-file sets LIBVHD_IO_AS_FILE=1 for the command, and only with it.
    let env = "printf %s \"${LIBVHD_IO_AS_FILE-unset}\"";
    let o = vhdio(&["run", "--library", s(&fake), "--as-file", "sh", "-c", env]);
    assert_eq!(stdout(&o), "1", "{}", stderr(&o));
    let o = Command::new(VHDIO)
        .args(["run", "--library", s(&fake), "sh", "-c", env])
        .env_remove("LIBVHD_IO_AS_FILE")
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "unset", "{}", stderr(&o));
    let o = vhdio(&["run", "--library", s(&fake), "no-such-command-vhdio"]);
    assert_eq!(code(&o), 127);
    assert!(
        stderr(&o).contains("vhdio: cannot run 'no-such-command-vhdio'"),
        "{}",
        stderr(&o)
    );
}

/// With the real library built (cargo test --workspace builds it beside
/// vhdio): dd into and out of an image through `vhdio run`.
#[test]
fn run_dd_through_the_real_library() {
    let real = Path::new(VHDIO).parent().unwrap().join("libvhdio.so");
    if !real.is_file() {
        eprintln!(
            "{} not built: skipping the end-to-end run test",
            real.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.vhdx");
    ok(&["create", "-f", "vhdx", "-o", "block_size=1M", s(&img), "4M"]);
    let data: Vec<u8> = (0..(3u32 << 20) + 4096)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let raw = tmp.path().join("in.raw");
    std::fs::write(&raw, &data).unwrap();
    let of = format!("of={}", s(&img));
    let o = vhdio(&[
        "run",
        "dd",
        &format!("if={}", s(&raw)),
        &of,
        "bs=64k",
        "conv=notrunc",
        "status=none",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = tmp.path().join("out.raw");
    let o = vhdio(&[
        "run",
        "dd",
        &format!("if={}", s(&img)),
        &format!("of={}", s(&out)),
        "bs=1M",
        "status=none",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), 4 << 20);
    assert!(back[..data.len()] == data[..] && back[data.len()..].iter().all(|&b| b == 0));
    assert!(ok(&["check", s(&img)]).contains("No problems found."));
    // --as-file: the image reads as a regular file of the virtual size.
    let o = vhdio(&["run", "stat", "-c", "%F %s", s(&img)]);
    assert_eq!(stdout(&o), "block special file 0\n", "{}", stderr(&o));
    let o = vhdio(&["run", "--as-file", "stat", "-c", "%F %s", s(&img)]);
    assert_eq!(
        stdout(&o),
        format!("regular file {}\n", 4 << 20),
        "{}",
        stderr(&o)
    );
}
