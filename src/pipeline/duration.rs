//! Human durations as GitLab's `timeout` accepts them (`1h 30m`, `90 minutes`, `3600`).

use std::time::Duration;

/// Parses a duration the way GitLab's ChronicDuration does for the common forms: numbers with
/// units (`1h 30m`, `2 hours and 15 minutes`, `1.5h`), `h:mm:ss`, and a bare number of seconds.
/// Returns `None` for anything else, or for zero.
pub(crate) fn parse(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_lowercase();
    if text.contains(':') {
        return clock(&text);
    }
    let mut seconds = 0f64;
    let mut rest = text.as_str();
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if let Some(after) = rest.strip_prefix("and ") {
            rest = after;
            continue;
        }
        if rest.is_empty() {
            break;
        }
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = rest[number_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        seconds += number * unit_seconds(unit)?;
    }
    (seconds >= 1.0 && seconds.is_finite()).then(|| Duration::from_secs(seconds.round() as u64))
}

fn unit_seconds(unit: &str) -> Option<f64> {
    Some(match unit {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        "w" | "wk" | "wks" | "week" | "weeks" => 604_800.0,
        "mo" | "mon" | "mos" | "month" | "months" => 2_592_000.0,
        "y" | "yr" | "yrs" | "year" | "years" => 31_536_000.0,
        _ => return None,
    })
}

/// `h:mm:ss` or `mm:ss`.
fn clock(text: &str) -> Option<Duration> {
    let parts: Vec<u64> = text
        .split(':')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    let seconds = match parts.as_slice() {
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_timeout_forms() {
        let d = |s: &str| parse(s).map(|d| d.as_secs());
        assert_eq!(d("1h 30m"), Some(5400));
        assert_eq!(d("90 minutes"), Some(5400));
        assert_eq!(d("1h30m"), Some(5400));
        assert_eq!(d("2 hours and 15 minutes"), Some(8100));
        assert_eq!(d("1.5h"), Some(5400));
        assert_eq!(d("3600"), Some(3600));
        assert_eq!(d("1 day"), Some(86_400));
        assert_eq!(d("10m 30s"), Some(630));
        assert_eq!(d("1:30:00"), Some(5400));
        assert_eq!(d("soon"), None);
        assert_eq!(d("5 parsecs"), None);
        assert_eq!(d("0"), None);
        assert_eq!(d(""), None);
    }
}
