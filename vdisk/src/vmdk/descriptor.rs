//! The VMDK descriptor: the text that names a disk's extents and its parent
//! (VMware "Virtual Disk Format 1.1", "The Descriptor File").
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=e977edac
//! parentCID=ffffffff
//! createType="monolithicFlat"
//! RW 10485760 FLAT "d-flat.vmdk" 0
//! ddb.geometry.cylinders = "10402"
//! ```
//!
//! Lines are `key=value` (spaces and quotes optional), extent lines
//! `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`, `#` comments and blank lines.
//! Unknown keys (the `ddb.*` data base, `encoding`, ...) are kept out of the
//! way: only the keys below mean anything here.

use crate::{Error, Geometry, Result};

/// `parentCID` of an image with no parent.
pub const NO_PARENT: u32 = 0xFFFF_FFFF;

/// The first line VMware and qemu write.
pub const MAGIC_LINE: &str = "# Disk DescriptorFile";

/// How an extent may be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

/// What an extent line says the file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// A raw slice of a file, from `offset` sectors (FLAT, VMFS, VMFSRAW, VMFSRDM).
    Flat,
    /// A hosted sparse extent (KDMV) or an ESX VMFSSPARSE one (COWD).
    Sparse,
    /// ESXi seSparse.
    SeSparse,
    /// No file: reads zeros.
    Zero,
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentKind,
    /// The type word as written (for messages).
    pub type_name: String,
    /// The file name as written (relative to the descriptor's folder unless absolute).
    pub file: Option<String>,
    /// Offset of the extent in a flat file, in sectors.
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub version: u32,
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: String,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
    pub geometry: Option<Geometry>,
}

/// At most this much text is read as a descriptor (qemu reads up to 1 MiB).
pub const MAX_TEXT: u64 = 1 << 20;

impl Descriptor {
    /// Parses descriptor text (NULs after the text, as in an embedded
    /// descriptor's padding, end it).
    pub fn parse(raw: &[u8]) -> Result<Descriptor> {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let text = std::str::from_utf8(&raw[..end])
            .map_err(|_| Error::corrupt("VMDK descriptor", "not UTF-8 text"))?;
        let mut d = Descriptor {
            version: 1,
            parent_cid: NO_PARENT,
            ..Descriptor::default()
        };
        let (mut cid, mut geo) = (None, [None::<u32>; 3]);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| {
                Error::corrupt(
                    "VMDK descriptor",
                    format!("line {}: {what}: {line:?}", n + 1),
                )
            };
            if let Some(ext) = parse_extent(line).map_err(&bad)? {
                d.extents.push(ext);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(bad("neither key=value nor an extent"));
            };
            let value = unquote(value.trim());
            match key.trim() {
                "version" => d.version = value.parse().map_err(|_| bad("bad version"))?,
                "CID" => cid = Some(parse_cid(value).ok_or_else(|| bad("bad CID"))?),
                "parentCID" => {
                    d.parent_cid = parse_cid(value).ok_or_else(|| bad("bad parentCID"))?;
                }
                "createType" => d.create_type = value.to_string(),
                "parentFileNameHint" => d.parent_hint = Some(value.to_string()),
                "ddb.geometry.cylinders" => geo[0] = value.parse().ok(),
                "ddb.geometry.heads" => geo[1] = value.parse().ok(),
                "ddb.geometry.sectors" => geo[2] = value.parse().ok(),
                // The disk data base and anything newer mean nothing here.
                _ => {}
            }
        }
        d.cid = cid.ok_or_else(|| Error::corrupt("VMDK descriptor", "no CID line"))?;
        if let [Some(cylinders), Some(heads), Some(sectors)] = geo {
            d.geometry = Some(Geometry {
                cylinders,
                heads,
                sectors,
            });
        }
        if !(1..=3).contains(&d.version) {
            return Err(Error::unsupported(format!(
                "VMDK descriptor version {}",
                d.version
            )));
        }
        Ok(d)
    }

    /// Total size in sectors of all extents.
    pub fn sectors(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |a, e| a.checked_add(e.sectors))
    }
}

