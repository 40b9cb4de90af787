//! The Data page's work: opening, saving, splitting, filtering and tokenizing on named threads,
//! polling their results, and applying what the widgets asked for.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use eframe::egui;

use crate::data::edit::DatasetEditor;
use crate::data::inspect::LengthStats;
use crate::data::load::{load_file, FileKind, LoadOptions, LoadReport, Row};
use crate::data::meta::RowMeta;
use crate::data::quality::{exact_duplicates, near_duplicates, within_length, NearDuplicateConfig};
use crate::data::split::{apply_split, train_validation_split};
use crate::data::tokenize::encode_example;
use crate::data::{Example, Message, Role};

use super::choose::ScoreOutcome;
use super::{
    histogram, open_data_model, split_paths, Action, DataPage, Dataset, FilterCounts, FilterKind, LoadMsg, Saved,
    SplitDone, TokenLengths, TokenizeMsg, HISTOGRAM_BINS,
};
use crate::ui::shared::Shared;
use crate::ui::worker::{Job, PickPurpose, Stream};

impl DataPage {
    /// Opens a dataset file on a background thread, as the Open button does (tests call this).
    pub fn open(&mut self, ctx: &egui::Context, shared: &mut Shared, path: &Path) {
        self.path_text = path.display().to_string();
        if let Some((_, stream)) = self.loading.take() {
            stream.cancel.store(true, Ordering::Relaxed);
        }
        let owned = path.to_path_buf();
        let stream = Stream::spawn("finch-data-load", ctx, move |send, cancel| {
            // The editor shows duplicates as rows so the duplicate filter can count and remove
            // them visibly, instead of the loader dropping them silently into the rejected list.
            let options = LoadOptions {
                keep_duplicates: true,
                ..LoadOptions::default()
            };
            let result = load_file(&owned, &options).map_err(|e| format!("{e:#}")).map(|report| {
                Box::new(Dataset {
                    editor: DatasetEditor::from_report(&report),
                    path: owned.clone(),
                    format: report.format,
                    file_kind: report.file_kind,
                    rejected: report.rejected,
                    replaced: false,
                })
            });
            if !cancel.load(Ordering::Relaxed) {
                send(LoadMsg::Done(result));
            }
        });
        match stream {
            Ok(stream) => {
                self.loading = Some((path.to_path_buf(), stream));
                self.load_started = Some(Instant::now());
                self.status = format!("Reading {}…", path.display());
            }
            Err(e) => shared.report("Cannot open the dataset", e, "Restart Finch."),
        }
    }

    /// Saves the rows to `path` (JSONL, atomically) on a background thread, as Save does.
    pub fn save_as(&mut self, ctx: &egui::Context, shared: &mut Shared, path: &Path) {
        let Some(d) = &self.dataset else { return };
        if self.saving.is_some() {
            return;
        }
        let mut editor = d.editor.clone();
        let revision = self.revision;
        let path = path.to_path_buf();
        self.save_text = path.display().to_string();
        let job = Job::spawn("finch-data-save", ctx, move || {
            editor.save_jsonl(&path).map_err(|e| format!("{e:#}"))?;
            Ok(Saved {
                revision,
                rows: editor.len(),
                editor,
                path,
            })
        });
        match job {
            Ok(job) => {
                self.saving = Some(job);
                self.status = "Saving…".into();
            }
            Err(e) => shared.report("Cannot save the dataset", e, "Restart Finch."),
        }
    }

    fn set_dataset(&mut self, shared: &mut Shared, dataset: Dataset) {
        self.cancel_tokenizing();
        self.path_text = dataset.path.display().to_string();
        self.save_text = dataset.path.display().to_string();
        self.status = format!(
            "Opened {}: {} rows, {} rejected",
            dataset.path.display(),
            dataset.editor.len(),
            dataset.rejected.len()
        );
        self.selected = (!dataset.editor.is_empty()).then_some(0);
        self.scroll_to = Some(0);
        self.before_filter.clear();
        self.draft = None;
        self.counts = None;
        self.lengths = None;
        self.inspected = None;
        let path = dataset.path.clone();
        self.dataset = Some(dataset);
        self.changed();
        shared.requests.train_on = Some(path);
    }

