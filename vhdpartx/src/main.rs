//! `vhdpartx`: creates, removes and lists the partition symlinks through which
//! libvhdio exposes the partitions of a VHD, VHDX or VDI image, like `kpartx`
//! does for block devices.
//!
//! `vhdpartx -a disk.vhd` creates `disk.vhd1 -> disk.vhd`, `disk.vhd5 -> disk.vhd`,
//! ... next to the image, one per partition (relative links, so the folder can be
//! moved). Programs run under `LD_PRELOAD=libvhdio.so` see each link as that
//! partition. `-d` removes exactly the links named `disk.vhd<digits>` that lead to
//! the image; `-l` lists the partitions.
//!
//! The image is opened read-only, with its parent chain, through `vdisk`; the
//! partition table is parsed by `vdisk::part` (the library uses the same code).
//! A handful of flags does not warrant an argument-parser dependency.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vdisk::part::{self, Partition};

/// Exit status: success.
const EXIT_OK: u8 = 0;
/// Exit status: bad command line.
const EXIT_USAGE: u8 = 1;
/// Exit status: the image cannot be read, is not an image, or its table is corrupt.
const EXIT_IMAGE: u8 = 2;
/// Exit status: some links could not be created or removed (something else in the way).
const EXIT_LINKS: u8 = 3;

const USAGE: &str = "\
Usage: vhdpartx [-v] -a|-d|-l IMAGE

Create, remove or list the partition symlinks of a VHD, VHDX or VDI image,
through which libvhdio.so presents each partition as a block device:
IMAGE1, IMAGE2, ... next to IMAGE, each a relative link to IMAGE.

  -a, --add      create a link IMAGE<N> for every partition N (existing correct
                 links are kept; anything else in the way is left alone)
  -d, --delete   remove the links IMAGE<digits> that lead to IMAGE, nothing else
  -l, --list     list the partitions: link name, number, start and size in
                 logical sectors, type (MBR type byte, GPT type name or GUID)
  -v, --verbose  say what is done; debug messages from the image and table parser
  -h, --help     show this help
      --version  show the version

Partitions are numbered as Linux numbers them: MBR primaries 1-4, logical
partitions from 5, GPT entries by their index. An MBR extended partition is
listed and linked too; libvhdio exposes only its first sector(s), as Linux does.

Exit status: 0 success, 1 usage error, 2 image unreadable, not an image or
corrupt partition table, 3 some links could not be created or removed.

Example:
  vhdpartx -a file.vhd
  LD_PRELOAD=libvhdio.so mkfs.ext3 file.vhd1
  vhdpartx -d file.vhd
";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Add,
    Delete,
    List,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    Version,
    Run {
        mode: Mode,
        verbose: bool,
        image: PathBuf,
    },
}

/// Parses the arguments after the program name.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut mode = None;
    let mut verbose = false;
    let mut images = Vec::new();
    let set_mode = |m: Mode, mode: &mut Option<Mode>| match mode {
        Some(old) if *old != m => Err("only one of -a, -d and -l may be given".to_string()),
        _ => {
            *mode = Some(m);
            Ok(())
        }
    };
    let mut options_done = false;
    for arg in args {
        let bytes = arg.as_bytes();
        if options_done || bytes.len() < 2 || bytes[0] != b'-' {
            images.push(PathBuf::from(arg));
            continue;
        }
        match bytes {
            b"--" => options_done = true,
            b"--help" => return Ok(Command::Help),
            b"--version" => return Ok(Command::Version),
            b"--add" => set_mode(Mode::Add, &mut mode)?,
            b"--delete" => set_mode(Mode::Delete, &mut mode)?,
            b"--list" => set_mode(Mode::List, &mut mode)?,
            b"--verbose" => verbose = true,
            [b'-', b'-', ..] => return Err(format!("unknown option '{}'", arg.to_string_lossy())),
            [b'-', flags @ ..] => {
                for &f in flags {
                    match f {
                        b'a' => set_mode(Mode::Add, &mut mode)?,
                        b'd' => set_mode(Mode::Delete, &mut mode)?,
                        b'l' => set_mode(Mode::List, &mut mode)?,
                        b'v' => verbose = true,
                        b'h' => return Ok(Command::Help),
                        _ => return Err(format!("unknown option '-{}'", f.escape_ascii())),
                    }
                }
            }
            _ => unreachable!("arguments not starting with '-' are images"),
        }
    }
    let mode = mode.ok_or("one of -a, -d and -l is required")?;
    match images.len() {
        0 => Err("no image given".into()),
        1 => Ok(Command::Run {
            mode,
            verbose,
            image: images.remove(0),
        }),
        _ => Err("only one image may be given".into()),
    }
}

