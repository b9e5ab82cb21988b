//! Threads, signals and fork under the library (tests/threads/threads.c):
//! eight threads doing pread/pwrite on disjoint regions of one image through
//! an fd and a dup of it, checked against per-thread models, interleaved
//! with reads of a non-image fd, while a 1 ms timer's signal handler does
//! I/O on non-image fds; then forks while four threads keep doing image
//! I/O, each child reading the image (a child that hangs is killed by its
//! alarm: a deadlock). Finally the image, read by qemu-img, must equal the
//! models, and pass its checker.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn program() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/threads/threads.c");
        let out = std::env::temp_dir().join(format!("vhdio-threads-{}", std::process::id()));
        let r = Command::new("cc")
            .args(["-O2", "-pthread", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run cc (install gcc): {e}"));
        assert!(
            r.status.success(),
            "cc threads.c: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        out
    })
}

fn run_one(fmt: &str, name: &str, opts: &str, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = dir.join(name);
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            opts,
            img.to_str().unwrap(),
            "16M",
        ],
    );
    // Some data already there, so reads of unwritten parts see more than zeros.
    let mut seeded = vec![0u8; 16 << 20];
    let mut rng = common::Rng(5);
    for b in seeded[(3 << 20)..(5 << 20)].iter_mut() {
        *b = rng.next() as u8;
    }
    let src = dir.join("seed.raw");
    std::fs::write(&src, &seeded).unwrap();
    common::run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-n",
            "-f",
            "raw",
            "-O",
            fmt,
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let plain = dir.join("plain.vhd.txt");
    let text: Vec<u8> = (0..65536u32).map(|i| (i * 13 + (i >> 9)) as u8).collect();
    std::fs::write(&plain, &text).unwrap();
    let expect = dir.join("expect.raw");

    let t = Instant::now();
    let mut args = vec![
        img.to_str().unwrap(),
        plain.to_str().unwrap(),
        expect.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut child = preload::command(dir, program().to_str().unwrap(), &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        status.is_some(),
        "{name}: the thread program hung (killed after 120 s): {stdout}{stderr}"
    );
    assert!(
        status.unwrap().success() && stdout.starts_with("OK"),
        "{name}: {stdout}{stderr}"
    );

    // The image holds exactly what the models say, and is sound.
    match fmt {
        "vpc" => {
            vhd_util::check_file(&img).unwrap();
        }
        _ => {
            common::run(
                "qemu-img",
                &["check", "-q", "-f", fmt, img.to_str().unwrap()],
            );
        }
    }
    let want = std::fs::read(&expect).unwrap();
    let got = common::qemu_raw(&img, fmt);
    assert_eq!(want.len(), 12 << 20);
    if got[..want.len()] != want[..] {
        let first = (0..want.len()).find(|&i| got[i] != want[i]).unwrap();
        panic!("{name}: image differs from the thread models at {first}");
    }
    format!(
        "{name}: {} ({:.1} s)",
        stdout.trim(),
        t.elapsed().as_secs_f64()
    )
}

#[test]
fn threads_signals_and_fork() {
    let mut report = Vec::new();
    for (fmt, name, opts) in [
        ("vpc", "t.vhd", "subformat=dynamic,force_size=on"),
        ("vhdx", "t.vhdx", "block_size=1M"),
        ("vdi", "t.vdi", "static=off"),
        ("vmdk", "t.vmdk", "subformat=monolithicSparse"),
        ("qcow2", "t.qcow2", "cluster_size=4k"),
    ] {
        report.push(run_one(fmt, name, opts, &[]));
    }
    for r in &report {
        println!("{r}   (OK <image+plain ops> <forks> <signals handled>)");
    }
}

/// As above, but each fork child also attempts an image pwrite (refused with
/// EBUSY, since the parent is the writer). Regression: the child deadlocked
/// when fork happened while another thread held the per-image writer mutex,
/// which every write used to take (src/images.rs `ensure_writer`).
#[test]
fn fork_child_write_attempt_does_not_deadlock() {
    for (fmt, name, opts) in [
        ("vpc", "t.vhd", "subformat=dynamic,force_size=on"),
        ("vhdx", "t.vhdx", "block_size=1M"),
        ("vdi", "t.vdi", "static=off"),
        ("vmdk", "t.vmdk", "subformat=monolithicSparse"),
        ("qcow2", "t.qcow2", "cluster_size=4k"),
    ] {
        println!("{}", run_one(fmt, name, opts, &["child-writes"]));
    }
}
