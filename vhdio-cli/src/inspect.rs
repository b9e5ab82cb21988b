//! What `vhdio run` checks before it execs: whether LD_PRELOAD can reach the
//! program at all. A static binary, a Go program (it makes its system calls
//! itself) or a program the loader runs in secure mode (set-user-ID or
//! set-group-ID to someone else) would read image files as plain files, the
//! container instead of the virtual disk, without a word. The program is
//! found through PATH as exec would find it; for a `#!` script its
//! interpreter is what runs (through `env NAME` too).
//!
//! The ELF header, program headers and section names are read by hand: a
//! few fixed offsets, no ELF crate.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{EXIT_CANNOT_EXEC, Failure, fail};

const PT_INTERP: u32 = 3;
const GO_SECTION: &[u8] = b".go.buildinfo";
/// The start of Go's build information, found by Go's own tools the same way.
const GO_MAGIC: &[u8] = b"\xff Go buildinf:";
/// The kernel follows at most this many `#!` interpreters.
const MAX_SCRIPT_DEPTH: usize = 4;
/// Section header tables larger than this are not read (not a real program).
const MAX_TABLE: u64 = 64 << 20;

/// Refuses (exit 126) a program the library cannot reach, saying what to
/// use instead.
pub fn refuse_unreachable(program: &OsStr) -> Result<(), Failure> {
    match unreachable(program, std::env::var_os("PATH").as_deref()) {
        None => Ok(()),
        Some(why) => Err(fail(
            EXIT_CANNOT_EXEC,
            format!(
                "{why}: libvhdio cannot reach it, and it would read image files as plain files \
                 (the container, not the virtual disk). For a kernel block device that every \
                 program can use, run `vhdio serve` + `nbd-client`; --force runs it anyway."
            ),
        )),
    }
}

/// Why the preload cannot reach `program` (resolved through `path_var`, the
/// PATH the exec will use), or `None` if it can, or if the file cannot be
/// read (then exec decides: not found, permission denied...).
pub fn unreachable(program: &OsStr, path_var: Option<&OsStr>) -> Option<String> {
    let file = resolve(program, path_var)?;
    examine(&file, 0)
}

/// `program` as execvp finds it: a name with a slash as it is, else the
/// first executable regular file of that name in PATH.
pub fn resolve(program: &OsStr, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = path_var.map_or(&b"/usr/local/bin:/usr/bin:/bin"[..], OsStr::as_bytes);
    path.split(|&b| b == b':').find_map(|dir| {
        let dir = if dir.is_empty() { b"." } else { dir };
        let candidate = Path::new(OsStr::from_bytes(dir)).join(program);
        let md = std::fs::metadata(&candidate).ok()?;
        (md.is_file() && md.mode() & 0o111 != 0).then_some(candidate)
    })
}

fn examine(file: &Path, depth: usize) -> Option<String> {
    let md = std::fs::metadata(file).ok()?;
    let f = File::open(file).ok()?;
    let mut head = [0u8; 256];
    let n = read_up_to(&f, &mut head, 0);
    let head = &head[..n];
    if let Some(rest) = head.strip_prefix(b"#!") {
        if depth >= MAX_SCRIPT_DEPTH {
            return None;
        }
        let interp = interpreter(rest)?;
        return examine(&interp, depth + 1).map(|why| {
            format!(
                "{} is a script run by {}, and {why}",
                file.display(),
                interp.display()
            )
        });
    }
    if let Some(why) = secure_exec(file, &md) {
        return Some(why);
    }
    let elf = Elf::parse(&f, head)?;
    if elf.has_section(&f, GO_SECTION) || (elf.shnum == 0 && contains(&f, GO_MAGIC)) {
        return Some(format!(
            "{} is a Go program (Go makes its system calls itself, not through libc)",
            file.display()
        ));
    }
    if !elf.has_interp(&f) && !is_loader(file) {
        return Some(format!("{} is statically linked", file.display()));
    }
    None
}

