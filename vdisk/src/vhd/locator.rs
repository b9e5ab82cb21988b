//! Finding the parent of a differencing VHD from its locators and parent name.

use std::path::{Path, PathBuf};

use crate::vhd::dynamic_header::DynamicHeader;
use crate::{Result, Storage};

/// Locator payloads longer than this are not paths: ignore them.
const MAX_LOCATOR_BYTES: u32 = 64 * 1024;

/// Candidate parent paths, in the order the issue's resolution rule gives:
/// W2ru, W2ku, MacX, Wi2r, Wi2k, then the parent unicode name. Windows paths
/// are also tried by file name in the child's folder (images move with their
/// parents), and duplicates are dropped.
pub fn parent_candidates(
    storage: &dyn Storage,
    header: &DynamicHeader,
    child: &Path,
) -> Result<Vec<PathBuf>> {
    let dir = child.parent().map(Path::to_path_buf).unwrap_or_default();
    let file_len = storage.len()?;
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !p.as_os_str().is_empty() && !out.contains(&p) {
            out.push(p);
        }
    };
    for code in [b"W2ru", b"W2ku", b"MacX", b"Wi2r", b"Wi2k"] {
        for loc in header.locators.iter().filter(|l| &l.platform_code == code) {
            let len = loc.data_length;
            let end = loc.data_offset.checked_add(len as u64);
            if len == 0 || len > MAX_LOCATOR_BYTES || end.is_none_or(|e| e > file_len) {
                log::warn!(
                    "ignoring VHD parent locator {}: data out of range",
                    String::from_utf8_lossy(code)
                );
                continue;
            }
            let mut data = vec![0u8; len as usize];
            storage.read_exact_at(&mut data, loc.data_offset)?;
            let text = match code {
                b"W2ru" | b"W2ku" => utf16le(&data),
                _ => String::from_utf8_lossy(&data).into_owned(),
            };
            let text = text.trim_end_matches('\0');
            match code {
                b"MacX" => {
                    let path = percent_decode(text.strip_prefix("file://").unwrap_or(text));
                    if path.starts_with('/') {
                        push(PathBuf::from(&path));
                    } else {
                        push(dir.join(path.trim_start_matches("./")));
                    }
                    push(by_file_name(&dir, &path));
                }
                b"W2ru" | b"Wi2r" => {
                    let rel = text.replace('\\', "/");
                    push(dir.join(rel.trim_start_matches("./")));
                }
                _ => push(by_file_name(&dir, text)),
            }
        }
    }
    push(by_file_name(&dir, &header.parent_name));
    Ok(out)
}

/// The last component of a Windows or Unix path, in `dir`.
fn by_file_name(dir: &Path, path: &str) -> PathBuf {
    let name = path.rsplit(['\\', '/']).next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        PathBuf::new()
    } else {
        dir.join(name)
    }
}

fn utf16le(data: &[u8]) -> String {
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// Decodes %XX escapes of a file URL.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_urls() {
        let d = Path::new("/img");
        assert_eq!(
            by_file_name(d, r"C:\Projects\fat-parent.vhd"),
            Path::new("/img/fat-parent.vhd")
        );
        assert_eq!(by_file_name(d, "p.vhd"), Path::new("/img/p.vhd"));
        assert_eq!(by_file_name(d, ""), Path::new(""));
        assert_eq!(percent_decode("/a%20b/c.vhd"), "/a b/c.vhd");
        assert_eq!(percent_decode("/a%2"), "/a%2");
    }
}