/// Why a command failed, with the exit status it maps to.
struct Failure {
    status: u8,
    message: String,
}

fn fail(status: u8, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let command = match parse_args(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhdpartx: {e}\nTry 'vhdpartx --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (mode, verbose, image) = match command {
        Command::Help => {
            print!("{USAGE}");
            return ExitCode::from(EXIT_OK);
        }
        Command::Version => {
            println!("vhdpartx {} (libvhdio)", env!("CARGO_PKG_VERSION"));
            return ExitCode::from(EXIT_OK);
        }
        Command::Run {
            mode,
            verbose,
            image,
        } => (mode, verbose, image),
    };
    init_logging(verbose);
    let result = match mode {
        Mode::Add => add(&image, verbose),
        Mode::Delete => delete(&image, verbose),
        Mode::List => list(&image),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(f) => {
            eprintln!("vhdpartx: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

/// Warnings (a partition past the end of the disk, a damaged primary GPT...)
/// always reach stderr; `-v` adds debug messages. `RUST_LOG` overrides.
fn init_logging(verbose: bool) {
    let level = if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .format(|buf, record| {
            writeln!(
                buf,
                "vhdpartx: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

/// Opens the image read-only (with its parents) and reads its partitions.
fn read_partitions(image: &Path) -> Result<(vdisk::Disk, Vec<Partition>), Failure> {
    let shown = image.display();
    let file = fs::File::open(image).map_err(|e| fail(EXIT_IMAGE, format!("{shown}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(EXIT_IMAGE, format!("{shown}: {e}")))?;
    if !meta.is_file() {
        return Err(fail(EXIT_IMAGE, format!("{shown}: not a regular file")));
    }
    let disk = vdisk::open_disk(
        Box::new((file, false)),
        image,
        vdisk::OpenOptions::default(),
        &vdisk::StdParentOpener,
    )
    .map_err(|e| fail(EXIT_IMAGE, format!("{shown}: {e}")))?;
    let parts = part::partitions(&disk).map_err(|e| fail(EXIT_IMAGE, format!("{shown}: {e}")))?;
    Ok((disk, parts))
}

/// Where the links of `image` live and what they are called.
struct Names {
    /// The image's folder (`.` for a bare file name).
    dir: PathBuf,
    /// The image's file name: the links' target and the prefix of their names.
    file_name: OsString,
    /// (device, inode) of the image, symlinks followed.
    id: (u64, u64),
}

impl Names {
    fn of(image: &Path) -> Result<Names, Failure> {
        let file_name = image
            .file_name()
            .ok_or_else(|| fail(EXIT_IMAGE, format!("{}: not a file name", image.display())))?
            .to_os_string();
        let dir = match image.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let meta = fs::metadata(image)
            .map_err(|e| fail(EXIT_IMAGE, format!("{}: {e}", image.display())))?;
        Ok(Names {
            dir,
            file_name,
            id: (meta.dev(), meta.ino()),
        })
    }

    fn link_name(&self, number: u32) -> OsString {
        let mut name = self.file_name.clone();
        name.push(number.to_string());
        name
    }

    /// Whether `name` is the image's name followed by one or more digits.
    fn is_link_name(&self, name: &OsStr) -> bool {
        let prefix = self.file_name.as_bytes();
        name.as_bytes()
            .strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.iter().all(u8::is_ascii_digit))
    }

    /// Whether `path` is a symlink that leads (possibly through more links) to the image.
    fn leads_to_image(&self, path: &Path) -> bool {
        let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        is_link && fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

/// The name under which a partition is shown: the image path as given plus the number.
fn display_name(image: &Path, number: u32) -> String {
    let mut s = image.as_os_str().to_os_string();
    s.push(number.to_string());
    s.to_string_lossy().into_owned()
}

fn add(image: &Path, verbose: bool) -> Result<(), Failure> {
    let (_disk, parts) = read_partitions(image)?;
    let names = Names::of(image)?;
    let mut problems = 0usize;
    for p in &parts {
        let link = names.dir.join(names.link_name(p.number));
        let shown = display_name(image, p.number);
        match fs::symlink_metadata(&link) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::os::unix::fs::symlink(&names.file_name, &link) {
                    Ok(()) => {
                        if verbose {
                            println!("created {shown} -> {}", names.file_name.to_string_lossy());
                        }
                    }
                    Err(e) => {
                        eprintln!("vhdpartx: {shown}: cannot create link: {e}");
                        problems += 1;
                    }
                }
            }
            Ok(_) if names.leads_to_image(&link) => {
                if verbose {
                    println!("kept {shown} (already a link to the image)");
                }
            }
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&link)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                eprintln!(
                    "vhdpartx: {shown}: a symlink to '{target}', not to the image, is in the way; left alone"
                );
                problems += 1;
            }
            Ok(_) => {
                eprintln!("vhdpartx: {shown}: exists and is not a symlink; left alone");
                problems += 1;
            }
            Err(e) => {
                eprintln!("vhdpartx: {shown}: {e}");
                problems += 1;
            }
        }
    }
    if problems > 0 {
        return Err(fail(
            EXIT_LINKS,
            format!("{problems} of {} partition links not created", parts.len()),
        ));
    }
    Ok(())
}

fn delete(image: &Path, verbose: bool) -> Result<(), Failure> {
    let names = Names::of(image)?;
    let entries = fs::read_dir(&names.dir)
        .map_err(|e| fail(EXIT_IMAGE, format!("{}: {e}", names.dir.display())))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fail(EXIT_IMAGE, format!("{}: {e}", names.dir.display())))?;
        let name = entry.file_name();
        if names.is_link_name(&name) {
            found.push(name);
        }
    }
    found.sort();
    let mut problems = 0usize;
    for name in found {
        let link = names.dir.join(&name);
        let shown = image.with_file_name(&name);
        if !names.leads_to_image(&link) {
            log::debug!("{}: not a link to the image; left alone", shown.display());
            continue;
        }
        match fs::remove_file(&link) {
            Ok(()) => {
                if verbose {
                    println!("removed {}", shown.display());
                }
            }
            Err(e) => {
                eprintln!("vhdpartx: {}: cannot remove: {e}", shown.display());
                problems += 1;
            }
        }
    }
    if problems > 0 {
        return Err(fail(
            EXIT_LINKS,
            format!("{problems} partition links not removed"),
        ));
    }
    Ok(())
}

fn list(image: &Path) -> Result<(), Failure> {
    let (_disk, parts) = read_partitions(image)?;
    if parts.is_empty() {
        log::debug!("{}: no partitions", image.display());
        return Ok(());
    }
    let rows: Vec<[String; 5]> = parts
        .iter()
        .map(|p| {
            [
                display_name(image, p.number),
                p.number.to_string(),
                p.start_sector().to_string(),
                p.sectors().to_string(),
                p.type_description(),
            ]
        })
        .collect();
    let header = ["NAME", "NR", "START", "SECTORS", "TYPE"].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = io::stdout().lock();
    for row in std::iter::once(&header).chain(&rows) {
        let [name, nr, start, sectors, kind] = row;
        let line = format!(
            "{name:<w0$} {nr:>w1$} {start:>w2$} {sectors:>w3$} {kind}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        writeln!(out, "{line}").map_err(|e| fail(EXIT_IMAGE, format!("stdout: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from))
    }

    fn run(mode: Mode, verbose: bool, image: &str) -> Result<Command, String> {
        Ok(Command::Run {
            mode,
            verbose,
            image: PathBuf::from(image),
        })
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&["-a", "x.vhd"]), run(Mode::Add, false, "x.vhd"));
        assert_eq!(parse(&["x.vhd", "-l"]), run(Mode::List, false, "x.vhd"));
        assert_eq!(parse(&["-dv", "x.vhd"]), run(Mode::Delete, true, "x.vhd"));
        assert_eq!(
            parse(&["--verbose", "--add", "--", "-x.vhd"]),
            run(Mode::Add, true, "-x.vhd")
        );
        assert_eq!(parse(&["-a", "-a", "-"]), run(Mode::Add, false, "-"));
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
        assert_eq!(parse(&["-a", "--help"]), Ok(Command::Help));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert!(parse(&[]).is_err());
        assert!(parse(&["x.vhd"]).is_err());
        assert!(parse(&["-a"]).is_err());
        assert!(parse(&["-a", "-l", "x.vhd"]).is_err());
        assert!(parse(&["-a", "x", "y"]).is_err());
        assert!(parse(&["-x", "x.vhd"]).is_err());
        assert!(parse(&["--frobnicate", "x.vhd"]).is_err());
    }

    #[test]
    fn link_names() {
        let n = Names {
            dir: ".".into(),
            file_name: "disk.vhd".into(),
            id: (0, 0),
        };
        assert!(n.is_link_name(OsStr::new("disk.vhd1")));
        assert!(n.is_link_name(OsStr::new("disk.vhd128")));
        assert!(!n.is_link_name(OsStr::new("disk.vhd")));
        assert!(!n.is_link_name(OsStr::new("disk.vhd1a")));
        assert!(!n.is_link_name(OsStr::new("disk.vhdx1")));
        assert!(!n.is_link_name(OsStr::new("xdisk.vhd1")));
        assert_eq!(n.link_name(12), OsString::from("disk.vhd12"));
    }
}
