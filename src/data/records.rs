//! Splitting a dataset file into records, each with the line (or row) number it starts on.
//!
//! A record that cannot be read (bad JSON, invalid UTF-8, too long, a CSV row with the wrong
//! number of cells) becomes a [`Rejection`] with its line number, and reading goes on with the
//! next one: one broken line must not hide a thousand good ones. Only a file that cannot be read
//! at all (an I/O error, nothing in it) is an error.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::template::OrderedJson;

/// Container file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Jsonl,
    Json,
    Csv,
    Parquet,
    /// Plain text (`.txt`, `.md`): the whole file is one document of the `text` format.
    Text,
}

impl FileKind {
    /// From the file extension (`.jsonl`/`.ndjson`, `.json`, `.csv`, `.parquet`, `.txt`/`.md`).
    pub fn from_path(path: &Path) -> Option<Self> {
        FileKind::from_name(path.extension()?.to_str()?)
    }

    pub fn name(self) -> &'static str {
        match self {
            FileKind::Jsonl => "jsonl",
            FileKind::Json => "json",
            FileKind::Csv => "csv",
            FileKind::Parquet => "parquet",
            FileKind::Text => "text",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(FileKind::Jsonl),
            "json" => Some(FileKind::Json),
            "csv" => Some(FileKind::Csv),
            "parquet" => Some(FileKind::Parquet),
            "text" | "txt" | "md" | "markdown" => Some(FileKind::Text),
            _ => None,
        }
    }
}

/// A record that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// 1-based line (or Parquet row) number.
    pub line: usize,
    /// The offending field (`output`, `messages[2].content`), empty for the record as a whole.
    pub field: String,
    pub reason: String,
}

/// One record as read from the file, before format-specific validation.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    /// 1-based line (JSONL, JSON, CSV) or row (Parquet) number where the record starts.
    pub line: usize,
    pub value: Value,
    /// The record with its keys in written order, kept (JSON and JSONL) when it holds tool
    /// definitions or calls: templates print those with their keys in the file's order.
    pub ordered: Option<OrderedJson>,
}

impl RawRecord {
    pub fn new(line: usize, value: Value) -> Self {
        RawRecord {
            line,
            value,
            ordered: None,
        }
    }

    /// With the written key order, when `text` mentions tools.
    fn from_text(line: usize, value: Value, text: &str) -> Self {
        let ordered = if text.contains("\"tool") {
            OrderedJson::parse(text).ok()
        } else {
            None
        };
        RawRecord { line, value, ordered }
    }
}

/// What a file held: its records in order, and those that could not be read.
#[derive(Debug, Default)]
pub struct Records {
    pub records: Vec<RawRecord>,
    pub rejected: Vec<Rejection>,
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads `bytes` as `kind`. `max_record_bytes` bounds one record (a line, an array element, a
/// CSV row); longer ones are rejected without being parsed.
pub fn read_records(bytes: &[u8], kind: FileKind, max_record_bytes: usize) -> Records {
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    match kind {
        FileKind::Jsonl => read_jsonl(bytes, max_record_bytes),
        FileKind::Json => read_json(bytes, max_record_bytes),
        FileKind::Csv => read_csv(bytes, max_record_bytes),
        FileKind::Parquet => read_parquet(bytes, max_record_bytes),
        FileKind::Text => read_text(bytes, "text"),
    }
}

/// A plain-text file is one record, `{key: <the whole file>}`, on line 1: a document is chunked
/// by tokens when it is tokenized, so no size limit per record applies here.
pub(crate) fn read_text(bytes: &[u8], key: &str) -> Records {
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    let mut out = Records::default();
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let mut map = Map::new();
            map.insert(key.to_string(), Value::String(text.to_string()));
            out.records.push(RawRecord::new(1, Value::Object(map)));
        }
        Err(err) => {
            let line = 1 + bytes[..err.valid_up_to()].iter().filter(|b| **b == b'\n').count();
            out.rejected.push(reject(
                line,
                "",
                format!("not UTF-8 text (invalid byte at offset {})", err.valid_up_to()),
            ));
        }
    }
    out
}

