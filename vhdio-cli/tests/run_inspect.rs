//! `vhdio run` refuses programs the preload cannot reach (static binaries,
//! Go programs, set-user-ID to someone else, scripts run by one of them),
//! unless --force; dynamic programs run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");

/// `vhdio run --library FAKE args...` in `dir` (a fake library: the
/// refusal comes before any exec, and a run that passes only needs the
/// program itself; LD_PRELOAD of a non-ELF file is ignored with a warning).
fn run(dir: &Path, extra_path: bool, args: &[&str]) -> Output {
    let fake = dir.join("libvhdio.so");
    if !fake.exists() {
        std::fs::write(&fake, b"not a library").unwrap();
    }
    let mut c = Command::new(VHDIO);
    c.current_dir(dir)
        .args(["run", "--library", fake.to_str().unwrap()])
        .args(args)
        .env_remove("LD_PRELOAD");
    if extra_path {
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", dir.display()));
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn refused(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(126), "{err}");
    assert!(o.stdout.is_empty(), "the program ran");
    assert!(err.contains(what), "{err}");
    assert!(
        err.contains("vhdio serve") && err.contains("--force"),
        "{err}"
    );
}

#[track_caller]
fn ran(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
}

fn cc(dir: &Path, out: &str, flags: &[&str]) -> bool {
    let src = dir.join("hi.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n",
    )
    .unwrap();
    Command::new("gcc")
        .current_dir(dir)
        .args(flags)
        .args(["-o", out, "hi.c"])
        .status()
        .is_ok_and(|s| s.success())
}

fn script(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn static_binaries_and_their_scripts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(cc(dir, "dyn", &[]), "gcc is needed (apt-get install gcc)");
    ran(&run(dir, false, &["./dyn"]));
    assert!(
        cc(dir, "static", &["-static"]),
        "gcc -static failed: libc6-dev's libc.a is needed"
    );
    refused(
        &run(dir, false, &["./static"]),
        "static is statically linked",
    );
    // Found through PATH, as exec finds it.
    refused(&run(dir, true, &["static"]), "static is statically linked");
    ran(&run(dir, false, &["--force", "./static"]));
    // A script whose interpreter is static, directly and through env.
    script(dir, "s1", &format!("#!{}/static\n", dir.display()));
    refused(&run(dir, false, &["./s1"]), "s1 is a script run by");
    script(dir, "s2", "#!/usr/bin/env static\n");
    refused(&run(dir, true, &["./s2"]), "static is statically linked");
    script(dir, "s3", "#!/bin/sh\necho hi\n");
    ran(&run(dir, false, &["./s3"]));
    // The dynamic loader runs programs with LD_PRELOAD honoured.
    let loader = Path::new("/lib64/ld-linux-x86-64.so.2");
    if loader.exists() {
        ran(&run(dir, false, &[loader.to_str().unwrap(), "./dyn"]));
    }
}

/// A Go program, made without Go: a dynamic C binary with a
/// `.go.buildinfo` section holding Go's magic (what Go's tools look for).
#[test]
fn go_programs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(cc(dir, "dyn", &[]), "gcc is needed");
    std::fs::write(dir.join("buildinfo"), b"\xff Go buildinf:\x08\x02").unwrap();
    let st = Command::new("objcopy")
        .current_dir(dir)
        .args(["--add-section", ".go.buildinfo=buildinfo", "dyn", "go"])
        .status()
        .expect("objcopy (binutils) is needed");
    assert!(st.success());
    refused(&run(dir, false, &["./go"]), "go is a Go program");
    ran(&run(dir, false, &["--force", "./go"]));
    // Without section headers, the magic is looked for in the file.
    let mut bytes = std::fs::read(dir.join("dyn")).unwrap();
    bytes[0x28..0x30].fill(0); // e_shoff
    bytes[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    bytes.extend_from_slice(b"\xff Go buildinf:\x08\x02");
    std::fs::write(dir.join("go2"), &bytes).unwrap();
    std::fs::set_permissions(dir.join("go2"), std::fs::Permissions::from_mode(0o755)).unwrap();
    refused(&run(dir, false, &["./go2"]), "go2 is a Go program");
}

/// Set-user-ID to another user: the loader ignores LD_PRELOAD. To oneself:
/// no secure mode, it runs.
#[test]
fn setuid_programs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(cc(dir, "own", &[]), "gcc is needed");
    let own = dir.join("own");
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o4755)).unwrap();
    ran(&run(dir, false, &["./own"]));
    std::fs::copy(&own, dir.join("other")).unwrap();
    let chown = Command::new("chown")
        .args(["65534:65534", dir.join("other").to_str().unwrap()])
        .status()
        .unwrap();
    if !chown.success() {
        println!("SKIPPED: the set-user-ID-to-another-user case needs root (chown)");
        return;
    }
    let other = dir.join("other");
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o4755)).unwrap();
    refused(
        &run(dir, false, &["./other"]),
        "other is set-user-ID to uid 65534",
    );
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o2755)).unwrap();
    refused(
        &run(dir, false, &["./other"]),
        "other is set-group-ID to gid 65534",
    );
}
