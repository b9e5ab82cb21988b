//! Finding the parent of a differencing VDI.
//!
//! A VDI records only its parent's creation UUID (uuidLinkage), never a path.
//! VirtualBox keeps the tree in its media registry (`*.vbox`, VirtualBox.xml:
//! `<HardDisk uuid="{..}" location="..">`) and puts children in `Snapshots/`.
//! So the candidates are, in order: images a registry in the child's folder or
//! the folder above names with that UUID, then every `*.vdi` in the child's
//! folder, the folder above, the `Snapshots` folders of both, and the folders
//! the opener adds (`LIBVHD_IO_VDI_PATH`). A VDI candidate is kept only if its
//! creation UUID matches; all listing and reading goes through the opener.

use std::path::{Component, Path, PathBuf};

use crate::vdi::header::{HEADER_AREA, Header, parse_uuid_text, uuid_text};
use crate::{ParentLink, ParentOpener, Storage};

/// Registry files larger than this are not read.
const MAX_REGISTRY_BYTES: u64 = 16 << 20;
/// At most this many entries of one folder are looked at.
const MAX_DIR_ENTRIES: usize = 10_000;

/// `link` (as parsed from the child at `child`) with its candidates found.
/// Warns when a matching VDI parent's uuidModify differs from the child's
/// uuidParentModify (the parent was written after the child was made).
pub fn find(
    link: &ParentLink,
    parent_modify: &[u8; 16],
    child: &Path,
    opener: &dyn ParentOpener,
) -> ParentLink {
    let dir = folder_of(child);
    let up = parent_folder(&dir);
    let mut named = Vec::new();
    let mut registries = Vec::new();
    let registry_dirs = if up == dir {
        vec![&dir]
    } else {
        vec![&dir, &up]
    };
    for d in registry_dirs {
        for file in list(opener, d) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if has_extension(name, "vbox") || name == "VirtualBox.xml" {
                registries.push(file.display().to_string());
                registry_locations(opener, &file, &link.id, &mut named);
            }
        }
    }
    let mut folders = vec![
        dir.clone(),
        up.clone(),
        dir.join("Snapshots"),
        up.join("Snapshots"),
    ];
    folders.extend(opener.search_dirs());
    let mut unique: Vec<PathBuf> = Vec::new();
    for f in folders {
        let f = normalize(&f);
        if !unique.contains(&f) {
            unique.push(f);
        }
    }
    let mut scanned = Vec::new();
    for d in &unique {
        let mut files: Vec<PathBuf> = list(opener, d)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| has_extension(n, "vdi"))
            })
            .collect();
        files.sort();
        scanned.extend(files);
    }
    let child_norm = normalize(child);
    let mut candidates: Vec<PathBuf> = Vec::new();
    for (path, from_registry) in named
        .into_iter()
        .map(|p| (p, true))
        .chain(scanned.into_iter().map(|p| (p, false)))
    {
        let path = normalize(&path);
        if path == child_norm || candidates.contains(&path) {
            continue;
        }
        match vdi_ids(opener, &path) {
            Some((create, modify)) if create == link.id => {
                if *parent_modify != [0; 16] && modify != *parent_modify {
                    log::warn!(
                        "VDI parent {} was modified after its child {} was made (uuidModify {} != uuidParentModify {})",
                        path.display(),
                        child.display(),
                        uuid_text(&modify),
                        uuid_text(parent_modify)
                    );
                }
                candidates.push(path);
            }
            Some(_) => {}
            // Not a readable VDI: a registry may name a parent in another format.
            None if from_registry => candidates.push(path),
            None => {}
        }
    }
    let folders: Vec<String> = unique.iter().map(|f| f.display().to_string()).collect();
    let registries = if registries.is_empty() {
        "none".to_string()
    } else {
        registries.join(", ")
    };
    ParentLink {
        candidates,
        id: link.id,
        alternate_id: link.alternate_id,
        description: format!(
            "VDI parent with UUID {} (registries read: {registries}; folders searched: {})",
            uuid_text(&link.id),
            folders.join(", ")
        ),
    }
}

fn list(opener: &dyn ParentOpener, dir: &Path) -> Vec<PathBuf> {
    match opener.list_dir(dir) {
        Ok(mut v) => {
            if v.len() > MAX_DIR_ENTRIES {
                log::warn!(
                    "{}: more than {MAX_DIR_ENTRIES} entries; looking at the first only",
                    dir.display()
                );
                v.truncate(MAX_DIR_ENTRIES);
            }
            v
        }
        Err(_) => Vec::new(),
    }
}

