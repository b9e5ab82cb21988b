//! `vhdio convert` onto a file system that runs out of room: the failed
//! write is an error (exit 2, `vhdio: DEST: ...`), never a silent success,
//! and neither DEST nor its temporary file is left. The full file system is
//! a file size limit (`ulimit -f`, SIGXFSZ ignored so that the write fails
//! with EFBIG), which needs no root and no mount.

use std::path::Path;
use std::process::Command;

const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_onto_a_full_file_system_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    for fmt in ["raw", "vhd", "vhdx", "vdi", "qcow2"] {
        let dest = d.join(format!("out.{fmt}"));
        // 4 MiB of file at most: half the data.
        let o = Command::new("sh")
            .args([
                "-c",
                r#"trap "" XFSZ; ulimit -f 4096; exec "$0" "$@""#,
                VHDIO,
                "convert",
                "-O",
                fmt,
                s(&src),
                s(&dest),
            ])
            .env_remove("LD_PRELOAD")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{fmt}: {err}");
        assert!(
            err.starts_with("vhdio: ") && err.contains("File too large"),
            "{fmt}: {err}"
        );
        assert!(!dest.exists(), "{fmt}: a DEST was left");
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("vhdio-convert"))
            .collect();
        assert!(left.is_empty(), "{fmt}: temporary files left: {left:?}");
    }
    // Without the limit the same convert succeeds.
    let o = Command::new(VHDIO)
        .args(["convert", "-O", "vhdx", s(&src), s(&d.join("out.vhdx"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
