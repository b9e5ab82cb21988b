//! `vhdio commit` and `vhdio rebase` on VHD, VHDX and VDI: parents made by
//! qemu-img and read back by it, children written through vdisk.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;
mod vhdio_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{qemu_image_from, qemu_raw, vdisk_view, write_with_vdisk};
use vhdio_util::{VHDIO, check_clean, ok, s, vhdio};

const MIB: usize = 1 << 20;

/// (extension, qemu format, qemu options).
const FORMATS: [(&str, &str, &str); 3] = [
    ("vhd", "vpc", "subformat=dynamic,force_size=on"),
    ("vhdx", "vhdx", "block_size=1M"),
    ("vdi", "vdi", ""),
];

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = common::Rng(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// 12 MiB: data in the first 6 MiB, a hole, data at 9 MiB.
fn parent_data(seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; 12 * MIB];
    d[..6 * MIB].copy_from_slice(&random(seed, 6 * MIB));
    d[9 * MIB..10 * MIB].copy_from_slice(&random(seed + 1, MIB));
    d
}

/// What the child's writes are: data over parent data, zeros over parent
/// data, data in the parent's hole, an unaligned small write.
fn child_writes() -> Vec<(u64, Vec<u8>)> {
    vec![
        (MIB as u64, random(50, MIB)),
        (4 * MIB as u64, vec![0u8; 512 * 1024]),
        (7 * MIB as u64, random(51, 300 * 1024)),
        (11 * MIB as u64 + 4096, random(52, 4096)),
    ]
}

/// A qemu-made parent and a child of it with `child_writes`.
fn parent_and_child(dir: &Path, ext: &str, fmt: &str, opts: &str) -> (PathBuf, PathBuf) {
    let parent = qemu_image_from(&parent_data(1), dir, &format!("parent.{ext}"), fmt, opts);
    let child = dir.join(format!("child.{ext}"));
    ok(&["snapshot", s(&parent), s(&child)]);
    write_with_vdisk(&child, &child_writes());
    (parent, child)
}

#[test]
fn commit_writes_the_childs_view_into_the_parent() {
    for (ext, fmt, opts) in FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let (parent, child) = parent_and_child(dir.path(), ext, fmt, opts);
        let view = vdisk_view(&child);
        assert!(view != parent_data(1));
        // A child of the child: it must still find its parent afterwards.
        let grandchild = dir.path().join(format!("grandchild.{ext}"));
        ok(&["snapshot", s(&child), s(&grandchild)]);
        let child_len = std::fs::metadata(&child).unwrap().len();
        ok(&["commit", "-p", s(&child)]);
        assert!(
            vdisk_view(&grandchild) == view,
            "{ext}: grandchild after commit"
        );
        assert!(
            std::fs::metadata(&child).unwrap().len() < child_len,
            "{ext}: the emptied child's blocks are given back"
        );
        // The parent alone, read by qemu-img, is the child's former view.
        assert!(qemu_raw(&parent, fmt) == view, "{ext}: parent after commit");
        // The child is an empty child of it: same view, nothing stored.
        assert!(vdisk_view(&child) == view, "{ext}: child after commit");
        let info = ok(&["info", s(&child)]);
        assert!(info.contains("0 B of 12 MiB"), "{ext}: {info}");
        check_clean(&parent, fmt);
        check_clean(&child, "vpc");
    }
}

#[test]
fn commit_into_a_base_further_down() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid) = parent_and_child(dir.path(), "vhdx", "vhdx", "block_size=1M");
    let top = dir.path().join("top.vhdx");
    ok(&["snapshot", s(&mid), s(&top)]);
    write_with_vdisk(&top, &[(3 * MIB as u64, random(60, 8192))]);
    let view = vdisk_view(&top);
    let o = vhdio(&["commit", "-b", s(&base), s(&top)]);
    assert_eq!(o.status.code(), Some(0));
    // The stale image in between is named, with why.
    let warned = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        warned.contains(&format!(
            "vhdio: {}: stale: it was between {} and {}",
            s(&mid),
            s(&top),
            s(&base)
        )) && warned.contains("no longer reads as before"),
        "{warned}"
    );
    assert!(qemu_raw(&base, "vhdx") == view);
    assert!(vdisk_view(&top) == view);
    // It refuses to open rather than show a wrong disk (VHDX's guard: its
    // parent's DataWriteGuid changed).
    let o = vhdio(&["info", s(&mid)]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("identity differs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let info = ok(&["info", s(&top)]);
    assert!(info.contains("chain (2 images"), "{info}");
    // Not in the chain; not a differencing image.
    assert_eq!(
        vhdio(&["commit", "-b", s(&top), s(&top)]).status.code(),
        Some(2)
    );
    assert_eq!(vhdio(&["commit", s(&base)]).status.code(), Some(2));
}

#[test]
fn rebase_u_after_moving_the_parent() {
    for (ext, fmt, opts) in FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let (parent, child) = parent_and_child(dir.path(), ext, fmt, opts);
        let view = vdisk_view(&child);
        // VDI records no path (its parent is searched by UUID in the
        // child's folder): it is renamed there; the others move away.
        let moved = if ext == "vdi" {
            dir.path().join("renamed.vdi")
        } else {
            std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
            dir.path().join("elsewhere").join(format!("p.{ext}"))
        };
        std::fs::rename(&parent, &moved).unwrap();
        if ext != "vdi" {
            assert_eq!(vhdio(&["info", s(&child)]).status.code(), Some(2));
        }
        // Another image with the same content but its own identity.
        let other = qemu_image_from(&parent_data(1), dir.path(), &format!("o.{ext}"), fmt, opts);
        let o = vhdio(&["rebase", "-u", "-b", s(&other), s(&child)]);
        assert_eq!(o.status.code(), Some(2), "{ext}: other identity accepted");
        assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
        ok(&["rebase", "-u", "-b", s(&moved), s(&child)]);
        assert!(vdisk_view(&child) == view, "{ext}: view after rebase -u");
        let info = ok(&["info", s(&child)]);
        assert!(
            info.contains(moved.file_name().unwrap().to_str().unwrap()),
            "{info}"
        );
        check_clean(&child, "vpc");
        // --force links the other one (same content: same view).
        ok(&["rebase", "-u", "--force", "-b", s(&other), s(&child)]);
        assert!(vdisk_view(&child) == view, "{ext}: view after --force");
        let info = ok(&["info", s(&child)]);
        assert!(info.contains(&format!("o.{ext}")), "{info}");
    }
}

