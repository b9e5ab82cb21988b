//! `vhdio create -f vmdk`, `snapshot`, `info` and `check` on VMDK images
//! (issue 20), checked by qemu-img.

use std::path::Path;
use std::process::{Command, Output};

const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap()
}

fn ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{program} {args:?}: {text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn create_every_subformat_qemu_reads_and_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * 1024 * 1024 * 1024u64 + 65536 + 512;
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let img = tmp.path().join(format!("{sub}.vmdk"));
        ok(
            VHDIO,
            &[
                "create",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                s(&img),
                &size.to_string(),
            ],
        );
        let info = ok("qemu-img", &["info", "-f", "vmdk", s(&img)]);
        assert!(info.contains(&format!("({size} bytes)")), "{sub}: {info}");
        assert!(
            info.contains(&format!("create type: {sub}")),
            "{sub}: {info}"
        );
        assert!(ok("qemu-img", &["check", "-f", "vmdk", s(&img)]).contains("No errors"));
        // qemu writes across the 2 GiB boundary and reads it back.
        ok(
            "qemu-io",
            &[
                "-f",
                "vmdk",
                "-c",
                "write -P 0x21 2147450880 65536",
                s(&img),
            ],
        );
        let r = ok(
            "qemu-io",
            &[
                "-r",
                "-f",
                "vmdk",
                "-c",
                "read -P 0x21 2147450880 65536",
                s(&img),
            ],
        );
        assert!(!r.contains("failed"), "{sub}: {r}");
        let c = ok(VHDIO, &["check", s(&img)]);
        assert!(c.contains("No problems found"), "{sub}: {c}");
        let i = ok(VHDIO, &["info", s(&img)]);
        assert!(
            i.contains("vmdk") && i.contains(&size.to_string()),
            "{sub}: {i}"
        );
    }
    let o = run(
        VHDIO,
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&tmp.path().join("x.vmdk")),
            "1M",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        !tmp.path().join("x.vmdk").exists(),
        "a failed create left its file"
    );
}

#[test]
fn snapshot_of_a_vmdk_is_a_child_qemu_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vmdk");
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
            "8M",
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x42 1M 64k", s(&base)],
    );
    let before = std::fs::read(tmp.path().join("base-flat.vmdk")).unwrap();
    let child = tmp.path().join("child.vmdk");
    ok(VHDIO, &["snapshot", s(&base), s(&child)]);
    let info = ok("qemu-img", &["info", "-f", "vmdk", s(&child)]);
    assert!(info.contains("backing file: base.vmdk"), "{info}");
    let r = ok(
        "qemu-io",
        &["-r", "-f", "vmdk", "-c", "read -P 0x42 1M 64k", s(&child)],
    );
    assert!(!r.contains("failed"), "{r}");
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x43 1M 4k", s(&child)],
    );
    assert!(ok("qemu-img", &["check", "-f", "vmdk", s(&child)]).contains("No errors"));
    assert!(std::fs::read(tmp.path().join("base-flat.vmdk")).unwrap() == before);
    let c = ok(VHDIO, &["check", s(&child)]);
    assert!(
        c.contains("No problems found") && c.contains("2 images"),
        "{c}"
    );
}

#[test]
fn check_finds_redundant_table_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", s(&img), "4M"]);
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 1 0 64k", s(&img)],
    );
    assert!(ok(VHDIO, &["check", s(&img)]).contains("No problems found"));
    let mut b = std::fs::read(&img).unwrap();
    let rgd = u64::from_le_bytes(b[48..56].try_into().unwrap()) as usize * 512;
    let rgt = u32::from_le_bytes(b[rgd..rgd + 4].try_into().unwrap()) as usize * 512;
    b[rgt..rgt + 4].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    let o = run(VHDIO, &["check", s(&img)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("redundant entry 0"), "{text}");
}
