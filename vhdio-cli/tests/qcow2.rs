//! `vhdio create -f qcow2`, `snapshot`, `info` and `check` on qcow2 images,
//! checked with qemu-img.

use std::path::Path;
use std::process::{Command, Output};

const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn create_snapshot_info_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let v2 = d.join("v2.qcow2");
    ok(
        VHDIO,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=0.10",
            s(&v2),
            "100M",
        ],
    );
    let info = ok("qemu-img", &["info", s(&v2)]);
    assert!(
        info.contains("compat: 0.10") && info.contains("cluster_size: 4096"),
        "{info}"
    );
    ok("qemu-img", &["check", s(&v2)]);

    let base = d.join("base.qcow2");
    ok(VHDIO, &["create", "-f", "qcow2", s(&base), "32M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 9 1M 3M", s(&base)],
    );
    let child = d.join("child.qcow2");
    ok(VHDIO, &["snapshot", s(&base), s(&child)]);
    let info = ok("qemu-img", &["info", s(&child)]);
    assert!(
        info.contains("backing file: base.qcow2") && info.contains("backing file format: qcow2"),
        "{info}"
    );
    let ours = ok(VHDIO, &["info", s(&child)]);
    assert!(
        ours.contains("qcow2") && ours.contains("2 images"),
        "{ours}"
    );
    let check = ok(VHDIO, &["check", s(&child)]);
    assert!(check.contains("No problems found"), "{check}");

    // A refcount dropped to 0 under a used cluster: a problem.
    let mut bytes = std::fs::read(&base).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    let last_used = (bytes.len() / 65536 - 1) * 2;
    bytes[rb + last_used..rb + last_used + 2].copy_from_slice(&[0, 0]);
    std::fs::write(&base, &bytes).unwrap();
    let out = run(VHDIO, &["check", s(&base)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("refcount 0"),
        "{text}"
    );
}