    pub(super) fn apply(&mut self, ctx: &egui::Context, shared: &mut Shared, action: Action) {
        match action {
            Action::Open(path) => self.open(ctx, shared, &path),
            Action::BrowseOpen => {
                let dir = Path::new(self.path_text.trim()).parent().map(Path::to_path_buf);
                shared.pick(PickPurpose::DataOpen, dir.as_deref());
            }
            Action::CancelLoad => {
                if let Some((path, stream)) = self.loading.take() {
                    stream.cancel.store(true, Ordering::Relaxed);
                    self.status = format!("Stopped reading {}", path.display());
                }
            }
            Action::UseForTraining => {
                if let Some(d) = &self.dataset {
                    let path = d.path.clone();
                    let unsaved = d.has_unsaved_changes();
                    shared.requests.train_on = Some(path.clone());
                    self.status = if unsaved {
                        format!(
                            "The Train page now uses {}; it trains on the file as saved, so save your edits first",
                            path.display()
                        )
                    } else {
                        format!("The Train page now uses {}", path.display())
                    };
                }
            }
            Action::Save(path) => self.save_as(ctx, shared, &path),
            Action::SaveAsDialog => {
                let dir = self
                    .dataset
                    .as_ref()
                    .and_then(|d| d.path.parent().map(Path::to_path_buf));
                shared.pick(PickPurpose::DataSaveAs, dir.as_deref());
            }
            Action::Undo => {
                let Some(d) = &mut self.dataset else { return };
                if d.editor.can_undo() {
                    d.editor.undo();
                    self.changed();
                } else if let Some((editor, _)) = self.before_filter.pop() {
                    d.editor = editor;
                    // The file may hold the filtered rows by now; count it as changed.
                    d.replaced = true;
                    self.status = "Restored the rows from before the filter".into();
                    self.changed();
                }
            }
            Action::Redo => {
                if let Some(d) = &mut self.dataset {
                    if d.editor.redo() {
                        self.changed();
                    }
                }
            }
            Action::AddRow => {
                let Some(d) = &mut self.dataset else { return };
                let text_rows = d.editor.rows().iter().any(|e| matches!(e, Example::Text { .. }));
                let example = if text_rows {
                    Example::Text { text: String::new() }
                } else {
                    Example::Chat {
                        messages: vec![Message::new(Role::User, ""), Message::new(Role::Assistant, "")],
                        tools: None,
                    }
                };
                let index = d.editor.add(example);
                self.changed();
                self.selected = Some(index);
                self.scroll_to = Some(index);
            }
            Action::DeleteRow => {
                let (Some(d), Some(index)) = (&mut self.dataset, self.selected) else {
                    return;
                };
                if d.editor.delete(index).is_ok() {
                    self.status = format!("Deleted row {}", index + 1);
                    self.changed();
                }
            }
            Action::Select(index) => self.selected = Some(index),
            Action::ApplyDraft => {
                let (Some(d), Some(draft)) = (&mut self.dataset, &self.draft) else {
                    return;
                };
                match d.editor.edit(draft.index, draft.example.clone()) {
                    Ok(()) => {
                        self.status = format!("Changed row {}", draft.index + 1);
                        self.changed();
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        shared.report("Cannot change the row", e, "Select the row again and retype the edit.");
                    }
                }
            }
            Action::DiscardDraft => self.draft = None,
            Action::Split => self.start_split(ctx, shared),
            Action::BrowseSplitDir => {
                let dir = self
                    .dataset
                    .as_ref()
                    .and_then(|d| d.path.parent().map(Path::to_path_buf));
                shared.pick(PickPurpose::DataSplitFolder, dir.as_deref());
            }
            Action::Count => self.start_counting(ctx, shared),
            Action::ApplyFilter(kind) => self.apply_filter(kind),
            Action::Score => self.start_scoring(ctx, shared),
            Action::StopScoring => {
                self.choose.cancel();
                self.status = "Stopping the scoring after the current row…".into();
            }
            Action::KeepRows(rows, status) => self.replace_rows(&rows, status),
            Action::CancelTokenize => {
                self.tokenize_stopped = self.tokenizing.as_ref().map(|(key, _)| key.clone());
                self.cancel_tokenizing();
                self.status = "Stopped counting tokens; they are counted again after the next change".into();
            }
        }
    }

