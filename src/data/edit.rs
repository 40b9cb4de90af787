//! The dataset editing model behind the studio's dataset builder: rows that can be added,
//! edited, deleted and reordered, with undo/redo, saved as JSONL atomically (a temporary file
//! renamed over the old one), so a crash mid-save leaves the previous file intact.
//!
//! The editor accepts rows that are not yet valid (a user is halfway through typing an answer);
//! [`DatasetEditor::problems`] lists what loading would reject, and saving writes every row, so
//! nothing the user typed is ever dropped.

use std::path::{Path, PathBuf};

use crate::data::export::write_examples;
use crate::data::load::{validate_example, FieldMap, FileKind, Format, LoadReport, Rejection};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// Undo history kept; older edits are forgotten.
pub const MAX_UNDO_STEPS: usize = 1000;

/// One reversible change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Edit {
    Insert { index: usize, example: Example },
    Delete { index: usize, example: Example },
    Replace { index: usize, old: Example, new: Example },
    Move { from: usize, to: usize },
}

impl Edit {
    fn inverse(&self) -> Edit {
        match self.clone() {
            Edit::Insert { index, example } => Edit::Delete { index, example },
            Edit::Delete { index, example } => Edit::Insert { index, example },
            Edit::Replace { index, old, new } => Edit::Replace {
                index,
                old: new,
                new: old,
            },
            Edit::Move { from, to } => Edit::Move { from: to, to: from },
        }
    }
}

/// Rows under edit, with history.
#[derive(Debug, Clone, Default)]
pub struct DatasetEditor {
    rows: Vec<Example>,
    undo: Vec<Edit>,
    redo: Vec<Edit>,
    /// Length of the undo stack when the rows matched the file; `None` once that state can no
    /// longer be reached (an edit after undoing past it).
    saved_at: Option<usize>,
    path: Option<PathBuf>,
}

impl DatasetEditor {
    pub fn new(rows: Vec<Example>) -> Self {
        DatasetEditor {
            rows,
            saved_at: Some(0),
            ..DatasetEditor::default()
        }
    }

    /// Starts from a loaded file (its usable rows; rejected ones stay in the report).
    pub fn from_report(report: &LoadReport) -> Self {
        DatasetEditor {
            rows: report.examples().cloned().collect(),
            path: report.path.clone(),
            saved_at: Some(0),
            ..DatasetEditor::default()
        }
    }

    pub fn rows(&self) -> &[Example] {
        &self.rows
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
        let index = self.rows.len();
        self.record(Edit::Insert { index, example });
        index
    }

    /// Inserts a row before `index` (`index == len` appends).
    pub fn insert(&mut self, index: usize, example: Example) -> Result<()> {
        if index > self.rows.len() {
            return Err(self.out_of_range("insert at", index, self.rows.len() + 1));
        }
        self.record(Edit::Insert { index, example });
        Ok(())
    }

    /// Replaces row `index`. Replacing a row with an identical one records nothing.
    pub fn edit(&mut self, index: usize, example: Example) -> Result<()> {
        let old = self
            .rows
            .get(index)
            .cloned()
            .ok_or_else(|| self.out_of_range("edit", index, self.rows.len()))?;
        if old != example {
            self.record(Edit::Replace {
                index,
                old,
                new: example,
            });
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

    /// Writes every row as JSONL, atomically. Conversations are written as OpenAI `messages`
    /// records and raw text as `text` records; a file holding both cannot be loaded as one format,
    /// so that is refused, naming the first row of the minority kind.
    pub fn save_jsonl(&mut self, path: &Path) -> Result<()> {
        let format = self.natural_format()?;
        let bytes = write_examples(&self.rows, format, FileKind::Jsonl, &FieldMap::default())?;
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
            Edit::Insert { index, example } => self.rows.insert(index, example),
            Edit::Delete { index, .. } => {
                self.rows.remove(index);
            }
            Edit::Replace { index, new, .. } => self.rows[index] = new,
            Edit::Move { from, to } => {
                let row = self.rows.remove(from);
                self.rows.insert(to, row);
            }
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
}