fn parse_cid(v: &str) -> Option<u32> {
    u32::from_str_radix(v, 16).ok()
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// An extent line, `Ok(None)` if the line is not one.
fn parse_extent(line: &str) -> std::result::Result<Option<ExtentLine>, &'static str> {
    let (word, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let access = match word {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Ok(None),
    };
    let rest = rest.trim_start();
    let (sectors, rest) = rest.split_once([' ', '\t']).ok_or("no extent type")?;
    let sectors: u64 = sectors.parse().map_err(|_| "bad extent size")?;
    let rest = rest.trim_start();
    let (type_name, rest) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let kind = match type_name {
        "FLAT" | "VMFS" | "VMFSRAW" | "VMFSRDM" => ExtentKind::Flat,
        "SPARSE" | "VMFSSPARSE" => ExtentKind::Sparse,
        "SESPARSE" => ExtentKind::SeSparse,
        "ZERO" => ExtentKind::Zero,
        _ => return Err("unknown extent type"),
    };
    let rest = rest.trim();
    let (file, rest) = if let Some(q) = rest.strip_prefix('"') {
        let close = q.find('"').ok_or("unterminated file name")?;
        (Some(q[..close].to_string()), q[close + 1..].trim())
    } else if rest.is_empty() {
        (None, "")
    } else {
        return Err("file name not quoted");
    };
    let offset = match rest.split_whitespace().next() {
        Some(o) => o.parse().map_err(|_| "bad extent offset")?,
        None => 0,
    };
    if kind != ExtentKind::Zero && file.is_none() {
        return Err("extent without a file name");
    }
    Ok(Some(ExtentLine {
        access,
        sectors,
        kind,
        type_name: type_name.to_string(),
        file,
        offset,
    }))
}

/// Whether `head` (the first bytes of a file) is a text descriptor: the
/// magic line, or (as qemu probes) comments and blank lines, then `version=N`.
pub fn looks_like_text(head: &[u8]) -> bool {
    if head.starts_with(MAGIC_LINE.as_bytes()) {
        return true;
    }
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"#") || line.iter().all(|&b| b == b' ') {
            continue;
        }
        return matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

/// How many hex digits the value of the `CID=` line of `text` has.
pub fn cid_width(text: &[u8]) -> Option<usize> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    text[..end].split(|&b| b == b'\n').find_map(|line| {
        let rest = line.trim_ascii_start().strip_prefix(b"CID")?;
        let value = rest.trim_ascii_start().strip_prefix(b"=")?.trim_ascii();
        Some(value.iter().take_while(|b| b.is_ascii_hexdigit()).count()).filter(|&n| n > 0)
    })
}

/// `text` with the value of its `CID=` line replaced by `cid`, as the bytes
/// from the start of that line to the end, and the line's offset. Only that
/// line changes (qemu and VMware rewrite it on the first write).
pub fn replace_cid(text: &[u8], cid: u32) -> Option<(usize, Vec<u8>)> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = &text[..end];
    let mut at = 0;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let trimmed = line.trim_ascii_start();
        if let Some(rest) = trimmed.strip_prefix(b"CID")
            && rest.trim_ascii_start().starts_with(b"=")
        {
            let eol = if line.ends_with(b"\r\n") {
                &b"\r\n"[..]
            } else if line.ends_with(b"\n") {
                &b"\n"[..]
            } else {
                &b""[..]
            };
            // The old value's width: qemu writes `%x` (unpadded), VMware
            // `%08x`; the caller picks a value that fits (see `cid_width`).
            let width = cid_width(text).unwrap_or(8);
            let mut out = format!("CID={cid:0width$x}").into_bytes();
            out.extend_from_slice(eol);
            out.extend_from_slice(&text[at + line.len()..]);
            return Some((at, out));
        }
        at += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=e977edac\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 10485760 FLAT \"d flat.vmdk\" 0\n\
        RDONLY 8 ZERO\nNOACCESS 16 VMFSSPARSE \"x.vmdk\"\n\n#DDB\nddb.virtualHWVersion = \"4\"\n\
        ddb.geometry.cylinders = \"10402\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n";

    #[test]
    fn parses_keys_extents_and_geometry() {
        let d = Descriptor::parse(FLAT.as_bytes()).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0xe977edac, NO_PARENT));
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("d flat.vmdk"));
        assert_eq!(d.extents[0].kind, ExtentKind::Flat);
        assert_eq!(
            (d.extents[1].kind, d.extents[1].access),
            (ExtentKind::Zero, Access::ReadOnly)
        );
        assert_eq!(d.extents[2].kind, ExtentKind::Sparse);
        assert_eq!(d.sectors(), Some(10485760 + 24));
        assert_eq!(d.geometry.unwrap().cylinders, 10402);
        assert!(looks_like_text(FLAT.as_bytes()));
        assert!(looks_like_text(b"# c\n  \nversion=1\nCID=1"));
        assert!(!looks_like_text(b"# c\nhello\nversion=1\n"));
    }

    #[test]
    fn bad_lines_are_errors() {
        for bad in [
            "CID=1\nRW x SPARSE \"a\"\n",
            "CID=1\nRW 8 BOGUS \"a\"\n",
            "CID=1\nRW 8 FLAT a\n",
            "CID=1\nRW 8 FLAT \"a\n",
            "CID=zz\n",
            "version=1\n",
            "CID=1\njunk\n",
        ] {
            assert!(Descriptor::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cid_line_is_replaced_alone() {
        let (at, tail) = replace_cid(FLAT.as_bytes(), 0x1234).unwrap();
        let mut new = FLAT.as_bytes()[..at].to_vec();
        new.extend_from_slice(&tail);
        let d = Descriptor::parse(&new).unwrap();
        assert_eq!(d.cid, 0x1234);
        assert_eq!(new.len(), FLAT.len());
        assert_eq!(&new[..at], &FLAT.as_bytes()[..at]);
        let old = Descriptor::parse(FLAT.as_bytes()).unwrap();
        assert_eq!(d.extents, old.extents);
    }
}
