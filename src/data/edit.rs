//! The dataset editing model behind the studio's dataset builder: rows that can be added,
//! edited, deleted and reordered, with undo/redo, saved as JSONL atomically (a temporary file
//! renamed over the old one), so a crash mid-save leaves the previous file intact.
//!
//! Each row carries its [`RowMeta`] (provenance of a generated row, a model's scores) through
//! every edit, undo included, and into the saved file.
//!
//! The editor accepts rows that are not yet valid (a user is halfway through typing an answer);
//! [`DatasetEditor::problems`] lists what loading would reject, and saving writes every row, so
//! nothing the user typed is ever dropped.

use std::path::{Path, PathBuf};

use crate::data::export::write_rows;
use crate::data::load::{validate_example, FieldMap, FileKind, Format, LoadReport, Rejection};
use crate::data::meta::RowMeta;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// Undo history kept; older edits are forgotten.
pub const MAX_UNDO_STEPS: usize = 1000;

/// One reversible change. (`Replace` holds two rows; the history is at most
/// [`MAX_UNDO_STEPS`] of these, so the size difference between variants costs little.)
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
enum Edit {
    Insert {
        index: usize,
        example: Example,
        meta: RowMeta,
    },
    Delete {
        index: usize,
        example: Example,
        meta: RowMeta,
    },
    Replace {
        index: usize,
        old: (Example, RowMeta),
        new: (Example, RowMeta),
    },
    Move {
        from: usize,
        to: usize,
    },
    /// Every row's metadata at once (the scores of a scoring run).
    Meta {
        old: Vec<RowMeta>,
        new: Vec<RowMeta>,
    },
}

impl Edit {
    fn inverse(&self) -> Edit {
        match self.clone() {
            Edit::Insert { index, example, meta } => Edit::Delete { index, example, meta },
            Edit::Delete { index, example, meta } => Edit::Insert { index, example, meta },
            Edit::Replace { index, old, new } => Edit::Replace {
                index,
                old: new,
                new: old,
            },
            Edit::Move { from, to } => Edit::Move { from: to, to: from },
            Edit::Meta { old, new } => Edit::Meta { old: new, new: old },
        }
    }
}

/// Rows under edit, with history.
#[derive(Debug, Clone, Default)]
pub struct DatasetEditor {
    rows: Vec<Example>,
    /// One per row.
    meta: Vec<RowMeta>,
    undo: Vec<Edit>,
    redo: Vec<Edit>,
    /// Length of the undo stack when the rows matched the file; `None` once that state can no
    /// longer be reached (an edit after undoing past it).
    saved_at: Option<usize>,
    path: Option<PathBuf>,
}

impl DatasetEditor {
    pub fn new(rows: Vec<Example>) -> Self {
        Self::with_meta(rows.into_iter().map(|ex| (ex, RowMeta::default())))
    }

    /// Rows with their provenance and scores.
    pub fn with_meta(rows: impl IntoIterator<Item = (Example, RowMeta)>) -> Self {
        let (rows, meta) = rows.into_iter().unzip();
        DatasetEditor {
            rows,
            meta,
            saved_at: Some(0),
            ..DatasetEditor::default()
        }
    }

    /// Starts from a loaded file (its usable rows; rejected ones stay in the report).
    pub fn from_report(report: &LoadReport) -> Self {
        DatasetEditor {
            path: report.path.clone(),
            ..Self::with_meta(report.rows.iter().map(|r| (r.example.clone(), r.meta.clone())))
        }
    }

    pub fn rows(&self) -> &[Example] {
        &self.rows
    }

    /// Each row's provenance and scores (as many as there are rows).
    pub fn meta(&self) -> &[RowMeta] {
        &self.meta
    }

