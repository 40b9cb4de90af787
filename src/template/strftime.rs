//! `strftime_now(format)`, the global transformers gives chat templates (Llama-3.1/3.2 print
//! "Today Date: 26 Jul 2024" with it). Python formats local time; Finch formats UTC, because the
//! date in a prompt should not depend on the machine that prepared the data. Only the C-standard
//! directives templates use are supported; others are copied through unchanged.

use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

pub(super) fn strftime_now(format: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(format, secs)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

pub(crate) fn strftime_utc(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, (secs_of_day / 60) % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let month_index = (month - 1) as usize;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = cumulative[month_index] + day + u32::from(month > 2 && is_leap(year));

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` (no padding) is common in templates written on Linux.
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let pad2 = |n: i64| if unpadded { n.to_string() } else { format!("{n:02}") };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&pad2(year.rem_euclid(100))),
            Some('m') => out.push_str(&pad2(i64::from(month))),
            Some('d') => out.push_str(&pad2(i64::from(day))),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&pad2(hour)),
            Some('I') => out.push_str(&pad2(if hour % 12 == 0 { 12 } else { hour % 12 })),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&pad2(minute)),
            Some('S') => out.push_str(&pad2(second)),
            Some('j') => out.push_str(&if unpadded {
                day_of_year.to_string()
            } else {
                format!("{day_of_year:03}")
            }),
            Some('B') => out.push_str(MONTHS[month_index]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month_index][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference: Python `datetime.fromtimestamp(t, timezone.utc).strftime(f)`.
    #[test]
    fn formats_like_python() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-07-26 13:05:09");
        assert_eq!(
            strftime_utc("%A %B %-d, %I %p, day %j, 100%%", t),
            "Friday July 26, 01 PM, day 208, 100%"
        );
        // 2000-02-29 00:00:00 UTC (leap day, a Tuesday).
        assert_eq!(strftime_utc("%a %d %m %y %j", 951_782_400), "Tue 29 02 00 060");
        assert_eq!(strftime_utc("%Q", 0), "%Q");
    }
}
