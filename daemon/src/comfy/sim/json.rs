//! JSON text the way ComfyUI's Python `json.dumps` writes it (`", "` and `": "` separators), so
//! that bodies and WebSocket frames look byte-for-byte like the real server's. Pure; no I/O.

use std::io;

use serde::Serialize;
use serde_json::ser::Formatter;

/// Python's default separators: `", "` between items and `": "` after keys.
struct PyFormatter;

impl Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// Serializes `value` with Python's separators.
pub fn to_py_string<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    if value.serialize(&mut ser).is_err() {
        // serde_json::Value and plain data never fail to serialize; keep a valid body anyway.
        return "null".to_string();
    }
    String::from_utf8(out).unwrap_or_else(|_| "null".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_separators() {
        let v = serde_json::json!({"a": [1, 2.0, "x"], "b": {"c": null}});
        assert_eq!(
            to_py_string(&v),
            r#"{"a": [1, 2.0, "x"], "b": {"c": null}}"#
        );
    }
}