    /// The rows with their metadata, in order.
    pub fn rows_with_meta(&self) -> impl Iterator<Item = (&Example, &RowMeta)> {
        self.rows.iter().zip(&self.meta)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Where the rows were loaded from or last saved to.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether there are changes since the last save (or load).
    pub fn has_unsaved_changes(&self) -> bool {
        self.saved_at != Some(self.undo.len())
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Appends a row; returns its index.
    pub fn add(&mut self, example: Example) -> usize {
        self.add_with_meta(example, RowMeta::default())
    }

    /// Appends a row with its provenance (a generated row the user accepted); returns its index.
    pub fn add_with_meta(&mut self, example: Example, meta: RowMeta) -> usize {
        let index = self.rows.len();
        self.record(Edit::Insert { index, example, meta });
        index
    }

    /// Inserts a row before `index` (`index == len` appends).
    pub fn insert(&mut self, index: usize, example: Example) -> Result<()> {
        if index > self.rows.len() {
            return Err(self.out_of_range("insert at", index, self.rows.len() + 1));
        }
        self.record(Edit::Insert {
            index,
            example,
            meta: RowMeta::default(),
        });
        Ok(())
    }

    /// Replaces row `index`. Replacing a row with an identical one records nothing. The row
    /// keeps its provenance (marked as edited); its scores, made for the old text, are dropped.
    pub fn edit(&mut self, index: usize, example: Example) -> Result<()> {
        let old = self
            .rows
            .get(index)
            .cloned()
            .ok_or_else(|| self.out_of_range("edit", index, self.rows.len()))?;
        if old != example {
            let meta = self.meta[index].clone();
            let new_meta = meta.after_edit();
            self.record(Edit::Replace {
                index,
                old: (old, meta),
                new: (example, new_meta),
            });
        }
        Ok(())
    }

    /// Replaces every row's metadata in one undoable step (the scores of a scoring run).
    pub fn set_meta(&mut self, meta: Vec<RowMeta>) -> Result<()> {
        if meta.len() != self.rows.len() {
            return Err(Error::Data(format!(
                "cannot set metadata of {} rows on a dataset of {} rows",
                meta.len(),
                self.rows.len()
            )));
        }
        if meta != self.meta {
            let old = self.meta.clone();
            self.record(Edit::Meta { old, new: meta });
        }
        Ok(())
    }

    /// Deletes row `index` and returns it.
    pub fn delete(&mut self, index: usize) -> Result<Example> {
        let example = self
            .rows
            .get(index)
            .cloned()
            .ok_or_else(|| self.out_of_range("delete", index, self.rows.len()))?;
        self.record(Edit::Delete {
            index,
            example: example.clone(),
            meta: self.meta[index].clone(),
        });
        Ok(example)
    }

    /// Moves row `from` so that it ends up at index `to`.
    pub fn move_row(&mut self, from: usize, to: usize) -> Result<()> {
        let n = self.rows.len();
        if from >= n {
            return Err(self.out_of_range("move", from, n));
        }
        if to >= n {
            return Err(self.out_of_range("move to", to, n));
        }
        if from != to {
            self.record(Edit::Move { from, to });
        }
        Ok(())
    }

    /// Reverts the last edit; `false` when there is nothing to undo.
    pub fn undo(&mut self) -> bool {
        let Some(edit) = self.undo.pop() else { return false };
        self.apply(&edit.inverse());
        self.redo.push(edit);
        true
    }

    /// Re-applies the last undone edit; `false` when there is nothing to redo.
    pub fn redo(&mut self) -> bool {
        let Some(edit) = self.redo.pop() else { return false };
        self.apply(&edit);
        self.undo.push(edit);
        true
    }

    /// What loading the saved file would reject, by 1-based row number.
    pub fn problems(&self) -> Vec<Rejection> {
        self.rows
            .iter()
            .enumerate()
            .filter_map(|(i, ex)| validate_example(i + 1, ex).err())
            .collect()
    }

    /// Writes every row as JSONL, atomically, with its provenance and scores. Conversations are
    /// written as OpenAI `messages` records and raw text as `text` records; a file holding both cannot be loaded as one format,
    /// so that is refused, naming the first row of the minority kind.
    pub fn save_jsonl(&mut self, path: &Path) -> Result<()> {
        let format = self.natural_format()?;
        let bytes = write_rows(self.rows_with_meta(), format, FileKind::Jsonl, &FieldMap::default())?;
        write_atomic(path, &bytes)?;
        self.path = Some(path.to_path_buf());
        self.saved_at = Some(self.undo.len());
        Ok(())
    }

    fn natural_format(&self) -> Result<Format> {
        let is_text = |e: &Example| matches!(e, Example::Text { .. });
        let texts = self.rows.iter().filter(|e| is_text(e)).count();
        if texts == 0 {
            return Ok(Format::Messages);
        }
        if texts == self.rows.len() {
            return Ok(Format::Text);
        }
        let minority_is_text = texts * 2 < self.rows.len();
        let row = self
            .rows
            .iter()
            .position(|e| is_text(e) == minority_is_text)
            .map_or(0, |i| i + 1);
        Err(Error::Data(format!(
            "cannot save a dataset that mixes conversations and raw text (row {row} is {}); \
             convert or delete it first",
            if minority_is_text { "raw text" } else { "a conversation" }
        )))
    }

    fn record(&mut self, edit: Edit) {
        self.apply(&edit);
        if self.saved_at.is_some_and(|at| at > self.undo.len()) {
            // The saved state was on the redo branch this edit discards.
            self.saved_at = None;
        }
        self.undo.push(edit);
        if self.undo.len() > MAX_UNDO_STEPS {
            self.undo.remove(0);
            self.saved_at = self.saved_at.and_then(|at| at.checked_sub(1));
        }
        self.redo.clear();
    }

    /// Applies an edit whose indices were checked when it was recorded.
    fn apply(&mut self, edit: &Edit) {
        match edit.clone() {
            Edit::Insert { index, example, meta } => {
                self.rows.insert(index, example);
                self.meta.insert(index, meta);
            }
            Edit::Delete { index, .. } => {
                self.rows.remove(index);
                self.meta.remove(index);
            }
            Edit::Replace { index, new, .. } => (self.rows[index], self.meta[index]) = new,
            Edit::Move { from, to } => {
                let row = self.rows.remove(from);
                self.rows.insert(to, row);
                let meta = self.meta.remove(from);
                self.meta.insert(to, meta);
            }
            Edit::Meta { new, .. } => self.meta = new,
        }
    }

    fn out_of_range(&self, what: &str, index: usize, bound: usize) -> Error {
        Error::Data(format!(
            "cannot {what} row {index}: the dataset has {} rows (valid indices 0..{bound})",
            self.rows.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load::{load_file, LoadOptions};
    use crate::data::{Message, Role};

    fn qa(q: &str, a: &str) -> Example {
        Example::Chat {
            messages: vec![Message::new(Role::User, q), Message::new(Role::Assistant, a)],
            tools: None,
        }
    }

    #[test]
    fn every_edit_undoes_and_redoes_exactly() {
        let start = vec![qa("1", "a"), qa("2", "b"), qa("3", "c")];
        let mut ed = DatasetEditor::new(start.clone());
        let mut states = vec![ed.rows().to_vec()];
        ed.add(qa("4", "d"));
        states.push(ed.rows().to_vec());
        ed.insert(0, qa("0", "z")).unwrap();
        states.push(ed.rows().to_vec());
        ed.edit(2, qa("2", "B")).unwrap();
        states.push(ed.rows().to_vec());
        assert_eq!(ed.delete(1).unwrap(), qa("1", "a"));
        states.push(ed.rows().to_vec());
        ed.move_row(0, 3).unwrap();
        states.push(ed.rows().to_vec());
        assert_eq!(ed.rows(), &[qa("2", "B"), qa("3", "c"), qa("4", "d"), qa("0", "z")]);
        // Walk all the way back, then all the way forward.
        for expected in states.iter().rev().skip(1) {
            assert!(ed.undo());
            assert_eq!(ed.rows(), expected.as_slice());
        }
        assert!(!ed.undo() && !ed.has_unsaved_changes());
        for expected in states.iter().skip(1) {
            assert!(ed.redo());
            assert_eq!(ed.rows(), expected.as_slice());
        }
        assert!(!ed.redo());
        // A new edit clears the redo stack.
        ed.undo();
        ed.add(qa("5", "e"));
        assert!(!ed.can_redo());
    }

    #[test]
    fn bad_indices_are_errors_and_change_nothing() {
        let mut ed = DatasetEditor::new(vec![qa("1", "a")]);
        assert!(ed.insert(2, qa("x", "y")).is_err());
        assert!(ed.edit(1, qa("x", "y")).is_err());
        assert!(ed.delete(5).unwrap_err().to_string().contains("has 1 rows"));
        assert!(ed.move_row(0, 1).is_err());
        assert_eq!(ed.rows(), &[qa("1", "a")]);
        assert!(!ed.can_undo());
        ed.edit(0, qa("1", "a")).unwrap();
        assert!(!ed.can_undo(), "an identical replacement is not an edit");
    }

    #[test]
    fn saves_atomically_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("set.jsonl");
        let mut ed = DatasetEditor::new(vec![qa("1", "a"), qa("2", "")]);
        assert_eq!(ed.problems().len(), 1);
        assert_eq!(ed.problems()[0].line, 2);
        ed.add(qa("3", "c"));
        assert!(ed.has_unsaved_changes());
        ed.save_jsonl(&path).unwrap();
        assert!(!ed.has_unsaved_changes());
        assert_eq!(ed.path(), Some(path.as_path()));
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // The invalid row was saved too (nothing typed is lost) and is reported on load.
        let report = load_file(&path, &LoadOptions::default()).unwrap();
        assert_eq!(report.summary(), "2 rows ok, 1 rejected");
        assert_eq!(report.rejected[0].line, 2);
        let ed2 = DatasetEditor::from_report(&report);
        assert_eq!(ed2.rows(), &[qa("1", "a"), qa("3", "c")]);
        // Undo after saving makes the state dirty again, redo clean; a different edit after
        // undoing past the save point is dirty for good.
        ed.undo();
        assert!(ed.has_unsaved_changes());
        ed.redo();
        assert!(!ed.has_unsaved_changes());
        ed.undo();
        ed.add(qa("9", "z"));
        assert!(ed.has_unsaved_changes());
        ed.undo();
        assert!(ed.has_unsaved_changes());

        let mut mixed = DatasetEditor::new(vec![qa("1", "a"), qa("2", "b"), Example::Text { text: "t".into() }]);
        let err = mixed.save_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("row 3 is raw text"), "{err}");
        // The earlier file is untouched by the refused save.
        assert_eq!(load_file(&path, &LoadOptions::default()).unwrap().rows.len(), 2);
    }

    fn scored(loss: f32) -> RowMeta {
        RowMeta {
            provenance: None,
            scores: Some(crate::data::meta::RowScores {
                answer_loss: Some(loss),
                ifd: Some(loss / 2.0),
                model: "m".into(),
                seq_len: 64,
            }),
        }
    }

    fn generated() -> RowMeta {
        let row: crate::data::generate::GeneratedRow = serde_json::from_value(serde_json::json!({
            "instruction": "Name a tree.", "output": "Oak.",
            "provenance": {"method": "evol-instruct", "model": "tiny", "attempt": 4,
                "original": {"instruction": "Name a plant.", "output": "Fern."}, "evolution": "concretize",
                "settings": {"temperature": 0.7, "top_p": 0.95, "seed": 3, "max_new_tokens": 64, "call_seed": 11}}
        }))
        .unwrap();
        row.meta()
    }

    #[test]
    fn provenance_and_scores_follow_their_rows_through_edits_undo_and_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.jsonl");
        let mut ed = DatasetEditor::with_meta(vec![(qa("1", "a"), scored(1.0)), (qa("2", "b"), RowMeta::default())]);
        let tree = generated();
        assert_eq!(ed.add_with_meta(qa("Name a tree.", "Oak."), tree.clone()), 2);
        ed.move_row(2, 0).unwrap();
        assert_eq!(ed.meta()[0], tree);
        assert_eq!(ed.meta()[1], scored(1.0));
        // Deleting and undoing brings the metadata back with the row.
        ed.delete(1).unwrap();
        assert_eq!(ed.meta(), &[tree.clone(), RowMeta::default()]);
        ed.undo();
        assert_eq!(ed.meta()[1], scored(1.0));
        // An edit keeps the provenance (marked edited) and drops the stale scores; undo restores both.
        ed.edit(0, qa("Name a tall tree.", "Oak.")).unwrap();
        ed.edit(1, qa("1", "A")).unwrap();
        assert!(ed.meta()[0].provenance.as_ref().unwrap().edited);
        assert_eq!(ed.meta()[1], RowMeta::default());
        ed.undo();
        ed.undo();
        assert_eq!(ed.meta()[0], tree);
        assert_eq!(ed.meta()[1], scored(1.0));
        // Setting every row's scores is one undoable step.
        let rescored: Vec<RowMeta> = (0..3)
            .map(|i| RowMeta {
                provenance: ed.meta()[i].provenance.clone(),
                ..scored(i as f32)
            })
            .collect();
        assert!(ed.set_meta(rescored[..2].to_vec()).is_err());
        ed.set_meta(rescored.clone()).unwrap();
        assert_eq!(ed.meta(), rescored.as_slice());
        ed.undo();
        assert_eq!(ed.meta()[1], scored(1.0));
        ed.redo();
        // The saved file holds both, and loading it gives them back.
        ed.save_jsonl(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().next().unwrap().contains("\"evolution\":\"concretize\""),
            "{text}"
        );
        let report = load_file(&path, &LoadOptions::default()).unwrap();
        let loaded = DatasetEditor::from_report(&report);
        assert_eq!(loaded.rows(), ed.rows());
        assert_eq!(loaded.meta(), rescored.as_slice());
    }
}
