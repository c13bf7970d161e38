//! A pool's floor over time: the highest `min_idle` of the schedule windows open at a moment,
//! else the pool's own. Pure: the moment is always given (the keeper's clock is injectable).
//!
//! Cron is `croner` (POSIX five-field syntax with vixie-cron's day-of-month/day-of-week rule,
//! 0 and 7 both Sunday — what users of crontab and Cron HPA write), read in the window's IANA
//! time zone through `jiff` (its bundled time-zone database: kiln's image has none).

use std::time::{Duration, SystemTime};

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::config::WindowConfig;

/// One parsed schedule window.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    cron: Cron,
    zone: jiff::tz::TimeZone,
    duration: Duration,
    min_idle: usize,
}

/// What is wrong with a window, and in which of its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowProblem {
    pub(crate) field: &'static str,
    pub(crate) text: String,
}

impl Window {
    /// The window `config` describes.
    ///
    /// # Errors
    /// A cron expression that is not five valid fields, or an unknown time zone.
    pub(crate) fn parse(config: &WindowConfig) -> Result<Self, WindowProblem> {
        if config.cron.split_whitespace().count() != 5 {
            return Err(WindowProblem {
                field: "cron",
                text: format!(
                    "`{}` is not five-field cron (minute hour day-of-month month day-of-week, e.g. \"0 8 * * 1-5\")",
                    config.cron
                ),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&config.cron)
            .map_err(|e| WindowProblem {
                field: "cron",
                text: format!("`{}` is not valid cron: {e}", config.cron),
            })?;
        let zone = match config.timezone.as_deref() {
            None | Some("UTC") => jiff::tz::TimeZone::UTC,
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|_| WindowProblem {
                field: "timezone",
                text: format!(
                    "`{name}` is not a known IANA time zone (e.g. \"Europe/Berlin\", \"America/New_York\", \"UTC\")"
                ),
            })?,
        };
        Ok(Self {
            cron,
            zone,
            duration: config.duration,
            min_idle: config.min_idle,
        })
    }

    /// Whether the window is open at `at`: it opened at a time its cron names, in its time
    /// zone, less than `duration` before.
    pub(crate) fn open_at(&self, at: SystemTime) -> bool {
        let Ok(now) = jiff::Timestamp::try_from(at) else {
            return false;
        };
        let Ok(duration) = jiff::SignedDuration::try_from(self.duration) else {
            return false;
        };
        let Ok(since) = now.checked_sub(duration) else {
            return false;
        };
        // The first opening after `since` (exclusive: a window that opened exactly
        // `duration` ago has just closed).
        match self
            .cron
            .find_next_occurrence(&since.to_zoned(self.zone.clone()), false)
        {
            Ok(opened) => opened.timestamp() <= now,
            Err(_) => false,
        }
    }
}

/// A pool's floor at `at`: the highest `min_idle` of `windows` open then, else `min_idle`.
pub(crate) fn floor_at(min_idle: usize, windows: &[Window], at: SystemTime) -> usize {
    windows
        .iter()
        .filter(|w| w.open_at(at))
        .map(|w| w.min_idle)
        .max()
        .unwrap_or(min_idle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(cron: &str, duration: &str, min_idle: usize, timezone: Option<&str>) -> Window {
        Window::parse(&WindowConfig {
            cron: cron.into(),
            duration: humantime::parse_duration(duration).unwrap(),
            min_idle,
            timezone: timezone.map(str::to_owned),
        })
        .unwrap()
    }

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(rfc3339.parse::<jiff::Timestamp>().unwrap())
    }

    #[test]
    fn working_hours_raise_the_floor_on_weekdays_only() {
        // 2026-12-07 is a Monday.
        let hours = [window("0 8 * * 1-5", "11h", 6, None)];
        assert_eq!(floor_at(2, &hours, at("2026-12-07T07:59:59Z")), 2);
        assert_eq!(floor_at(2, &hours, at("2026-12-07T08:00:00Z")), 6);
        assert_eq!(floor_at(2, &hours, at("2026-12-07T18:59:59Z")), 6);
        assert_eq!(floor_at(2, &hours, at("2026-12-07T19:00:00Z")), 2);
        // Saturday and Sunday (0 and 7 are Sunday, as in crontab).
        assert_eq!(floor_at(2, &hours, at("2026-12-12T09:00:00Z")), 2);
        assert_eq!(floor_at(2, &hours, at("2026-12-13T09:00:00Z")), 2);
        let sunday = [window("0 8 * * 7", "1h", 3, None)];
        assert_eq!(floor_at(0, &sunday, at("2026-12-13T08:30:00Z")), 3);
    }

    #[test]
    fn a_window_open_over_midnight_and_the_highest_open_window_wins() {
        let windows = [
            window("0 22 * * *", "4h", 3, None),
            window("30 1 * * *", "10m", 5, None),
        ];
        assert_eq!(floor_at(1, &windows, at("2026-12-08T01:00:00Z")), 3);
        assert_eq!(floor_at(1, &windows, at("2026-12-08T01:35:00Z")), 5);
        assert_eq!(floor_at(1, &windows, at("2026-12-08T02:00:00Z")), 1);
    }

    #[test]
    fn the_time_zone_moves_the_window_with_summer_time() {
        let berlin = [window("0 8 * * *", "1h", 4, Some("Europe/Berlin"))];
        // Winter: 08:00 in Berlin is 07:00 UTC; summer: 06:00 UTC.
        assert_eq!(floor_at(0, &berlin, at("2026-12-08T07:30:00Z")), 4);
        assert_eq!(floor_at(0, &berlin, at("2026-12-08T06:30:00Z")), 0);
        assert_eq!(floor_at(0, &berlin, at("2026-07-08T06:30:00Z")), 4);
        assert_eq!(floor_at(0, &berlin, at("2026-07-08T07:30:00Z")), 0);
    }

    #[test]
    fn bad_cron_and_zones_are_refused_with_the_field() {
        let config = |cron: &str, timezone: Option<&str>| WindowConfig {
            cron: cron.into(),
            duration: Duration::from_secs(60),
            min_idle: 1,
            timezone: timezone.map(str::to_owned),
        };
        for (cron, zone, field) in [
            ("0 8 * *", None, "cron"),
            ("0 0 8 * * 1", None, "cron"),
            ("61 8 * * *", None, "cron"),
            ("0 8 * * *", Some("Nowhere/Land"), "timezone"),
        ] {
            let problem = Window::parse(&config(cron, zone)).unwrap_err();
            assert_eq!(problem.field, field, "{cron} {zone:?}: {problem:?}");
        }
    }
}
