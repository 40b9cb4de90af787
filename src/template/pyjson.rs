//! The `tojson` filter as transformers defines it: `json.dumps(x, ensure_ascii=False,
//! indent=indent, separators=separators, sort_keys=sort_keys)`. minijinja's own `tojson` escapes
//! `<`, `>`, `&` and `'` for HTML and uses compact separators, which changes the rendered prompt
//! of every tool-calling template, so Python's exact output is reproduced here.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Deepest nesting `tojson` follows (Python raises RecursionError far deeper; this only stops
/// a self-referential value from recursing forever).
const MAX_DEPTH: usize = 128;

pub(super) fn tojson(value: &Value, kwargs: &Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    // Python's defaults: (', ', ': ') without indent, (',', ': ') with one.
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let items: Vec<Value> = v.try_iter()?.collect();
            match (
                items.first().and_then(|s| s.as_str()),
                items.get(1).and_then(|s| s.as_str()),
            ) {
                (Some(a), Some(b)) if items.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let opts = Options {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_value(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct Options {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn newline(out: &mut String, opts: &Options, depth: usize) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

fn write_value(out: &mut String, value: &Value, opts: &Options, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Bytes => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: bytes are not JSON serializable",
            ))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                write_value(out, item, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                match key.as_str() {
                    Some(s) => write_string(out, s, opts.ensure_ascii),
                    // Python converts int/float/bool/None keys to strings.
                    None => write_string(out, &key_as_string(key), opts.ensure_ascii),
                }
                out.push_str(&opts.key_sep);
                write_value(out, &value.get_item(key)?, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push('}');
        }
        ValueKind::Plain | ValueKind::Invalid => write_string(out, &value.to_string(), opts.ensure_ascii),
        // ValueKind is non-exhaustive.
        _ => write_string(out, &value.to_string(), opts.ensure_ascii),
    }
    Ok(())
}

fn key_as_string(key: &Value) -> String {
    match key.kind() {
        ValueKind::None | ValueKind::Undefined => "null".into(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        _ => {
            let mut s = String::new();
            write_number(&mut s, key);
            s
        }
    }
}

fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        out.push_str(&value.to_string());
        return;
    }
    let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        out.push_str("NaN");
    } else if x.is_infinite() {
        out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        out.push_str(&python_float_repr(x));
    }
}

/// Python's `repr(float)`: shortest round-trip digits, always with a `.0` or an exponent,
/// scientific notation below 1e-4 and from 1e16 on.
fn python_float_repr(x: f64) -> String {
    let abs = x.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust prints `1e16` / `1.5e-5`; Python prints `1e+16` / `1.5e-05`.
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(template: &str, value: Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", |v: Value, kw: Kwargs| tojson(&v, &kw));
        env.render_str(template, minijinja::context! { x => value }).unwrap()
    }

    // Expected strings from Python 3: `json.dumps(x, ensure_ascii=False, ...)`.
    #[test]
    fn matches_python_json_dumps() {
        let x = Value::from_pairs([
            ("name", Value::from("get_weather")),
            ("n", Value::from(3)),
            ("t", Value::from(0.5)),
            ("big", Value::from(1e20)),
            ("ok", Value::from(true)),
            ("none", Value::from(())),
            ("list", Value::from(vec![Value::from(1), Value::from("é<&>'\"\n")])),
        ]);
        assert_eq!(
            dumps("{{ x | tojson }}", x.clone()),
            r#"{"name": "get_weather", "n": 3, "t": 0.5, "big": 1e+20, "ok": true, "none": null, "list": [1, "é<&>'\"\n"]}"#
        );
        assert_eq!(
            dumps(
                "{{ x | tojson(indent=2) }}",
                Value::from_pairs([("a", Value::from(vec![1, 2]))])
            ),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
        assert_eq!(
            dumps(
                "{{ x | tojson(sort_keys=true) }}",
                Value::from_pairs([("b", 1), ("a", 2)])
            ),
            r#"{"a": 2, "b": 1}"#
        );
        assert_eq!(
            dumps("{{ x | tojson(ensure_ascii=true) }}", Value::from("é😀")),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(dumps("{{ x | tojson }}", Value::from(2.0)), "2.0");
        assert_eq!(dumps("{{ x | tojson }}", Value::from(1.5e-5)), "1.5e-05");
        assert_eq!(dumps("{{ x | tojson }}", Value::from(Vec::<Value>::new())), "[]");
    }
}
