//! A user's install: `make install PREFIX=...` puts libvhdio.so, vhdpartx,
//! vhdio and the man pages in place, and the installed `vhdio run` works.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::path::Path;
use std::process::Command;

use common::{pattern, qemu_image_from, qemu_raw};

#[test]
fn make_install_then_vhdio_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    preload::library();
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "vhdio-cli",
            "-p",
            "vhdpartx",
            "-p",
            "nbdkit-vhdio",
            "--manifest-path",
        ])
        .arg(root.join("Cargo.toml"))
        .status()
        .unwrap();
    assert!(status.success());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let prefix = tempfile::tempdir().unwrap();
    // `-o all`: the artifacts are built; install only.
    let out = Command::new("make")
        .current_dir(root)
        .args(["-o", "all", "install"])
        .arg(format!("PREFIX={}", prefix.path().display()))
        .arg(format!("TARGET={}", target.join("release").display()))
        // Not the system's nbdkit plugindir (the default) from a test.
        .arg(format!(
            "NBDKIT_PLUGINDIR={}",
            prefix.path().join("lib/nbdkit/plugins").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "lib/libvhdio.so",
        "bin/vhdpartx",
        "bin/vhdio",
        "share/man/man7/libvhdio.7",
        "share/man/man8/vhdpartx.8",
        "share/man/man1/vhdio.1",
        "lib/nbdkit/plugins/nbdkit-vhdio-plugin.so",
        "share/bash-completion/completions/vhdio",
        "share/zsh/site-functions/_vhdio",
        "share/fish/vendor_completions.d/vhdio.fish",
    ] {
        assert!(prefix.path().join(f).exists(), "{f} not installed");
    }
    // Completions are generated from the command line definition.
    let bash = std::fs::read_to_string(
        prefix
            .path()
            .join("share/bash-completion/completions/vhdio"),
    )
    .unwrap();
    assert!(
        bash.contains("convert") && bash.contains("rebase"),
        "{bash}"
    );
    // The installed vhdio finds the installed library (../lib) by itself.
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = pattern(21, 5 << 20);
    let img = qemu_image_from(&data, tmp.path(), "disk.vhdx", "vhdx", "");
    let out = Command::new(prefix.path().join("bin/vhdio"))
        .current_dir(tmp.path())
        .env_remove("LD_PRELOAD")
        .args([
            "run",
            "dd",
            "if=disk.vhdx",
            "of=disk.raw",
            "bs=1M",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vhdio run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(tmp.path().join("disk.raw")).unwrap() == qemu_raw(&img, "vhdx"));
    // nbdkit loads the installed plugin.
    let out = Command::new("nbdkit")
        .arg(
            prefix
                .path()
                .join("lib/nbdkit/plugins/nbdkit-vhdio-plugin.so"),
        )
        .arg("--dump-plugin")
        .output()
        .expect("nbdkit is needed (apt-get install -y nbdkit)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("name=vhdio"),
        "nbdkit --dump-plugin: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // man renders the installed page.
    let man = Command::new("man")
        .args(["-l"])
        .arg(prefix.path().join("share/man/man8/vhdpartx.8"))
        .env("MANPAGER", "cat")
        .output();
    let man = man.expect("man is needed (apt-get install -y man-db)");
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(
        text.contains("NAME") && text.contains("vhdpartx"),
        "man vhdpartx did not render: {text}"
    );
}
