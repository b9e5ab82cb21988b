//! The fd table under concurrency (tests/threads/fdrace.c): four threads
//! pread image fds while two others close, reopen, dup, dup2 and raw-close
//! them; a read during which its fd did not change must return exactly its
//! image's bytes (no lost or stale mapping). Sources are a VHD, a VHDX, a VDI
//! and a plain file, each block stamped with its source and number. A run
//! that hangs (a lookup or reclamation bug corrupting memory) is killed and
//! fails. Also: dup2(fd, fd) keeps the mapping (it used to drop it).

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn program() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/threads/fdrace.c");
        let out = std::env::temp_dir().join(format!("vhdio-fdrace-{}", std::process::id()));
        let r = Command::new("cc")
            .args(["-O2", "-pthread", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run cc (install gcc): {e}"));
        assert!(
            r.status.success(),
            "cc fdrace.c: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        out
    })
}

/// 8 MiB whose 4 KiB block b holds the words `k << 40 | b << 9 | w`.
fn stamped(k: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 << 20);
    for b in 0..2048u64 {
        for w in 0..512u64 {
            v.extend_from_slice(&(k << 40 | b << 9 | w).to_le_bytes());
        }
    }
    v
}

#[test]
fn lookups_race_with_open_close_dup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut names = Vec::new();
    for (k, (fmt, name, opts)) in [
        ("vpc", "s0.vhd", "subformat=dynamic,force_size=on"),
        ("vhdx", "s1.vhdx", "block_size=1M"),
        ("vdi", "s2.vdi", "static=off"),
    ]
    .into_iter()
    .enumerate()
    {
        let raw = dir.join(format!("s{k}.raw"));
        std::fs::write(&raw, stamped(k as u64)).unwrap();
        common::run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                fmt,
                "-o",
                opts,
                raw.to_str().unwrap(),
                dir.join(name).to_str().unwrap(),
            ],
        );
        std::fs::remove_file(&raw).unwrap();
        names.push(name.to_string());
    }
    std::fs::write(dir.join("plain.bin"), stamped(3)).unwrap();
    names.push("plain.bin".into());
    let args: Vec<&str> = names.iter().map(String::as_str).collect();

    for round in 0..3 {
        let t = Instant::now();
        let mut child = preload::command(dir, program().to_str().unwrap(), &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let finished = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if t.elapsed() > Duration::from_secs(60) {
                child.kill().ok();
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            finished,
            "round {round}: hung, killed after 60 s: {stdout}{stderr}"
        );
        assert!(
            out.status.success() && stdout.starts_with("OK"),
            "round {round}: {}: {stdout}{stderr}",
            out.status
        );
        println!(
            "round {round}: {} (OK <stable reads> <racing reads> <fd changes>, {:.1} s)",
            stdout.trim(),
            t.elapsed().as_secs_f64()
        );
    }
}