/// The creation and modification UUIDs of a VDI at `path`, if it is one.
fn vdi_ids(opener: &dyn ParentOpener, path: &Path) -> Option<([u8; 16], [u8; 16])> {
    let s: Box<dyn Storage> = opener.open_parent(path).ok()?;
    let len = s.len().ok()?;
    let mut raw = [0u8; HEADER_AREA];
    let n = len.min(HEADER_AREA as u64) as usize;
    s.read_exact_at(&mut raw[..n], 0).ok()?;
    let h = Header::parse(&raw, len).ok()?;
    Some((h.uuid_create, h.uuid_modify))
}

/// Adds the locations a registry gives for `id`, relative to its folder.
fn registry_locations(
    opener: &dyn ParentOpener,
    file: &Path,
    id: &[u8; 16],
    out: &mut Vec<PathBuf>,
) {
    let text = match opener.read_small_file(file, MAX_REGISTRY_BYTES) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => {
            log::debug!("{}: {e}", file.display());
            return;
        }
    };
    let base = folder_of(file);
    for (uuid, location) in hard_disks(&text) {
        if parse_uuid_text(&uuid).as_ref() == Some(id) && !location.is_empty() {
            let loc = PathBuf::from(location.replace('\\', "/"));
            out.push(if loc.is_absolute() {
                loc
            } else {
                base.join(loc)
            });
        }
    }
}

/// `(uuid, location)` of every `<HardDisk>` element.
pub fn hard_disks(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<HardDisk") {
        rest = &rest[i + "<HardDisk".len()..];
        if !rest.starts_with(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/') {
            continue; // <HardDisks>
        }
        let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
        if let (Some(u), Some(l)) = (attribute(tag, "uuid"), attribute(tag, "location")) {
            out.push((u, l));
        }
    }
    out
}

/// The value of attribute `name` in the inside of a start tag.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut at = 0;
    while let Some(i) = tag[at..].find(name) {
        let start = at + i;
        at = start + name.len();
        let before = tag[..start].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_whitespace()) {
            continue;
        }
        let Some(v) = tag[at..].trim_start().strip_prefix('=') else {
            continue;
        };
        let v = v.trim_start();
        let quote = v.chars().next().filter(|&q| q == '"' || q == '\'')?;
        let v = &v[1..];
        return Some(unescape(&v[..v.find(quote)?]));
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .map(|h| u32::from_str_radix(h, 16))
                .or_else(|| entity.strip_prefix('#').map(|d| d.parse::<u32>()))
                .and_then(|r| r.ok())
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn has_extension(name: &str, ext: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(stem, e)| !stem.is_empty() && e.eq_ignore_ascii_case(ext))
}

/// The folder holding `file` ("." for a bare file name).
fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The folder above `dir`, lexically.
fn parent_folder(dir: &Path) -> PathBuf {
    normalize(&dir.join(".."))
}

/// Removes `.` and resolves `..` lexically where a normal component precedes it.
fn normalize(p: &Path) -> PathBuf {
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) => {}
                _ => out.push(c),
            },
            c => out.push(c),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_parsing() {
        let xml = r#"<MediaRegistry><HardDisks>
            <HardDisk uuid="{33221100-5544-7766-8899-aabbccddeeff}" location="base &amp; co.vdi" format="VDI" type="Normal">
              <HardDisk uuid='{00000000-0000-0000-0000-000000000001}' location="Snapshots/{x}.vdi" format="VDI"/>
            </HardDisk></HardDisks></MediaRegistry>"#;
        let d = hard_disks(xml);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0],
            (
                "{33221100-5544-7766-8899-aabbccddeeff}".to_string(),
                "base & co.vdi".to_string()
            )
        );
        assert_eq!(d[1].1, "Snapshots/{x}.vdi");
        assert_eq!(
            attribute(r#" xuuid="a" uuid="b""#, "uuid"),
            Some("b".into())
        );
        assert_eq!(unescape("a&#65;&#x42;&bogus;&"), "aAB&bogus;&");
    }

    #[test]
    fn folders() {
        assert_eq!(folder_of(Path::new("c.vdi")), Path::new("."));
        assert_eq!(parent_folder(Path::new(".")), Path::new(".."));
        assert_eq!(parent_folder(Path::new("/vm/Snapshots")), Path::new("/vm"));
        assert_eq!(
            normalize(Path::new("/vm/Snapshots/../Snapshots")),
            Path::new("/vm/Snapshots")
        );
        assert_eq!(normalize(Path::new("/..")), Path::new("/"));
        assert!(
            has_extension("a.VDI", "vdi")
                && !has_extension(".vdi", "vdi")
                && !has_extension("vdi", "vdi")
        );
    }
}