/// The interpreter of a `#!` line (after the `#!`): its path, or for
/// `env NAME` (and `env -S NAME ...`) NAME found through PATH.
fn interpreter(line: &[u8]) -> Option<PathBuf> {
    let line = line.split(|&b| b == b'\n').next()?;
    let mut words = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    let interp = PathBuf::from(OsStr::from_bytes(words.next()?));
    if interp.file_name() != Some(OsStr::new("env")) {
        return Some(interp);
    }
    let mut name = words.next();
    if name == Some(b"-S") {
        name = words.next();
    }
    match name {
        Some(n) if !n.starts_with(b"-") && !n.contains(&b'=') => {
            let path = std::env::var_os("PATH");
            resolve(OsStr::from_bytes(n), path.as_deref())
        }
        _ => Some(interp),
    }
}

/// Whether the loader will run `file` in secure mode (AT_SECURE), where it
/// ignores LD_PRELOAD: set-user-ID to another user or set-group-ID to
/// another group than ours. (File capabilities and nosuid mounts are not
/// looked at.)
fn secure_exec(file: &Path, md: &std::fs::Metadata) -> Option<String> {
    // Our own ids without libc: /proc/self belongs to them.
    let me = std::fs::metadata("/proc/self").ok()?;
    if md.mode() & 0o4000 != 0 && md.uid() != me.uid() {
        return Some(format!(
            "{} is set-user-ID to uid {} (the loader ignores LD_PRELOAD for it)",
            file.display(),
            md.uid()
        ));
    }
    if md.mode() & 0o2000 != 0 && md.gid() != me.gid() {
        return Some(format!(
            "{} is set-group-ID to gid {} (the loader ignores LD_PRELOAD for it)",
            file.display(),
            md.gid()
        ));
    }
    None
}

/// The dynamic loader itself (`ld-linux-x86-64.so.2 PROGRAM`) has no
/// interpreter but honours LD_PRELOAD for the program it loads.
fn is_loader(file: &Path) -> bool {
    let name = file.file_name().map_or(&b""[..], OsStr::as_bytes);
    (name.starts_with(b"ld-") || name.starts_with(b"ld.so")) && name.windows(3).any(|w| w == b".so")
}

fn read_up_to(f: &File, buf: &mut [u8], at: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// Whether `needle` occurs anywhere in the file (for binaries without
/// section headers).
fn contains(f: &File, needle: &[u8]) -> bool {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = read_up_to(f, &mut buf, at);
        if buf[..n].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        if n < buf.len() {
            return false;
        }
        // Overlap, so that a match across two reads is seen.
        at += (n - needle.len()) as u64;
    }
}

/// The parts of an ELF header that say how the program runs.
struct Elf {
    wide: bool,
    little: bool,
    phoff: u64,
    phentsize: u64,
    phnum: u64,
    shoff: u64,
    shentsize: u64,
    shnum: u64,
    shstrndx: u64,
}

impl Elf {
    fn parse(f: &File, head: &[u8]) -> Option<Elf> {
        if head.len() < 64 || &head[..4] != b"\x7fELF" {
            return None;
        }
        let wide = match head[4] {
            1 => false,
            2 => true,
            _ => return None,
        };
        let little = match head[5] {
            1 => true,
            2 => false,
            _ => return None,
        };
        let mut elf = Elf {
            wide,
            little,
            phoff: 0,
            phentsize: 0,
            phnum: 0,
            shoff: 0,
            shentsize: 0,
            shnum: 0,
            shstrndx: 0,
        };
        let (phoff, shoff, rest) = if wide {
            (elf.word(head, 32), elf.word(head, 40), 52)
        } else {
            (elf.half_word(head, 28), elf.half_word(head, 32), 40)
        };
        elf.phoff = phoff;
        elf.shoff = shoff;
        elf.phentsize = elf.u16(head, rest + 2);
        elf.phnum = elf.u16(head, rest + 4);
        elf.shentsize = elf.u16(head, rest + 6);
        elf.shnum = elf.u16(head, rest + 8);
        elf.shstrndx = elf.u16(head, rest + 10);
        if elf.shoff == 0 {
            elf.shnum = 0;
        } else if elf.shnum == 0 || elf.shstrndx == 0xffff {
            // Many sections: the real numbers are in section 0.
            let s0 = elf.section_header(f, 0)?;
            if elf.shnum == 0 {
                elf.shnum = if wide {
                    elf.word(&s0, 32)
                } else {
                    elf.half_word(&s0, 20)
                };
            }
            if elf.shstrndx == 0xffff {
                elf.shstrndx = elf.half_word(&s0, if wide { 40 } else { 24 });
            }
        }
        Some(elf)
    }

