//! How Python's jinja2 prints values that have no string form of their own: `None`, lists and
//! dicts come out as Python's `str()` (`None`, `[1, 'a', None]`, `{'k': 1}`), where minijinja
//! would print `none` and JSON-like text. Strings, numbers and booleans already match.

use std::fmt::Write;

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, Output, State};

/// Nesting beyond which containers are cut short (a guard against self-referential values).
const MAX_DEPTH: usize = 64;

/// The environment's formatter: Python's `str()` for none and containers, minijinja's
/// default (no auto-escaping for chat templates) for everything else.
pub(super) fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_str(&mut s, value, 0);
            out.write_str(&s).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn python_str(out: &mut String, value: &Value, depth: usize) {
    match value.kind() {
        ValueKind::String => python_repr_str(out, value.as_str().unwrap_or_default()),
        _ => python_item(out, value, depth),
    }
}

/// `str()` of a container element is its `repr()`.
fn python_item(out: &mut String, value: &Value, depth: usize) {
    if depth > MAX_DEPTH {
        out.push_str("...");
        return;
    }
    match value.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::String => python_repr_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_item(out, &item, depth + 1);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_item(out, &key, depth + 1);
                    out.push_str(": ");
                    let item = value.get_item(&key).unwrap_or_default();
                    python_item(out, &item, depth + 1);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text contains a single quote and no double
/// quote; backslash escapes for the quote, backslash and control characters.
fn python_repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}
