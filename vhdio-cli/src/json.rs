//! A small JSON writer for `--output=json`, laid out as qemu-img lays out
//! its own (4-space indents, keys in insertion order).

use std::fmt::Write;

/// A JSON value.
#[derive(Clone, Debug)]
pub enum Json {
    Bool(bool),
    Num(u64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }
    /// An object from (key, value) pairs.
    pub fn obj(pairs: Vec<(&str, Json)>) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
    /// Adds `key` to an object (no-op on other values).
    pub fn push(&mut self, key: &str, value: Json) {
        if let Json::Obj(pairs) = self {
            pairs.push((key.to_string(), value));
        }
    }

    /// Indented, as qemu-img prints.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    /// On one line: `{ "a": 1, "b": true}` like qemu-img map's lines.
    pub fn line(&self) -> String {
        match self {
            Json::Obj(pairs) => {
                let inner: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| format!("{}: {}", quote(k), v.line()))
                    .collect();
                format!("{{ {}}}", inner.join(", "))
            }
            Json::Arr(items) => {
                let inner: Vec<String> = items.iter().map(Json::line).collect();
                format!("[{}]", inner.join(", "))
            }
            other => other.pretty(),
        }
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = |n: usize| "    ".repeat(n);
        match self {
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, v) in items.iter().enumerate() {
                    out.push_str(&pad(depth + 1));
                    v.write(out, depth + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(depth));
                out.push(']');
            }
            Json::Obj(pairs) => {
                out.push_str("{\n");
                for (i, (k, v)) in pairs.iter().enumerate() {
                    let _ = write!(out, "{}{}: ", pad(depth + 1), quote(k));
                    v.write(out, depth + 1);
                    out.push_str(if i + 1 < pairs.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(depth));
                out.push('}');
            }
        }
    }
}

/// A JSON string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_escapes() {
        let v = Json::obj(vec![
            ("a", Json::Num(1)),
            ("b", Json::str("x\"y\\\n")),
            ("c", Json::Arr(vec![Json::Bool(true), Json::Num(2)])),
        ]);
        assert_eq!(
            v.pretty(),
            "{\n    \"a\": 1,\n    \"b\": \"x\\\"y\\\\\\n\",\n    \"c\": [\n        true,\n        2\n    ]\n}"
        );
        assert_eq!(
            Json::obj(vec![("s", Json::Num(0)), ("d", Json::Bool(false))]).line(),
            "{ \"s\": 0, \"d\": false}"
        );
    }
}