    fn u16(&self, b: &[u8], at: usize) -> u64 {
        let v = [b[at], b[at + 1]];
        (if self.little {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        }) as u64
    }
    fn half_word(&self, b: &[u8], at: usize) -> u64 {
        let v: [u8; 4] = b[at..at + 4].try_into().unwrap();
        (if self.little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }) as u64
    }
    fn word(&self, b: &[u8], at: usize) -> u64 {
        let v: [u8; 8] = b[at..at + 8].try_into().unwrap();
        if self.little {
            u64::from_le_bytes(v)
        } else {
            u64::from_be_bytes(v)
        }
    }

    fn has_interp(&self, f: &File) -> bool {
        if self.phentsize < 4 {
            return false;
        }
        let mut ph = [0u8; 4];
        (0..self.phnum).any(|i| {
            let at = self.phoff + i * self.phentsize;
            read_up_to(f, &mut ph, at) == 4 && self.half_word(&ph, 0) == PT_INTERP as u64
        })
    }

    fn section_header(&self, f: &File, i: u64) -> Option<Vec<u8>> {
        let size = if self.wide { 64 } else { 40 };
        if self.shentsize < size {
            return None;
        }
        let mut h = vec![0u8; size as usize];
        (read_up_to(f, &mut h, self.shoff + i * self.shentsize) == h.len()).then_some(h)
    }

    /// (offset, size) of section `i`'s contents, and its name's offset.
    fn section(&self, f: &File, i: u64) -> Option<(u64, u64, u64)> {
        let h = self.section_header(f, i)?;
        let name = self.half_word(&h, 0);
        Some(if self.wide {
            (self.word(&h, 24), self.word(&h, 32), name)
        } else {
            (self.half_word(&h, 16), self.half_word(&h, 20), name)
        })
    }

    fn has_section(&self, f: &File, wanted: &[u8]) -> bool {
        if self.shnum == 0 || self.shnum * self.shentsize > MAX_TABLE {
            return false;
        }
        let Some((names_at, names_size, _)) = self.section(f, self.shstrndx) else {
            return false;
        };
        let mut name = vec![0u8; wanted.len() + 1];
        (0..self.shnum).any(|i| {
            self.section(f, i).is_some_and(|(_, _, off)| {
                off + name.len() as u64 <= names_size
                    && read_up_to(f, &mut name, names_at + off) == name.len()
                    && name[..wanted.len()] == *wanted
                    && name[wanted.len()] == 0
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_interpreter() {
        assert_eq!(
            interpreter(b"/bin/sh -e\nx"),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(interpreter(b" /bin/bash"), Some(PathBuf::from("/bin/bash")));
        // env with an option only: env itself is what we can check.
        assert_eq!(
            interpreter(b"/usr/bin/env -i"),
            Some(PathBuf::from("/usr/bin/env"))
        );
    }

    #[test]
    fn path_lookup_like_exec() {
        assert_eq!(resolve(OsStr::new("./x"), None), Some(PathBuf::from("./x")));
        assert_eq!(
            resolve(OsStr::new("sh"), Some(OsStr::new("/nonexistent::/bin"))),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            resolve(OsStr::new("no-such-program-x"), Some(OsStr::new("/bin"))),
            None
        );
    }

    #[test]
    fn loader_names() {
        assert!(is_loader(Path::new("/lib64/ld-linux-x86-64.so.2")));
        assert!(is_loader(Path::new("/lib/ld.so.1")));
        assert!(!is_loader(Path::new("/bin/ld")));
    }
}
