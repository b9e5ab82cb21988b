//! vhdpartx as a user runs it: -l against sfdisk's view of the raw disk, -a and
//! -d in a folder with things in the way, exit codes.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{qemu_image_from, sfdisk_dump, sfdisk_raw};

const DOS: &str = "label: dos\n\
    d.raw1 : start=2048, size=8192, type=83\n\
    d.raw3 : start=10240, size=8192, type=7\n\
    d.raw4 : start=20480, size=40960, type=f\n\
    d.raw5 : start=22528, size=4096, type=83\n\
    d.raw6 : start=28672, size=4096, type=82\n\
    d.raw7 : start=34816, size=8192, type=8e\n";

const GPT: &str = "label: gpt\n\
    d.raw1 : start=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
    d.raw2 : start=4096, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n\
    d.raw3 : start=12288, size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n\
    d.raw5 : start=20480, size=8192, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n\
    d.raw7 : start=32768, size=8192, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n\
    d.raw12 : start=65536, size=4096, type=01234567-89AB-CDEF-0123-456789ABCDEF\n";

fn vhdpartx(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhdpartx"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A partitioned raw disk `d.raw` and its dynamic VHD `d.vhd` in `dir`.
fn make_vhd(dir: &Path, script: &str) -> (PathBuf, PathBuf) {
    let raw = sfdisk_raw(dir, "d.raw", 64 << 20, script);
    let data = fs::read(&raw).unwrap();
    let vhd = qemu_image_from(
        &data,
        dir,
        "d.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    fs::remove_file(dir.join("d.vhd.src.raw")).unwrap();
    (raw, vhd)
}

/// The rows of `vhdpartx -l`: name, number, start, sectors, type.
fn list(dir: &Path, image: &str) -> Vec<(String, u32, u64, u64, String)> {
    let o = vhdpartx(&["-l", image], dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "NR", "START", "SECTORS", "TYPE"]);
    lines
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next().unwrap().to_string();
            let nr = it.next().unwrap().parse().unwrap();
            let start = it.next().unwrap().parse().unwrap();
            let sectors = it.next().unwrap().parse().unwrap();
            let kind = it.collect::<Vec<_>>().join(" ");
            (name, nr, start, sectors, kind)
        })
        .collect()
}

#[test]
fn list_dos_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = make_vhd(dir.path(), DOS);
    let rows = list(dir.path(), "d.vhd");
    let want = sfdisk_dump(&raw);
    assert_eq!(rows.len(), want.len());
    for (row, w) in rows.iter().zip(&want) {
        assert_eq!(row.0, format!("d.vhd{}", w.number));
        assert_eq!((row.1, row.2, row.3), (w.number, w.start, w.size));
        assert_eq!(row.4, format!("0x{:0>2}", w.kind.to_lowercase()));
    }
    let numbers: Vec<u32> = rows.iter().map(|r| r.1).collect();
    assert_eq!(numbers, [1, 3, 4, 5, 6, 7]);
    // With a path, names carry it.
    let abs = dir.path().join("d.vhd");
    let rows = list(Path::new("/"), abs.to_str().unwrap());
    assert_eq!(rows[0].0, format!("{}1", abs.display()));
}

#[test]
fn list_gpt_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = make_vhd(dir.path(), GPT);
    let rows = list(dir.path(), "d.vhd");
    let want = sfdisk_dump(&raw);
    let got: Vec<(u32, u64, u64)> = rows.iter().map(|r| (r.1, r.2, r.3)).collect();
    let expected: Vec<(u32, u64, u64)> = want.iter().map(|w| (w.number, w.start, w.size)).collect();
    assert_eq!(got, expected);
    let kinds: Vec<&str> = rows.iter().map(|r| r.4.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "EFI System",
            "Linux filesystem",
            "Linux swap",
            "Microsoft basic data",
            "Linux LVM",
            "01234567-89AB-CDEF-0123-456789ABCDEF"
        ]
    );
}

fn link_target(p: &Path) -> Option<String> {
    fs::read_link(p)
        .ok()
        .map(|t| t.to_str().unwrap().to_string())
}

