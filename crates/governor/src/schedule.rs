//! Weekly time windows in which automatic work may run.
//!
//! Local time is UTC plus a fixed offset in minutes (`utc_offset_minutes`, e.g. 60 for CET,
//! 120 for CEST, -300 for EST). The offset is not a time zone: the desktop app rewrites it when
//! the OS reports a daylight-saving change. A window is a set of weekdays plus a start and end
//! minute of the day (0..=1440). If `end_minute <= start_minute` the window runs past midnight into
//! the next day (22:00–06:00 is `start_minute: 1320, end_minute: 360`); equal start and end mean
//! 24 hours. The day is the day the window starts on.

use serde::{Deserialize, Serialize};

const DAY_S: f64 = 86_400.0;
const WEEK_S: f64 = 7.0 * DAY_S;

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Weekday {
    /// Every day, Monday first.
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    fn index(self) -> f64 {
        match self {
            Weekday::Mon => 0.0,
            Weekday::Tue => 1.0,
            Weekday::Wed => 2.0,
            Weekday::Thu => 3.0,
            Weekday::Fri => 4.0,
            Weekday::Sat => 5.0,
            Weekday::Sun => 6.0,
        }
    }
}

/// One weekly window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Days on which the window starts.
    pub days: Vec<Weekday>,
    /// Start, minutes after local midnight (0..=1440).
    pub start_minute: u16,
    /// End, minutes after local midnight (0..=1440); at or before the start means the next day.
    pub end_minute: u16,
}

/// When automatic work may run (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Minutes east of UTC for the user's local time.
    pub utc_offset_minutes: i32,
    /// The windows; work may run inside any of them.
    pub windows: Vec<Window>,
}

impl Schedule {
    /// Seconds into the local week (Monday 00:00 = 0) at unix time `now`.
    fn week_seconds(&self, now: f64) -> f64 {
        let local = now + f64::from(self.utc_offset_minutes) * 60.0;
        // 1970-01-01 was a Thursday (index 3 when Monday is 0).
        (local + 3.0 * DAY_S).rem_euclid(WEEK_S)
    }

    /// Every window occurrence as `[start, end)` in seconds of the local week (end may exceed a week).
    fn intervals(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.windows.iter().flat_map(|w| {
            let start = f64::from(w.start_minute.min(1440)) * 60.0;
            let end = f64::from(w.end_minute.min(1440)) * 60.0;
            let len = if end > start {
                end - start
            } else {
                end + DAY_S - start
            };
            w.days.iter().map(move |d| {
                let a = d.index() * DAY_S + start;
                (a, a + len)
            })
        })
    }

    fn containing(&self, ws: f64) -> Option<f64> {
        self.intervals()
            .filter_map(|(a, b)| {
                if ws >= a && ws < b {
                    Some(b - ws)
                } else if ws + WEEK_S >= a && ws + WEEK_S < b {
                    Some(b - ws - WEEK_S)
                } else {
                    None
                }
            })
            .reduce(f64::max)
    }

    /// Whether automatic work may run at unix time `now`.
    pub fn allows(&self, now: f64) -> bool {
        self.containing(self.week_seconds(now)).is_some()
    }

    /// The next unix time at which [`Schedule::allows`] changes (end of the current window, or the
    /// start of the next one); `None` for an empty schedule.
    pub fn next_change(&self, now: f64) -> Option<f64> {
        let ws = self.week_seconds(now);
        if let Some(left) = self.containing(ws) {
            return Some(now + left);
        }
        self.intervals()
            .map(|(a, _)| (a - ws).rem_euclid(WEEK_S))
            .reduce(f64::min)
            .map(|d| now + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-01 00:00 UTC, a Monday.
    const MONDAY: f64 = 1_704_067_200.0;

    #[test]
    fn weekday_evening_and_overnight_windows() {
        let s = Schedule {
            utc_offset_minutes: 60,
            windows: vec![Window {
                days: vec![
                    Weekday::Mon,
                    Weekday::Tue,
                    Weekday::Wed,
                    Weekday::Thu,
                    Weekday::Fri,
                ],
                start_minute: 22 * 60,
                end_minute: 6 * 60,
            }],
        };
        // Monday 21:00 local = 20:00 UTC: outside; next change at 22:00 local = 21:00 UTC.
        let t = MONDAY + 20.0 * 3600.0;
        assert!(!s.allows(t));
        assert_eq!(s.next_change(t), Some(MONDAY + 21.0 * 3600.0));
        // Tuesday 03:00 local (Monday's window past midnight): inside, ends 06:00 local.
        let t = MONDAY + 26.0 * 3600.0;
        assert!(s.allows(t));
        assert_eq!(s.next_change(t), Some(MONDAY + 29.0 * 3600.0));
        // Saturday 23:00 local: no window starts on Saturday; next is Monday 22:00.
        let t = MONDAY + 5.0 * DAY_S + 22.0 * 3600.0;
        assert!(!s.allows(t));
        assert_eq!(s.next_change(t), Some(MONDAY + 7.0 * DAY_S + 21.0 * 3600.0));
        // Saturday 03:00 local: Friday's window wraps into Saturday.
        assert!(s.allows(MONDAY + 5.0 * DAY_S + 2.0 * 3600.0));
    }

    #[test]
    fn sunday_night_wraps_into_monday() {
        let s = Schedule {
            utc_offset_minutes: 0,
            windows: vec![Window {
                days: vec![Weekday::Sun],
                start_minute: 23 * 60,
                end_minute: 60,
            }],
        };
        assert!(
            s.allows(MONDAY + 1800.0),
            "Monday 00:30 is inside Sunday's window"
        );
        assert!(s.allows(MONDAY - 1800.0), "Sunday 23:30");
        assert!(!s.allows(MONDAY + 2.0 * 3600.0));
        assert!(
            Schedule {
                utc_offset_minutes: 0,
                windows: vec![]
            }
            .next_change(MONDAY)
            .is_none()
        );
    }
}