#[test]
fn safe_rebase_keeps_the_view_and_the_new_parent() {
    for (ext, fmt, opts) in FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let (_, child) = parent_and_child(dir.path(), ext, fmt, opts);
        let view = vdisk_view(&child);
        let mut other_data = parent_data(7);
        other_data[..MIB].copy_from_slice(&parent_data(1)[..MIB]);
        let other = qemu_image_from(&other_data, dir.path(), &format!("n.{ext}"), fmt, opts);
        let before = std::fs::read(&other).unwrap();
        ok(&["rebase", "-p", "-b", s(&other), s(&child)]);
        assert!(vdisk_view(&child) == view, "{ext}: view after rebase");
        assert!(
            std::fs::read(&other).unwrap() == before,
            "{ext}: new parent written"
        );
        let info = ok(&["info", s(&child)]);
        assert!(info.contains(&format!("n.{ext}")), "{info}");
        check_clean(&child, "vpc");
        // Standalone.
        ok(&["rebase", "-b", "", s(&child)]);
        assert!(vdisk_view(&child) == view, "{ext}: view standalone");
        assert!(
            qemu_raw(&child, fmt) == view,
            "{ext}: qemu reads the standalone image"
        );
        let info = ok(&["info", s(&child)]);
        assert!(!info.contains("differencing"), "{info}");
        check_clean(&child, fmt);
    }
}

/// Starts `vhdio args...` and kills it after `delay_ms` (how far it got
/// depends on the delay), then reaps it.
fn kill_after(args: &[&str], delay_ms: u64) {
    let mut p = Command::new(VHDIO).args(args).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    let _ = p.kill();
    p.wait().unwrap();
}

#[test]
fn killed_commit_leaves_the_childs_view() {
    for (ext, fmt, opts) in FORMATS {
        for delay_ms in [10u64, 40, 90] {
            let dir = tempfile::tempdir().unwrap();
            let parent =
                qemu_image_from(&parent_data(1), dir.path(), &format!("p.{ext}"), fmt, opts);
            let child = dir.path().join(format!("c.{ext}"));
            ok(&["snapshot", s(&parent), s(&child)]);
            write_with_vdisk(&child, &[(0, random(80, 12 * MIB))]);
            let view = vdisk_view(&child);
            kill_after(&["commit", s(&child)], delay_ms);
            assert!(
                vdisk_view(&child) == view,
                "{ext}: child's view after kill at {delay_ms} ms"
            );
            ok(&["commit", s(&child)]);
            assert!(
                qemu_raw(&parent, fmt) == view,
                "{ext}: commit after a killed one"
            );
        }
    }
}

#[test]
fn killed_rebase_leaves_the_childs_view() {
    for (ext, fmt, opts) in FORMATS {
        for (delay_ms, standalone) in [(10u64, false), (40, true), (90, false)] {
            let dir = tempfile::tempdir().unwrap();
            let (_, child) = parent_and_child(dir.path(), ext, fmt, opts);
            let view = vdisk_view(&child);
            let other =
                qemu_image_from(&parent_data(9), dir.path(), &format!("n.{ext}"), fmt, opts);
            let target = if standalone { "" } else { s(&other) };
            kill_after(&["rebase", "-b", target, s(&child)], delay_ms);
            assert!(
                vdisk_view(&child) == view,
                "{ext}: child's view after kill at {delay_ms} ms"
            );
            ok(&["rebase", "-b", target, s(&child)]);
            assert!(
                vdisk_view(&child) == view,
                "{ext}: rebase after a killed one"
            );
        }
    }
}
