//! What Finch keeps about a row besides its content: where a generated row came from
//! ([`Provenance`]) and the scores a model gave it ([`RowScores`]). They travel with the row
//! through loading, the Data page's editor (undo included), filtering and saving, as two extra
//! fields of each record (`provenance`, `scores`) that every loader of the record's format
//! ignores, so a file with them still trains anywhere.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::generate::Provenance;

/// Provenance and scores of one row (both optional: a typed row has neither).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RowMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<RowScores>,
}

/// A model's scores of one row (`finch data score`, or Score rows on the Data page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowScores {
    /// Mean loss (nats per token) of the trained answer tokens; `None` when the row has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_loss: Option<f32>,
    /// Instruction-following difficulty: the answer's loss given the instruction ÷ its loss
    /// alone (≥ 1: the instruction does not help). `None` when not computed or not computable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifd: Option<f32>,
    /// The model that scored the row.
    pub model: String,
    /// Rows were cut to this many tokens.
    pub seq_len: usize,
}

/// The record fields the metadata is written to.
pub const PROVENANCE_FIELD: &str = "provenance";
pub const SCORES_FIELD: &str = "scores";

impl RowMeta {
    pub fn is_empty(&self) -> bool {
        self.provenance.is_none() && self.scores.is_none()
    }

    /// The metadata of a record as read from a file: its `provenance` and `scores` fields
    /// (objects, or JSON text in a CSV cell). A field that is not Finch's (another tool's
    /// `scores` list) is left out rather than failing the row: the row itself is still good.
    pub fn from_record(record: &Value) -> RowMeta {
        fn field<T: serde::de::DeserializeOwned>(record: &Value, name: &str) -> Option<T> {
            match record.get(name)? {
                Value::String(text) => serde_json::from_str(text).ok(),
                Value::Null => None,
                other => serde_json::from_value(other.clone()).ok(),
            }
        }
        RowMeta {
            provenance: field(record, PROVENANCE_FIELD),
            scores: field(record, SCORES_FIELD),
        }
    }

    /// Adds the metadata to a record object (a record that is not an object is left alone).
    pub fn write_into(&self, record: &mut Value) {
        let Value::Object(o) = record else { return };
        if let Some(p) = self.provenance.as_ref().and_then(|p| serde_json::to_value(p).ok()) {
            o.insert(PROVENANCE_FIELD.into(), p);
        }
        if let Some(s) = self.scores.as_ref().and_then(|s| serde_json::to_value(s).ok()) {
            o.insert(SCORES_FIELD.into(), s);
        }
    }

    /// The metadata after the row's content was changed by hand: the scores described the old
    /// text and are dropped; the provenance stays, marked as edited.
    pub fn after_edit(&self) -> RowMeta {
        RowMeta {
            provenance: self.provenance.clone().map(|mut p| {
                p.edited = true;
                p
            }),
            scores: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::data::generate::{Method, ProvenanceSettings};

    fn provenance() -> Provenance {
        let settings = ProvenanceSettings {
            temperature: 0.7,
            top_p: 0.95,
            seed: 1,
            max_new_tokens: 64,
            call_seed: 99,
        };
        Provenance {
            seed_rows: vec!["Seed one.".into()],
            ..Provenance::new(Method::SelfInstruct, "m".into(), 2, settings)
        }
    }

    #[test]
    fn metadata_round_trips_through_a_record_and_foreign_fields_are_left_out() {
        let meta = RowMeta {
            provenance: Some(provenance()),
            scores: Some(RowScores {
                answer_loss: Some(1.5),
                ifd: None,
                model: "m".into(),
                seq_len: 256,
            }),
        };
        let mut record = serde_json::json!({"instruction": "Q", "output": "A"});
        meta.write_into(&mut record);
        assert_eq!(record["scores"]["answer_loss"], 1.5);
        assert!(record["scores"].get("ifd").is_none());
        assert_eq!(RowMeta::from_record(&record), meta);
        // A CSV cell holds the same objects as JSON text.
        let csv_like = serde_json::json!({
            "instruction": "Q",
            "provenance": record["provenance"].to_string(),
            "scores": record["scores"].to_string(),
        });
        assert_eq!(RowMeta::from_record(&csv_like), meta);
        // Another tool's `scores` is not Finch's: the row keeps no scores, and no error.
        let foreign = serde_json::json!({"instruction": "Q", "scores": [1, 2, 3], "provenance": "web"});
        assert!(RowMeta::from_record(&foreign).is_empty());
        // Editing keeps where the row came from, marks it, and drops the stale scores.
        let edited = meta.after_edit();
        assert!(edited.provenance.as_ref().unwrap().edited && edited.scores.is_none());
        assert_eq!(RowMeta::default().after_edit(), RowMeta::default());
    }
}
