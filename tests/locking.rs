//! One writer per image across processes, compatible with qemu's locks:
//! library vs library, library vs qemu-io, qemu-io vs library, and parent vs
//! child after fork.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::run as tool;

/// A python writer under the library that holds `img` open for writing after
/// its first write, until killed.
fn library_writer(dir: &std::path::Path, img: &str) -> std::process::Child {
    let script = format!(
        "import os,sys,time\nfd=os.open('{img}',os.O_RDWR)\nos.pwrite(fd,b'L'*512,0)\nprint('ready',flush=True)\ntime.sleep(60)\n"
    );
    let mut child = preload::command(dir, "python3", &["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn dd_write(dir: &std::path::Path, img: &str) -> std::process::Output {
    preload::command(
        dir,
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={img}"),
            "bs=512",
            "count=1",
            "conv=notrunc",
        ],
    )
    .output()
    .unwrap()
}

#[test]
fn second_writers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (img, fmt) in [
        ("w.vhd", "vpc"),
        ("w.vhdx", "vhdx"),
        ("w.vdi", "vdi"),
        ("w.vmdk", "vmdk"),
    ] {
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                fmt,
                dir.join(img).to_str().unwrap(),
                "16M",
            ],
        );

        // library vs library
        let mut first = library_writer(dir, img);
        let out = dd_write(dir, img);
        assert!(
            !out.status.success(),
            "{img}: second library writer was allowed"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("busy"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // library vs qemu-io
        let q = Command::new("qemu-io")
            .args([
                "-f",
                fmt,
                "-c",
                "write 0 512",
                dir.join(img).to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let qerr =
            String::from_utf8_lossy(&q.stderr).to_string() + &String::from_utf8_lossy(&q.stdout);
        assert!(
            qerr.contains("lock"),
            "{img}: qemu-io was not refused: {qerr}"
        );
        // A reader is still allowed.
        let r = preload::command(
            dir,
            "dd",
            &[&format!("if={img}"), "of=/dev/null", "bs=512", "count=1"],
        )
        .output()
        .unwrap();
        assert!(r.status.success());
        first.kill().unwrap();
        first.wait().unwrap();

        // qemu-io vs library
        let mut q = Command::new("qemu-io")
            .args([
                "-f",
                fmt,
                "-c",
                "write 0 512",
                "-c",
                "sleep 20000",
                dir.join(img).to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        sleep(Duration::from_millis(700));
        let out = dd_write(dir, img);
        assert!(
            !out.status.success(),
            "{img}: library writer allowed while qemu-io writes"
        );
        q.kill().unwrap();
        q.wait().unwrap();
        // Alone again: writes work.
        assert!(dd_write(dir, img).status.success());
    }
}

#[test]
fn fork_child_cannot_write_while_parent_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            dir.join("f.vhd").to_str().unwrap(),
            "16M",
        ],
    );
    let script = r#"
import os, errno
fd = os.open('f.vhd', os.O_RDWR)
os.pwrite(fd, b'P' * 512, 0)
pid = os.fork()
if pid == 0:
    try:
        os.pwrite(fd, b'C' * 512, 512)
        os._exit(1)
    except OSError as e:
        os._exit(0 if e.errno == errno.EBUSY else 2)
_, status = os.waitpid(pid, 0)
os.pwrite(fd, b'Q' * 512, 1024)
print(os.waitstatus_to_exitcode(status))
"#;
    let out = preload::run(dir, "python3", &["-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "child: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = common::qemu_raw(&dir.join("f.vhd"), "vpc");
    assert!(raw[..512].iter().all(|&b| b == b'P'));
    assert!(
        raw[512..1024].iter().all(|&b| b == 0),
        "the child's write reached the image"
    );
    assert!(raw[1024..1536].iter().all(|&b| b == b'Q'));
}