    /// Answers of the Data page's file dialogs.
    pub fn on_pick(&mut self, ctx: &egui::Context, shared: &mut Shared, purpose: PickPurpose, path: &Path) {
        match purpose {
            PickPurpose::DataSaveAs => self.save_as(ctx, shared, path),
            PickPurpose::DataSplitFolder => self.split_dir_text = path.display().to_string(),
            _ => self.open(ctx, shared, path),
        }
    }

    fn start_split(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(d) = &self.dataset else { return };
        let dir_text = self.split_dir_text.trim();
        let dir = if dir_text.is_empty() {
            d.path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        } else {
            PathBuf::from(dir_text)
        };
        let (train_path, validation_path) = split_paths(&d.path, &dir);
        let rows: Vec<_> = d.editor.rows_with_meta().map(|(e, m)| (e.clone(), m.clone())).collect();
        let (fraction, seed) = (self.split_fraction, self.split_seed);
        let job = Job::spawn("finch-data-split", ctx, move || {
            let split = train_validation_split(rows.len(), fraction, seed).map_err(|e| format!("{e:#}"))?;
            let (train, validation) = apply_split(&rows, &split);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let (n_train, n_validation) = (train.len(), validation.len());
            DatasetEditor::with_meta(train)
                .save_jsonl(&train_path)
                .map_err(|e| format!("{e:#}"))?;
            DatasetEditor::with_meta(validation)
                .save_jsonl(&validation_path)
                .map_err(|e| format!("{e:#}"))?;
            Ok(SplitDone {
                train: (train_path, n_train),
                validation: (validation_path, n_validation),
            })
        });
        match job {
            Ok(job) => {
                self.splitting = Some(job);
                self.status = "Writing the split…".into();
            }
            Err(e) => shared.report("Cannot split the dataset", e, "Restart Finch."),
        }
    }

