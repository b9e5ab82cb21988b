//! CRC-32C (Castagnoli: VHDX) and CRC-32/IEEE (zlib: GPT).
//!
//! Two 256-entry tables built at compile time instead of a dependency: the
//! checksummed structures are headers, tables and log entries, where speed does
//! not matter, and no single crate covers both polynomials.

const fn table(poly: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CASTAGNOLI: [u32; 256] = table(0x82F6_3B78);
static IEEE: [u32; 256] = table(0xEDB8_8320);

fn update(table: &[u32; 256], mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32C of `data` (init and final XOR 0xFFFFFFFF).
pub fn crc32c(data: &[u8]) -> u32 {
    !update(&CASTAGNOLI, !0, data)
}

/// CRC-32C over several pieces, as if concatenated.
pub fn crc32c_parts(parts: &[&[u8]]) -> u32 {
    !parts.iter().fold(!0, |c, p| update(&CASTAGNOLI, c, p))
}

/// CRC-32/IEEE of `data`, as zlib and GPT compute it.
pub fn crc32_ieee(data: &[u8]) -> u32 {
    !update(&IEEE, !0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32c_parts(&[b"1234", b"56789"]), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
