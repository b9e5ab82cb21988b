//! LIBVHD_IO_TEST: a file-system workload stopped and continued again and
//! again grows a parent chain (one snapshot per SIGCONT) while its data stays
//! exact. qemu cannot read differencing VHD/VHDX chains, so the final disk is
//! read back through the library and checked by stock e2fsck and debugfs.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::path::Path;
use std::process::Child;
use std::thread::sleep;
use std::time::Duration;

use common::{pattern, run as tool};

/// Stops and continues `child` every few tens of milliseconds until it exits.
fn stop_and_continue(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status();
        sleep(Duration::from_millis(20));
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status();
        sleep(Duration::from_millis(150));
    }
}

fn parents(dir: &Path, stem: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(&format!("{stem}.")) && n.matches('.').count() == 3
        })
        .count()
}

fn workload(fmt: &str, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            fmt,
            dir.join(name).to_str().unwrap(),
            "128M",
        ],
    );
    let (data, _) = pattern(11, 192 << 10);
    std::fs::write(dir.join("src.bin"), &data).unwrap();
    let mkfs = preload::command(
        dir,
        "mkfs.ext4",
        &["-q", "-E", "lazy_itable_init=0,nodiscard", name],
    )
    .env("LIBVHD_IO_TEST", "1")
    .spawn()
    .unwrap();
    assert!(stop_and_continue(mkfs).success(), "mkfs.ext4 failed");
    // debugfs reads its commands from a pipe, in phases; between phases it is
    // stopped and continued, and the next phase's writes find the snapshot
    // request. So every phase boundary must add one parent.
    let mut debugfs = preload::command(dir, "debugfs", &["-w", name])
        .env("LIBVHD_IO_TEST", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = debugfs.id().to_string();
    let phases = 4;
    {
        use std::io::Write;
        let stdin = debugfs.stdin.as_mut().unwrap();
        for phase in 0..=phases {
            for i in 0..60 {
                writeln!(stdin, "write src.bin f{}", phase * 60 + i).unwrap();
            }
            stdin.flush().unwrap();
            if phase < phases {
                sleep(Duration::from_millis(400));
                std::process::Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .unwrap();
                sleep(Duration::from_millis(20));
                std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap();
            }
        }
    }
    drop(debugfs.stdin.take());
    assert!(debugfs.wait().unwrap().success(), "debugfs failed");
    let stem = name.split('.').next().unwrap();
    let chain = parents(dir, stem);
    eprintln!("{name}: chain grew by {chain} snapshots");
    assert!(
        chain >= phases,
        "{name}: only {chain} snapshots for {phases} SIGCONTs"
    );
    // The final disk, through the library, is a clean file system with every file.
    preload::run(
        dir,
        "dd",
        &[
            &format!("if={name}"),
            "of=final.raw",
            "bs=1M",
            "status=none",
        ],
    );
    let raw = dir.join("final.raw");
    tool("e2fsck", &["-fn", raw.to_str().unwrap()]);
    for i in [0, 151, 299] {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat f{i}"), raw.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.stdout == data, "{name}: file f{i} differs");
    }
}

#[test]
fn vhd_chain_grows_on_sigcont() {
    workload("vpc", "disk.vhd");
}

#[test]
fn vhdx_chain_grows_on_sigcont() {
    workload("vhdx", "disk.vhdx");
}

#[test]
fn vmdk_chain_grows_on_sigcont() {
    workload("vmdk", "disk.vmdk");
}
