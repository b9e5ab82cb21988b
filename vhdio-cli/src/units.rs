//! Sizes on the command line and in reports.

/// Parses `N`, `N[KMGT]`, `N[KMGT]iB` or `N[KMGT]B` (powers of 1024, any case),
/// also with a fractional part (`1.5G`), into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("invalid size '{s}' (a number with K, M, G or T)")),
    };
    let bad = || format!("invalid size '{s}'");
    let value = match num.split_once('.') {
        None => num
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(1 << shift)
            .ok_or_else(bad)?,
        Some((int, frac)) => {
            if frac.is_empty() || frac.len() > 9 || shift == 0 {
                return Err(bad());
            }
            let int: u64 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| bad())?
            };
            let f: u64 = frac.parse().map_err(|_| bad())?;
            let scale = 10u64.pow(frac.len() as u32);
            let whole = int.checked_mul(1 << shift).ok_or_else(bad)?;
            whole
                .checked_add(((f as u128 * (1u128 << shift)) / scale as u128) as u64)
                .ok_or_else(bad)?
        }
    };
    if num.is_empty() {
        return Err(bad());
    }
    Ok(value)
}

/// `10 MiB`, `1.5 GiB`, `512 B`: binary units, at most one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let div = 1u64 << (10 * unit);
    if bytes.is_multiple_of(div) {
        format!("{} {}", bytes / div, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / div as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(human(10 << 20), "10 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(100), "100 B");
    }
}
