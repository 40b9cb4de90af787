//! Parquet datasets (how the Hugging Face Hub serves most datasets). Rows are read with the
//! `parquet` crate's record API into JSON values, so nested columns (a `messages` list of
//! `{role, content}` structs) arrive exactly like their JSONL equivalent. Only the pure-Rust
//! codecs are built in (uncompressed, Snappy, LZ4); a file using another codec (zstd, brotli,
//! gzip) is reported as such.

use bytes::Bytes;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::data::records::{RawRecord, Records, Rejection};

/// Reads every row; the "line" of a record is its 1-based row number.
pub fn read_parquet(bytes: &[u8], max_record_bytes: usize) -> Records {
    let mut out = Records::default();
    let reject = |line: usize, reason: String| Rejection {
        line,
        field: String::new(),
        reason,
    };
    let reader = match SerializedFileReader::new(Bytes::copy_from_slice(bytes)) {
        Ok(reader) => reader,
        Err(err) => {
            out.rejected
                .push(reject(1, format!("not a readable Parquet file: {err}")));
            return out;
        }
    };
    let rows = match reader.get_row_iter(None) {
        Ok(rows) => rows,
        Err(err) => {
            out.rejected.push(reject(1, format!("cannot read Parquet rows: {err}")));
            return out;
        }
    };
    for (index, row) in rows.enumerate() {
        let line = index + 1;
        match row {
            Ok(row) => {
                let value = row.to_json_value();
                let size = value.to_string().len();
                if size > max_record_bytes {
                    out.rejected.push(reject(
                        line,
                        format!("record is {size} bytes, longer than the limit of {max_record_bytes} bytes"),
                    ));
                } else {
                    out.records.push(RawRecord::new(line, value));
                }
            }
            Err(err) => {
                // A broken page ends what the iterator can deliver; say where it stopped.
                out.rejected.push(reject(
                    line,
                    format!("cannot read Parquet row (reading stopped here): {err}"),
                ));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use crate::data::load::{load_bytes, FileKind, Format, LoadOptions};
    use crate::data::{Example, Message, Role};

    /// Writes a two-column (instruction, output) Snappy Parquet file.
    fn alpaca_parquet(rows: &[(&str, &str)]) -> Vec<u8> {
        let schema = Arc::new(
            parse_message_type(
                "message schema { REQUIRED BYTE_ARRAY instruction (UTF8); REQUIRED BYTE_ARRAY output (UTF8); }",
            )
            .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
        let mut buf = Vec::new();
        let mut writer = SerializedFileWriter::new(&mut buf, schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        for column in 0..2 {
            let mut col = group.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = rows
                .iter()
                .map(|r| ByteArray::from(if column == 0 { r.0 } else { r.1 }))
                .collect();
            col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
            col.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
        buf
    }

    #[test]
    fn parquet_rows_load_like_jsonl() {
        let bytes = alpaca_parquet(&[("Say hi", "hi"), ("Say bye", ""), ("Count", "1 2 3")]);
        let report = load_bytes(&bytes, FileKind::Parquet, &LoadOptions::default()).unwrap();
        assert_eq!(report.format, Format::Alpaca);
        assert_eq!(
            report.rows[1].example,
            Example::Chat {
                messages: vec![
                    Message::new(Role::User, "Count"),
                    Message::new(Role::Assistant, "1 2 3")
                ],
                tools: None,
            }
        );
        assert_eq!(report.rows[1].line, 3);
        assert_eq!(report.rejected.len(), 1);
        assert_eq!(
            (report.rejected[0].line, report.rejected[0].field.as_str()),
            (2, "output")
        );
    }

    #[test]
    fn broken_parquet_is_reported_not_panicked() {
        let bytes = alpaca_parquet(&[("a", "b")]);
        let err = load_bytes(&bytes[..bytes.len() / 2], FileKind::Parquet, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("Parquet"), "{err}");
        let err = load_bytes(b"PAR1 garbage", FileKind::Parquet, &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("Parquet"), "{err}");
    }
}