fn reject(line: usize, field: &str, reason: impl Into<String>) -> Rejection {
    Rejection {
        line,
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn too_long(line: usize, len: usize, max: usize) -> Rejection {
    reject(
        line,
        "",
        format!("record is {len} bytes, longer than the limit of {max} bytes"),
    )
}

fn not_utf8(line: usize, err: std::str::Utf8Error) -> Rejection {
    reject(
        line,
        "",
        format!("not UTF-8 (invalid byte at offset {} of the record)", err.valid_up_to()),
    )
}

fn json_error(line_base: usize, err: &serde_json::Error) -> Rejection {
    let what = match err.classify() {
        serde_json::error::Category::Eof => "truncated JSON",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected JSON data",
        serde_json::error::Category::Io => "unreadable JSON",
    };
    // serde_json counts lines from 1 within the record.
    reject(line_base + err.line().saturating_sub(1), "", format!("{what}: {err}"))
}

/// JSON Lines: one value per line; blank lines carry no data and are skipped. CRLF endings and a
/// BOM are accepted.
fn read_jsonl(bytes: &[u8], max_record_bytes: usize) -> Records {
    let mut out = Records::default();
    for (index, raw_line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = index + 1;
        let raw_line = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
        if raw_line.len() > max_record_bytes {
            out.rejected.push(too_long(line, raw_line.len(), max_record_bytes));
            continue;
        }
        let text = match std::str::from_utf8(raw_line) {
            Ok(text) => text,
            Err(err) => {
                out.rejected.push(not_utf8(line, err));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(value) => out.records.push(RawRecord::from_text(line, value, text)),
            Err(err) => out.rejected.push(json_error(line, &err)),
        }
    }
    out
}

/// A `.json` file: normally an array of records. Elements are located with a small scanner so
/// that each gets its own line number and a broken element (or a truncated file) costs only the
/// elements it touches. A file that is not an array is, in order of likelihood: JSON Lines saved
/// as `.json`, an object wrapping one array of records (`{"data": [...]}`), or a single record.
fn read_json(bytes: &[u8], max_record_bytes: usize) -> Records {
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match first.map(|i| bytes[i]) {
        Some(b'[') => read_json_array(bytes, first.unwrap_or(0), max_record_bytes, false),
        Some(b'{') => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => {
                let arrays: Vec<&String> = map
                    .iter()
                    .filter(|(_, v)| matches!(v, Value::Array(items) if items.iter().all(Value::is_object)))
                    .map(|(k, _)| k)
                    .collect();
                if map.len() == 1 && arrays.len() == 1 {
                    // Re-read the wrapped array so its elements keep their line numbers.
                    match find_array_start(bytes) {
                        Some(start) => read_json_array(bytes, start, max_record_bytes, true),
                        None => Records::default(),
                    }
                } else {
                    let line = 1 + bytes[..first.unwrap_or(0)].iter().filter(|b| **b == b'\n').count();
                    Records {
                        records: vec![RawRecord::from_text(
                            line,
                            Value::Object(map),
                            std::str::from_utf8(bytes).unwrap_or_default(),
                        )],
                        rejected: vec![],
                    }
                }
            }
            _ => read_jsonl(bytes, max_record_bytes),
        },
        Some(_) => {
            let mut out = Records::default();
            let err = match serde_json::from_slice::<Value>(bytes) {
                Ok(v) => format!("expected an array of records, found {}", kind_of(&v)),
                Err(e)
                    if e.classify() == serde_json::error::Category::Syntax && std::str::from_utf8(bytes).is_err() =>
                {
                    "not UTF-8 JSON (binary data?)".to_string()
                }
                Err(e) => format!("invalid JSON: {e}"),
            };
            out.rejected.push(reject(1, "", err));
            out
        }
        None => Records::default(),
    }
}

/// Position of the `[` of the first array value inside a top-level object.
fn find_array_start(bytes: &[u8]) -> Option<usize> {
    let mut in_string = false;
    let mut escaped = false;
    let mut depth = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => depth = depth.saturating_sub(1),
            b'[' if depth == 1 => return Some(i),
            _ => {}
        }
    }
    None
}

