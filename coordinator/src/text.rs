//! Plain-text helpers for what `kiln` prints to people: aligned tables, times to the second, and
//! text from files or the network made safe to draw.
//!
//! Pure functions only (no I/O, no clock). Nothing here is used for `--json` output, which is
//! never reformatted.

/// How a table column lines up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// An aligned table: each column as wide as its widest cell (counted in characters), columns
/// two spaces apart, no trailing spaces, one `\n`-terminated line per row after the header.
/// A row shorter than the header leaves its last cells empty; extra cells are dropped.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (i, ((_, align), width)) in columns.iter().zip(&widths).enumerate() {
            let cell = cells.next().unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width.saturating_sub(cell.chars().count());
            match align {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_line(&mut columns.iter().map(|(h, _)| *h));
    for row in rows {
        push_line(&mut row.iter().map(String::as_str));
    }
    out
}

/// An RFC 3339 time without its fractional seconds (`…T07:09:28.807611523Z` → `…T07:09:28Z`);
/// anything else comes back unchanged.
pub fn short_time(rfc3339: &str) -> String {
    let Some(t) = rfc3339.find('T') else {
        return rfc3339.to_string();
    };
    let time = &rfc3339[t..];
    match (time.find('.'), time.find(['Z', 'z', '+', '-'])) {
        (Some(dot), Some(zone)) if dot < zone => {
            format!("{}{}{}", &rfc3339[..t], &time[..dot], &time[zone..])
        }
        _ => rfc3339.to_string(),
    }
}

/// Replaces control characters (escape sequences, newlines) with `?`, so text from the network
/// or a file cannot move the cursor or forge lines.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_left_and_right() {
        let columns = [
            ("NAME", Align::Left),
            ("N", Align::Right),
            ("NOTE", Align::Left),
        ];
        let rows = vec![
            vec!["a".to_string(), "100".to_string(), "x".to_string()],
            vec!["longer".to_string(), "2".to_string(), String::new()],
            vec!["short".to_string()],
        ];
        assert_eq!(
            table(&columns, &rows),
            "NAME      N  NOTE\n\
             a       100  x\n\
             longer    2\n\
             short\n"
        );
    }

    #[test]
    fn times_lose_their_fractional_seconds() {
        assert_eq!(
            short_time("2036-11-25T07:09:28.807611523Z"),
            "2036-11-25T07:09:28Z"
        );
        assert_eq!(
            short_time("2036-11-25T07:09:28.5-01:00"),
            "2036-11-25T07:09:28-01:00"
        );
        assert_eq!(short_time("2036-11-25T07:09:28Z"), "2036-11-25T07:09:28Z");
        assert_eq!(short_time("not a time"), "not a time");
        assert_eq!(short_time("T.x"), "T.x");
    }

    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(clean("evil\u{1b}[2J\nline"), "evil?[2J?line");
        assert_eq!(clean("gpu-1 ·"), "gpu-1 ·");
    }
}
