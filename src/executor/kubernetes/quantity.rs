//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `1e3`): parsing to compare a job's
//! requested size against the configured cap.

/// The value of `text` in base units (cores, bytes), or `None` if it is not a quantity.
pub(crate) fn parse(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return None;
    }
    let sign_ok = number
        .char_indices()
        .all(|(i, c)| !matches!(c, '+' | '-') || i == 0);
    if !sign_ok {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().ok()?;
            10f64.powi(power)
        }
        _ => return None,
    };
    let out = value * factor;
    (out.is_finite() && out >= 0.0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_the_forms_users_write() {
        assert_eq!(parse("500m"), Some(0.5));
        assert_eq!(parse("2"), Some(2.0));
        assert_eq!(parse("1.5"), Some(1.5));
        assert_eq!(parse("2Gi"), Some(2.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse("128M"), Some(128e6));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert!(parse("4Gi").unwrap() > parse("4G").unwrap());
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in ["", "Gi", "2 GB", "2GB", "1.2.3", "-1", "1-2", "abc"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