/// Splits the array starting at `bytes[start] == b'['` into its elements. `wrapped`: the array
/// is a value inside an object, so text follows its closing bracket.
fn read_json_array(bytes: &[u8], start: usize, max_record_bytes: usize, wrapped: bool) -> Records {
    let mut out = Records::default();
    let mut line = 1 + bytes[..start].iter().filter(|b| **b == b'\n').count();
    let mut i = start + 1;
    let mut element_start: Option<(usize, usize)> = None; // (byte, line)
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut closed = false;
    let finish = |out: &mut Records, from: usize, to: usize, at_line: usize| {
        let raw = &bytes[from..to];
        let trimmed_len = raw.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |p| p + 1);
        let raw = &raw[..trimmed_len];
        if raw.is_empty() {
            out.rejected
                .push(reject(at_line, "", "empty array element (stray comma)"));
        } else if raw.len() > max_record_bytes {
            out.rejected.push(too_long(at_line, raw.len(), max_record_bytes));
        } else {
            match std::str::from_utf8(raw) {
                Err(err) => out.rejected.push(not_utf8(at_line, err)),
                Ok(text) => match serde_json::from_str::<Value>(text) {
                    Ok(value) => out.records.push(RawRecord::from_text(at_line, value, text)),
                    Err(err) => out.rejected.push(json_error(at_line, &err)),
                },
            }
        }
    };
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if element_start.is_none() && !b.is_ascii_whitespace() && !(depth == 0 && (b == b']' || b == b',')) {
            element_start = Some((i, line));
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => depth -= 1,
            b',' | b']' if depth == 0 => {
                match element_start.take() {
                    Some((from, at_line)) => finish(&mut out, from, i, at_line),
                    None if b == b',' => out.rejected.push(reject(line, "", "empty array element (stray comma)")),
                    None => {}
                }
                if b == b']' {
                    closed = true;
                    i += 1;
                    break;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if !closed {
        match element_start {
            Some((_, at_line)) => {
                out.rejected
                    .push(reject(at_line, "", "truncated JSON: the file ends inside this record"))
            }
            None => out
                .rejected
                .push(reject(line, "", "truncated JSON: the array is never closed with `]`")),
        }
    } else if !wrapped && bytes[i.min(bytes.len())..].iter().any(|b| !b.is_ascii_whitespace()) {
        out.rejected
            .push(reject(line, "", "unexpected data after the closing `]` of the array"));
    }
    out
}

/// CSV with a header row. Every cell is a string; fields that hold lists (ShareGPT
/// conversations, messages) are parsed from JSON text later, by the format.
fn read_csv(bytes: &[u8], max_record_bytes: usize) -> Records {
    let mut out = Records::default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let headers: Vec<String> = match reader.byte_headers() {
        Ok(h) => h
            .iter()
            .map(|c| String::from_utf8_lossy(c).trim().to_string())
            .collect(),
        Err(err) => {
            out.rejected
                .push(reject(1, "", format!("cannot read the CSV header: {err}")));
            return out;
        }
    };
    if headers.iter().all(String::is_empty) {
        return out;
    }
    // Physical line numbers from byte offsets: the csv crate's own line counter does not count
    // the line breaks of CRLF files the way an editor does.
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    // A record's position can point at the line break that ended the previous record.
    let line_of = |byte: u64| {
        let mut at = byte as usize;
        while at < bytes.len() && matches!(bytes[at], b'\r' | b'\n') {
            at += 1;
        }
        1 + newlines.partition_point(|&nl| nl < at)
    };
    let mut record = csv::ByteRecord::new();
    loop {
        let line = line_of(reader.position().byte());
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(err) => {
                let at = err.position().map_or(line, |p| line_of(p.byte()));
                out.rejected.push(reject(at, "", format!("invalid CSV: {err}")));
                // The csv reader resynchronises at the next record.
                continue;
            }
        }
        let line = record.position().map_or(line, |p| line_of(p.byte()));
        if record.as_slice().len() > max_record_bytes {
            out.rejected
                .push(too_long(line, record.as_slice().len(), max_record_bytes));
            continue;
        }
        if record.iter().all(|c| c.iter().all(u8::is_ascii_whitespace)) {
            continue;
        }
        if record.len() != headers.len() {
            out.rejected.push(reject(
                line,
                "",
                format!("row has {} cells, the header has {}", record.len(), headers.len()),
            ));
            continue;
        }
        let mut map = Map::new();
        let mut bad = None;
        for (name, cell) in headers.iter().zip(record.iter()) {
            match std::str::from_utf8(cell) {
                Ok(text) => {
                    map.insert(name.clone(), Value::String(text.to_string()));
                }
                Err(err) => {
                    bad = Some(reject(
                        line,
                        name,
                        format!("not UTF-8 (invalid byte at offset {} of the cell)", err.valid_up_to()),
                    ));
                    break;
                }
            }
        }
        match bad {
            Some(rejection) => out.rejected.push(rejection),
            None => out.records.push(RawRecord::new(line, Value::Object(map))),
        }
    }
    out
}

#[cfg(feature = "parquet")]
fn read_parquet(bytes: &[u8], max_record_bytes: usize) -> Records {
    crate::data::parquet_file::read_parquet(bytes, max_record_bytes)
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(_bytes: &[u8], _max_record_bytes: usize) -> Records {
    Records {
        records: vec![],
        rejected: vec![reject(
            1,
            "",
            "Parquet support is not built into this Finch (build with `--features parquet`), \
             or convert the file to JSONL",
        )],
    }
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(r: &Records) -> Vec<usize> {
        r.records.iter().map(|x| x.line).collect()
    }

    #[test]
    fn json_array_elements_keep_their_lines_and_survive_a_broken_neighbour() {
        let text = b"[\n  {\"a\": \"x]\\\"\"},\n  {\"a\": 2,},\n  {\"a\": [1, {\"b\": 3}]}\n]\n";
        let r = read_records(text, FileKind::Json, 1 << 20);
        assert_eq!(lines(&r), vec![2, 4]);
        assert_eq!(r.records[0].value["a"], "x]\"");
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].line, 3);
        assert!(r.rejected[0].reason.contains("invalid JSON"), "{:?}", r.rejected);
    }

    #[test]
    fn truncated_json_array_keeps_the_complete_records() {
        let text = b"[{\"a\": 1},\n{\"a\": 2},\n{\"a\": ";
        let r = read_records(text, FileKind::Json, 1 << 20);
        assert_eq!(lines(&r), vec![1, 2]);
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].line, 3);
        assert!(r.rejected[0].reason.contains("truncated"));
    }

    #[test]
    fn json_wrappers_and_misnamed_jsonl() {
        let wrapped = b"{\"data\": [\n{\"a\": 1},\n{\"a\": 2}]}";
        assert_eq!(lines(&read_records(wrapped, FileKind::Json, 1 << 20)), vec![2, 3]);
        let jsonl = b"{\"a\": 1}\n{\"a\": 2}\n";
        assert_eq!(lines(&read_records(jsonl, FileKind::Json, 1 << 20)), vec![1, 2]);
        let single = b"{\n\"a\": 1, \"b\": [2]\n}";
        assert_eq!(lines(&read_records(single, FileKind::Json, 1 << 20)), vec![1]);
        let scalar = read_records(b"42", FileKind::Json, 1 << 20);
        assert!(scalar.rejected[0].reason.contains("expected an array"));
    }

    #[test]
    fn jsonl_handles_bom_crlf_blank_lines_and_bad_bytes() {
        let mut text = b"\xEF\xBB\xBF{\"a\": 1}\r\n\r\n{\"a\": \"\xff\"}\r\n{\"a\": 3}".to_vec();
        text.extend_from_slice(b"\n{\"a\": ");
        let r = read_records(&text, FileKind::Jsonl, 1 << 20);
        assert_eq!(lines(&r), vec![1, 4]);
        let reasons: Vec<(usize, &str)> = r.rejected.iter().map(|x| (x.line, x.reason.as_str())).collect();
        assert_eq!(reasons.len(), 2);
        assert_eq!(reasons[0].0, 3);
        assert!(reasons[0].1.starts_with("not UTF-8"));
        assert_eq!(reasons[1].0, 5);
        assert!(reasons[1].1.starts_with("truncated JSON"));
    }

    #[test]
    fn csv_rows_report_their_physical_lines() {
        let text = b"instruction,output\r\n\"multi\nline\",ok\r\nshort\r\nx,y\r\n";
        let r = read_records(text, FileKind::Csv, 1 << 20);
        assert_eq!(lines(&r), vec![2, 5]);
        assert_eq!(r.records[0].value["instruction"], "multi\nline");
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].line, 4);
        assert!(r.rejected[0].reason.contains("1 cells"), "{:?}", r.rejected);
    }
}
