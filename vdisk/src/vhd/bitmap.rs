//! The per-block sector bitmap: bit set = sector stored in this file. Bits are
//! MSB first (byte 0, bit 7 is sector 0), unlike VHDX.

/// Bytes of bitmap in front of a block of `block_size` bytes: one bit per
/// sector, padded to a whole sector.
pub fn bitmap_size(block_size: u32) -> u32 {
    (block_size / 512).div_ceil(8).div_ceil(512) * 512
}

pub fn is_set(bits: &[u8], sector: u32) -> bool {
    bits[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0
}

/// The state of `first` and how many sectors from it, at most `max` (and at
/// most to the end of the bitmap), share it.
pub fn run(bits: &[u8], first: u32, max: u32) -> (bool, u32) {
    let max = max.min((bits.len() as u32 * 8).saturating_sub(first));
    let state = is_set(bits, first);
    let mut n = 1;
    while n < max {
        let s = first + n;
        // Whole bytes at once where possible.
        if s.is_multiple_of(8) && n + 8 <= max {
            let byte = bits[(s / 8) as usize];
            if byte == if state { 0xFF } else { 0 } {
                n += 8;
                continue;
            }
        }
        if is_set(bits, s) != state {
            break;
        }
        n += 1;
    }
    (state, n)
}

/// Sets the bits of sectors `first..first + count`.
pub fn set_range(bits: &mut [u8], first: u32, count: u32) {
    for s in first..first + count {
        bits[(s / 8) as usize] |= 0x80 >> (s % 8);
    }
}

/// Whether every one of `sectors` bits is set.
pub fn is_full(bits: &[u8], sectors: u32) -> bool {
    run(bits, 0, sectors) == (true, sectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first_runs() {
        let mut bits = [0u8; 64];
        set_range(&mut bits, 3, 20);
        assert_eq!(bits[0], 0b0001_1111);
        assert_eq!(run(&bits, 0, 512), (false, 3));
        assert_eq!(run(&bits, 3, 512), (true, 20));
        assert_eq!(run(&bits, 23, 512), (false, 489));
        assert_eq!(run(&bits, 5, 4), (true, 4));
        assert!(!is_full(&bits, 512));
        set_range(&mut bits, 0, 512);
        assert!(is_full(&bits, 512));
    }

    #[test]
    fn sizes() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(4 << 20), 1024);
    }
}