#[test]
fn add_and_delete_links() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, vhd) = make_vhd(d, DOS);
    let numbers = [1, 3, 4, 5, 6, 7];
    // In the way: a foreign link, a regular file; unrelated: d.vhd99, other names.
    symlink("d.raw", d.join("d.vhd5")).unwrap();
    fs::write(d.join("d.vhd6"), b"mine").unwrap();
    fs::write(d.join("d.vhd99"), b"unrelated").unwrap();
    symlink("d.vhd", d.join("other1")).unwrap();
    symlink("d.vhd", d.join("d.vhdx1")).unwrap();
    symlink("missing", d.join("d.vhd2")).unwrap();

    let o = vhdpartx(&["-a", "d.vhd"], d);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("vhdpartx: "), "{err}");
    assert!(err.contains("d.vhd5") && err.contains("d.vhd6"), "{err}");
    for n in [1, 3, 4, 7] {
        assert_eq!(
            link_target(&d.join(format!("d.vhd{n}"))).as_deref(),
            Some("d.vhd"),
            "{n}"
        );
    }
    assert_eq!(link_target(&d.join("d.vhd5")).as_deref(), Some("d.raw"));
    assert_eq!(fs::read(d.join("d.vhd6")).unwrap(), b"mine");

    // -d removes exactly the links to the image, and an absolute one too.
    symlink(&vhd, d.join("d.vhd42")).unwrap();
    let o = vhdpartx(&["-d", "d.vhd"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    for n in [1, 3, 4, 7, 42] {
        assert!(
            fs::symlink_metadata(d.join(format!("d.vhd{n}"))).is_err(),
            "{n}"
        );
    }
    assert_eq!(link_target(&d.join("d.vhd5")).as_deref(), Some("d.raw"));
    assert_eq!(fs::read(d.join("d.vhd6")).unwrap(), b"mine");
    assert_eq!(fs::read(d.join("d.vhd99")).unwrap(), b"unrelated");
    assert_eq!(link_target(&d.join("other1")).as_deref(), Some("d.vhd"));
    assert_eq!(link_target(&d.join("d.vhdx1")).as_deref(), Some("d.vhd"));
    assert_eq!(link_target(&d.join("d.vhd2")).as_deref(), Some("missing"));

    // Nothing in the way: every partition gets its link, from another folder too.
    fs::remove_file(d.join("d.vhd5")).unwrap();
    fs::remove_file(d.join("d.vhd6")).unwrap();
    let o = vhdpartx(&["-av", vhd.to_str().unwrap()], Path::new("/"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("created").count(), numbers.len());
    let inodes: Vec<u64> = numbers
        .iter()
        .map(|n| {
            let link = d.join(format!("d.vhd{n}"));
            assert_eq!(link_target(&link).as_deref(), Some("d.vhd"));
            fs::symlink_metadata(&link).unwrap().ino()
        })
        .collect();
    // Again: the correct links are kept as they are.
    let o = vhdpartx(&["-a", "-v", "d.vhd"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("kept").count(), numbers.len());
    for (n, ino) in numbers.iter().zip(inodes) {
        assert_eq!(
            fs::symlink_metadata(d.join(format!("d.vhd{n}")))
                .unwrap()
                .ino(),
            ino
        );
    }
    let o = vhdpartx(&["--delete", "--verbose", "d.vhd"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("removed").count(), numbers.len());
    let mut left: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["d.raw", "d.vhd", "d.vhd2", "d.vhd99", "d.vhdx1", "other1"]
    );
}

#[test]
fn exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("plain"), vec![0u8; 4096]).unwrap();
    let usage: &[&[&str]] = &[
        &[],
        &["plain"],
        &["-a"],
        &["-x", "plain"],
        &["-a", "-l", "plain"],
        &["-l", "a", "b"],
    ];
    for args in usage {
        let o = vhdpartx(args, d);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).starts_with("vhdpartx: "), "{args:?}");
    }
    for args in [
        ["-l", "missing"],
        ["-a", "plain"],
        ["-l", "plain"],
        ["-d", "missing"],
        ["-l", "."],
    ] {
        let o = vhdpartx(&args, d);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&o).starts_with("vhdpartx: "),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = vhdpartx(&["--help"], d);
    assert!(o.status.success() && stdout(&o).contains("Usage: vhdpartx"));
    let o = vhdpartx(&["-h"], d);
    assert!(o.status.success() && stdout(&o).contains("-d, --delete"));
    let o = vhdpartx(&["--version"], d);
    assert!(o.status.success() && stdout(&o).starts_with("vhdpartx "));
    // An image without partitions: nothing listed, nothing created, success.
    let vhd = qemu_image_from(
        &vec![0u8; 1 << 20],
        d,
        "e.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    for mode in ["-l", "-a", "-d"] {
        let o = vhdpartx(&[mode, vhd.to_str().unwrap()], d);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        assert_eq!(stdout(&o), "");
    }
}
