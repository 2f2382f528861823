//! Printing: tables for people, JSON for scripts, and the units both use.

use std::time::Duration;

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde::Serialize;

/// A borderless table in the style of `kubectl get`: easy to read, easy to `grep` and `awk`.
/// Columns whose header is in `right_aligned` hold numbers and are right-aligned.
pub fn table(headers: &[&str], right_aligned: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().map(|h| h.to_uppercase()));
    for (i, header) in headers.iter().enumerate() {
        if right_aligned.contains(header)
            && let Some(column) = table.column_mut(i)
        {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints a value as one line of JSON on stdout (for event streams).
pub fn print_json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// A latency in microseconds, in the unit that keeps three significant digits: "850µs",
/// "1.25ms", "12.5ms", "1.50s".
pub fn micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{}ms", three_digits(us as f64 / 1e3))
    } else {
        format!("{}s", three_digits(us as f64 / 1e6))
    }
}

/// A duration for messages: "10s", "1m 30s", "250ms".
pub fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A duration in milliseconds for tables: "30s", "1m 30s", "250ms".
pub fn millis(ms: u64) -> String {
    duration(Duration::from_millis(ms))
}

/// A point in time given in Unix milliseconds, as RFC 3339 UTC with milliseconds; "-" for 0.
pub fn unix_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// Bytes as JSON shows them: `(Some(text), None)` if they are UTF-8, otherwise
/// `(None, Some(hex))`.
pub fn text_or_hex(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (
            None,
            Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        ),
    }
}

/// Bytes in a table cell, on one line: text with control characters (a trailing newline from
/// stdin) escaped, or `0x` and hex.
pub fn bytes_cell(text: Option<&str>, hex: Option<&str>) -> String {
    match (text, hex) {
        (Some(text), _) => text
            .replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
            .replace('\t', "\\t"),
        (None, Some(hex)) => format!("0x{hex}"),
        (None, None) => String::new(),
    }
}

/// A rate or ratio with three significant digits (at least the integer part).
pub fn three_digits(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_keep_three_significant_digits() {
        assert_eq!(micros(850), "850µs");
        assert_eq!(micros(1_250), "1.25ms");
        assert_eq!(micros(12_540), "12.5ms");
        assert_eq!(micros(125_400), "125ms");
        assert_eq!(micros(1_500_000), "1.50s");
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(unix_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(unix_ms(0), "-");
        assert_eq!(millis(90_000), "1m 30s");
    }

    #[test]
    fn bytes_show_as_escaped_text_or_hex() {
        let (text, hex) = text_or_hex(b"a\tb\n");
        assert_eq!(bytes_cell(text.as_deref(), hex.as_deref()), "a\\tb\\n");
        let (text, hex) = text_or_hex(&[0xff, 0x01]);
        assert_eq!((text.as_deref(), hex.as_deref()), (None, Some("ff01")));
        assert_eq!(bytes_cell(text.as_deref(), hex.as_deref()), "0xff01");
    }

    #[test]
    fn tables_right_align_numbers() {
        let mut t = table(&["name", "ops"], &["ops"]);
        t.add_row(vec!["a", "1"]);
        t.add_row(vec!["b", "1000"]);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("NAME") && lines[0].contains("OPS"),
            "{text}"
        );
        assert!(lines[1].trim_end().ends_with(" 1"), "{text}");
        assert_eq!(
            lines[1].trim_end().len(),
            lines[2].trim_end().len(),
            "{text}"
        );
    }
}
