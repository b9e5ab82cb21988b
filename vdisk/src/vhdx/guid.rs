//! GUIDs as VHDX stores them: Microsoft mixed-endian (Data1 u32 LE, Data2 and
//! Data3 u16 LE, Data4 eight raw bytes). Kept as the 16 on-disk bytes and
//! compared as bytes; only text conversion knows about the field order.

use std::fmt;
use std::io::Read;

use crate::{Error, Result};

#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A random (version 4) GUID from /dev/urandom.
    pub fn random() -> Result<Guid> {
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        // Data3 is little-endian: its high nibble is in byte 7.
        b[7] = (b[7] & 0x0F) | 0x40;
        b[8] = (b[8] & 0x3F) | 0x80;
        Ok(Guid(b))
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case).
    pub fn parse_text(s: &str) -> Result<Guid> {
        let t = s.trim();
        let t = t
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(t);
        let bad = || Error::corrupt("VHDX GUID", format!("'{s}' is not a GUID"));
        let parts: Vec<&str> = t.split('-').collect();
        if parts.len() != 5
            || [8, 4, 4, 4, 12] != parts.iter().map(|p| p.len()).collect::<Vec<_>>()[..]
        {
            return Err(bad());
        }
        let hex: String = parts.concat();
        let mut raw = [0u8; 16];
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        // Text order is big-endian per field; storage is little-endian for the first three.
        let mut b = raw;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Ok(Guid(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{{{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02X}")?;
        }
        f.write_str("}")
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A GUID constant from its on-disk bytes written as hex (as formats.md lists them).
pub const fn from_hex(s: &str) -> Guid {
    let b = s.as_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = nibble(b[2 * i]) << 4 | nibble(b[2 * i + 1]);
        i += 1;
    }
    Guid(out)
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("bad hex digit in GUID constant"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_is_mixed_endian() {
        let bat = from_hex("6677c22d23f600429d64115e9bfd4a08");
        assert_eq!(bat.to_string(), "{2DC27766-F623-4200-9D64-115E9BFD4A08}");
        assert_eq!(
            Guid::parse_text("{2dc27766-f623-4200-9d64-115e9bfd4a08}").unwrap(),
            bat
        );
        assert_eq!(
            Guid::parse_text("2DC27766-F623-4200-9D64-115E9BFD4A08").unwrap(),
            bat
        );
        assert!(Guid::parse_text("{2DC27766-F623-4200-9D64-115E9BFD4A0}").is_err());
        assert!(Guid::parse_text("{2DC27766-F623-4200-9D64115E-9BFD4A08}").is_err());
        assert!(Guid::parse_text("{2DC27766-F623-4200-9D64-115E9BFD4A0G}").is_err());
        assert!(Guid::parse_text("é").is_err());
    }

    #[test]
    fn random_is_v4() {
        let g = Guid::random().unwrap();
        assert_eq!(g.0[7] >> 4, 4);
        assert_ne!(g, Guid::random().unwrap());
    }
}