    fn start_counting(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(d) = &self.dataset else { return };
        let rows = d.editor.rows().to_vec();
        let revision = self.revision;
        let threshold = self.near_threshold;
        let bounds = (self.min_tokens, self.max_tokens.max(self.min_tokens));
        let lengths = self.current_lengths().map(|l| l.per_row.clone());
        let job = Job::spawn("finch-data-filters", ctx, move || {
            let exact: Vec<usize> = exact_duplicates(&rows).iter().map(|d| d.index).collect();
            let cfg = NearDuplicateConfig {
                threshold,
                ..NearDuplicateConfig::default()
            };
            let mut near: Vec<usize> = near_duplicates(&rows, &cfg)
                .map_err(|e| format!("{e:#}"))?
                .iter()
                .map(|d| d.index)
                .collect();
            near.sort_unstable();
            near.dedup();
            let length = lengths.map(|per_row| {
                // Rows that cannot be encoded have no length; the length filter leaves them alone.
                let known: Vec<(usize, usize)> = per_row
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| n.map(|n| (i, n)))
                    .collect();
                let lens: Vec<usize> = known.iter().map(|(_, n)| *n).collect();
                let kept: BTreeSet<usize> = within_length(&lens, Some(bounds.0), Some(bounds.1))
                    .into_iter()
                    .collect();
                known
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| !kept.contains(k))
                    .map(|(_, (i, _))| *i)
                    .collect()
            });
            Ok(FilterCounts {
                revision,
                exact,
                near,
                length,
                near_threshold: threshold,
                length_bounds: bounds,
            })
        });
        match job {
            Ok(job) => {
                self.counting = Some(job);
                self.status = "Counting what each filter would remove…".into();
            }
            Err(e) => shared.report("Cannot run the filters", e, "Restart Finch."),
        }
    }

    /// Replaces the rows by those the filter keeps.
    fn apply_filter(&mut self, kind: FilterKind) {
        let (Some(d), Some(counts)) = (&self.dataset, &self.counts) else {
            return;
        };
        if counts.revision != self.revision {
            return;
        }
        let (remove, what) = match kind {
            FilterKind::Exact => (&counts.exact, "exact duplicates"),
            FilterKind::Near => (&counts.near, "near-duplicates"),
            FilterKind::Length => match &counts.length {
                Some(length) => (length, "rows outside the token-length bounds"),
                None => return,
            },
        };
        if remove.is_empty() {
            return;
        }
        let remove: BTreeSet<usize> = remove.iter().copied().collect();
        let keep: Vec<usize> = (0..d.editor.len()).filter(|i| !remove.contains(i)).collect();
        let status = format!("Removed {} {what}; Undo brings them back", remove.len());
        self.replace_rows(&keep, status);
    }

    /// Starts scoring the rows with the Models page's model, as Score rows does.
    pub(super) fn start_scoring(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let (Some(d), Some(model)) = (&self.dataset, &shared.model) else {
            return;
        };
        let rows = d.editor.rows().to_vec();
        let seq_len = shared.settings.train.seq_len;
        match self.choose.start(ctx, model.path.clone(), rows, self.revision, seq_len) {
            Ok(()) => {
                self.status = format!(
                    "Scoring the rows with {} (cut to {seq_len} tokens)…",
                    model.path.display()
                )
            }
            Err(e) => shared.report("Cannot score the rows", e, "Restart Finch."),
        }
    }

    /// Puts a scoring run's scores on the rows (one undoable edit), when the rows are still
    /// the ones scored.
    fn apply_scores(&mut self, shared: &mut Shared, outcome: ScoreOutcome) {
        let (revision, table) = match outcome {
            ScoreOutcome::Scored { revision, table } => (revision, table),
            ScoreOutcome::Stopped => {
                self.status = "Stopped scoring; the rows keep the scores they had".into();
                return;
            }
            ScoreOutcome::Failed(e) => {
                self.status = "Rows not scored".into();
                shared.report("Cannot score the rows", e, "Open another model on the Models page.");
                return;
            }
        };
        let Some(d) = &mut self.dataset else { return };
        if revision != self.revision {
            self.status = "The rows changed while they were scored; score them again".into();
            return;
        }
        let meta: Vec<RowMeta> = d
            .editor
            .meta()
            .iter()
            .enumerate()
            .map(|(i, m)| RowMeta {
                scores: Some(table.row(i)),
                ..m.clone()
            })
            .collect();
        if let Err(e) = d.editor.set_meta(meta) {
            shared.report(
                "Cannot save the scores on the rows",
                format!("{e:#}"),
                "Score the rows again.",
            );
            return;
        }
        let finite = |v: &[f32]| -> Vec<f32> { v.iter().copied().filter(|x| x.is_finite()).collect() };
        let loss = finite(&table.loss);
        let mean = loss.iter().sum::<f32>() / loss.len().max(1) as f32;
        let mut status = format!("Scored {} rows: mean answer loss {mean:.3}", loss.len());
        if let Some(ifd) = &table.ifd {
            let ifd = finite(&ifd.ifd);
            let useless = ifd.iter().filter(|v| **v >= 1.0).count();
            status.push_str(&format!(
                "; IFD ≥ 1 (the instruction does not help) for {useless} of {}",
                ifd.len()
            ));
        }
        if !table.unscored.is_empty() {
            let (i, why) = &table.unscored[0];
            status.push_str(&format!(
                "; {} rows not scored (row {}: {why})",
                table.unscored.len(),
                i + 1
            ));
        }
        status.push_str("; Undo removes the scores");
        self.status = status;
        self.changed();
    }

    /// Replaces the rows by those at `keep` (ascending indices), each with its provenance and
    /// scores. [`DatasetEditor`] has no multi-row step, so the kept rows become a new editor and
    /// the old one is kept for Undo.
    pub(super) fn replace_rows(&mut self, keep: &[usize], status: String) {
        let Some(d) = &mut self.dataset else { return };
        let (rows, meta) = (d.editor.rows(), d.editor.meta());
        let report = LoadReport {
            path: Some(d.path.clone()),
            format: d.format,
            file_kind: d.file_kind,
            rows: keep
                .iter()
                .enumerate()
                .map(|(line, &i)| Row {
                    line: line + 1,
                    example: rows[i].clone(),
                    meta: meta[i].clone(),
                })
                .collect(),
            rejected: vec![],
            duplicates: 0,
        };
        let old = std::mem::replace(&mut d.editor, DatasetEditor::from_report(&report));
        self.before_filter.push((old, d.replaced));
        d.replaced = true;
        self.status = status;
        self.changed();
    }

    pub fn poll(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        self.generate.poll();
        if let Some(outcome) = self.choose.poll() {
            self.apply_scores(shared, outcome);
        }
        // The last dataset (or FINCH_UI_DATA) opens at start, as the last model does.
        if let Some(path) = self.open_at_start.take().filter(|p| p.is_file()) {
            self.open(ctx, shared, &path);
        }
        let mut done = None;
        if let Some((_, stream)) = &mut self.loading {
            for msg in stream.drain() {
                let LoadMsg::Done(result) = msg;
                done = Some(result);
            }
            if done.is_none() && stream.is_finished() {
                self.loading = None;
            }
        }
        if let Some(result) = done {
            let path = self.loading.take().map(|(p, _)| p).unwrap_or_default();
            match result {
                Ok(dataset) => self.set_dataset(shared, *dataset),
                Err(e) => {
                    self.status = format!("Could not open {}", path.display());
                    shared.report(
                        "Cannot open the dataset",
                        e,
                        "Pick a .jsonl, .json, .csv or .parquet file with Alpaca, ShareGPT, messages, \
                         prompt/completion or text rows.",
                    );
                }
            }
        }
        self.poll_model(ctx, shared);
        self.poll_jobs(shared);
        self.poll_tokenizing(ctx, shared);
    }

    /// Follows the model open on the Models page: reads its tokenizer and template once.
    fn poll_model(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let wanted = shared.model.as_ref().map(|c| c.path.clone());
        if let Some((path, job)) = &mut self.model_job {
            if wanted.as_ref() != Some(path) {
                self.model_job = None;
            } else if let Some(result) = job.poll() {
                let path = path.clone();
                self.model_job = None;
                match result {
                    Ok(model) => self.model = Some(model),
                    Err(e) => {
                        self.model_failed = Some(path);
                        shared.report(
                            "Cannot read the model's tokenizer for the Data page",
                            e,
                            "Open another model on the Models self.",
                        );
                    }
                }
                return;
            }
        }
        match &wanted {
            None => {
                if self.model.is_some() {
                    self.model = None;
                    self.inspected = None;
                    self.cancel_tokenizing();
                }
            }
            Some(path) => {
                let have = self.model.as_ref().is_some_and(|m| &m.path == path);
                let busy = self.model_job.as_ref().is_some_and(|(p, _)| p == path);
                if !have && !busy && self.model_failed.as_ref() != Some(path) {
                    let owned = path.clone();
                    match Job::spawn("finch-data-tokenizer", ctx, move || open_data_model(&owned)) {
                        Ok(job) => self.model_job = Some((path.clone(), job)),
                        Err(e) => shared.report("Cannot read the model's tokenizer", e, "Restart Finch."),
                    }
                }
            }
        }
    }

    fn poll_jobs(&mut self, shared: &mut Shared) {
        if let Some(job) = &mut self.saving {
            if let Some(result) = job.poll() {
                self.saving = None;
                match result {
                    Ok(saved) => {
                        self.status = format!("Saved {} rows to {}", saved.rows, saved.path.display());
                        if let Some(d) = &mut self.dataset {
                            d.path = saved.path.clone();
                            d.file_kind = FileKind::Jsonl;
                            if saved.revision == self.revision {
                                // Same rows as when the save started: take the editor that knows it is saved.
                                d.editor = saved.editor;
                                d.replaced = false;
                            }
                        }
                        self.path_text = saved.path.display().to_string();
                        shared.requests.train_on = Some(saved.path.clone());
                    }
                    Err(e) => {
                        self.status = "Not saved".into();
                        shared.report(
                            "Cannot save the dataset",
                            e,
                            "Choose a writable folder; a dataset that mixes conversations and raw text cannot be saved \
                             as one file.",
                        );
                    }
                }
                return;
            }
        }
        if let Some(job) = &mut self.splitting {
            if let Some(result) = job.poll() {
                self.splitting = None;
                match result {
                    Ok(done) => {
                        self.status = format!(
                            "Wrote {} training rows to {} and {} validation rows to {}",
                            done.train.1,
                            done.train.0.display(),
                            done.validation.1,
                            done.validation.0.display()
                        );
                    }
                    Err(e) => {
                        self.status = "Split not written".into();
                        shared.report(
                            "Cannot write the split",
                            e,
                            "Choose a writable folder and a validation share below 1.",
                        );
                    }
                }
                return;
            }
        }
        if let Some(job) = &mut self.counting {
            if let Some(result) = job.poll() {
                self.counting = None;
                match result {
                    Ok(counts) => {
                        self.status = format!(
                            "Filters would remove: {} exact duplicates, {} near-duplicates{}",
                            counts.exact.len(),
                            counts.near.len(),
                            counts
                                .length
                                .as_ref()
                                .map(|l| format!(", {} rows outside the token bounds", l.len()))
                                .unwrap_or_default()
                        );
                        self.counts = Some(counts);
                    }
                    Err(e) => shared.report(
                        "Cannot run the filters",
                        e,
                        "Pick a near-duplicate threshold in (0, 1].",
                    ),
                }
            }
        }
    }

    /// Keeps the token lengths in step with the rows and the model: a change cancels the count
    /// in progress and starts a new one.
    fn poll_tokenizing(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let loss_on = shared.settings.train.loss_on;
        if let Some((_, stream)) = &mut self.tokenizing {
            let mut finished = None;
            for msg in stream.drain() {
                match msg {
                    TokenizeMsg::Progress { done, total } => self.tokenize_progress = (done, total),
                    TokenizeMsg::Done(lengths) => finished = Some(lengths),
                }
            }
            let ended = stream.is_finished();
            if let Some(lengths) = finished {
                self.lengths = Some(lengths);
                self.tokenizing = None;
            } else if ended {
                self.tokenizing = None;
            }
        }
        let (Some(model), Some(d)) = (&self.model, &self.dataset) else {
            return;
        };
        let key = (self.revision, model.path.clone());
        let up_to_date = self
            .lengths
            .as_ref()
            .is_some_and(|l| l.revision == key.0 && l.model == key.1);
        let running_for_key = self.tokenizing.as_ref().is_some_and(|(k, _)| *k == key);
        // A count stopped by the user is not restarted until the rows or the model change.
        let stopped_by_user = self.tokenize_stopped.as_ref() == Some(&key);
        if up_to_date || running_for_key || stopped_by_user {
            return;
        }
        let rows = d.editor.rows().to_vec();
        let total_rows = rows.len();
        let tokenizer = model.tokenizer.clone();
        let template = model.template.clone();
        let thread_key = key.clone();
        self.cancel_tokenizing();
        let stream = Stream::spawn("finch-data-tokenize", ctx, move |send, cancel| {
            let total = rows.len();
            let mut per_row = Vec::with_capacity(total);
            let (mut errors, mut first_error) = (0usize, None);
            let mut last_report = Instant::now();
            for (i, ex) in rows.iter().enumerate() {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                // Untruncated, for the true length; the histogram shows where seq_len cuts.
                match encode_example(ex, &template, &tokenizer, loss_on, usize::MAX) {
                    Ok(t) => per_row.push(Some(t.len())),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("row {}: {e:#}", i + 1));
                        per_row.push(None);
                    }
                }
                if last_report.elapsed().as_millis() >= 100 {
                    last_report = Instant::now();
                    send(TokenizeMsg::Progress { done: i + 1, total });
                }
            }
            let known: Vec<usize> = per_row.iter().flatten().copied().collect();
            let (bars, bin_width) = histogram(&known, HISTOGRAM_BINS);
            send(TokenizeMsg::Done(TokenLengths {
                revision: thread_key.0,
                model: thread_key.1,
                stats: LengthStats::from_lengths(&known),
                per_row,
                encode_errors: errors,
                first_error,
                bars,
                bin_width,
            }));
        });
        match stream {
            Ok(stream) => {
                self.tokenize_progress = (0, total_rows);
                self.tokenizing = Some((key, stream));
            }
            Err(e) => shared.report("Cannot count tokens", e, "Restart Finch."),
        }
    }
}
