//! The Data page: open a dataset file or a bundled demo, browse it in a table that lays out only
//! the visible rows (so 100k rows scroll smoothly), see the rows the loader rejected with their
//! line numbers and reasons, edit / add / delete rows with undo and save atomically, write a
//! train / validation split, count and apply the quality filters, and, with a model open on the
//! Models page, the token-length histogram against the Train page's `seq_len` and one row
//! rendered with the chat template showing which tokens are trained, masked, and the
//! end-of-turn marker.
//!
//! Parsing, tokenizing every row, filtering, splitting and saving run on named threads; the UI
//! thread only renders cached state. The rows themselves live in a [`DatasetEditor`], which owns
//! undo/redo and the atomic save.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot, VLine};
use tokenizers::Tokenizer;

use crate::data::edit::DatasetEditor;
use crate::data::inspect::{loss_segments, LengthStats};
use crate::data::load::{describe_rejection, load_file, FileKind, Format, LoadOptions, LoadReport, Rejection, Row};
use crate::data::quality::{exact_duplicates, near_duplicates, within_length, NearDuplicateConfig};
use crate::data::split::{apply_split, train_validation_split};
use crate::data::tokenize::encode_example;
use crate::data::{Example, LossOn, Message, Role};
use crate::model::template_choice::choose_template;
use crate::template::ChatTemplate;

use super::app::App;
use super::widgets::format_count;
use super::worker::{Job, PickPurpose, Stream};

/// The bundled demo datasets (folders under `assets/datasets`, each with a `train.jsonl`).
pub const DEMO_DATASETS: [(&str, &str); 3] = [
    (
        "json_extract",
        "Alpaca rows: answer a sentence about a person with exactly {\"name\", \"age\", \"city\"} JSON.",
    ),
    (
        "numbered_list",
        "Alpaca rows: turn a comma-separated list into a numbered list, one capitalised item per line.",
    ),
    (
        "pirate_persona",
        "OpenAI messages: answer plain questions in pirate speak with a greeting and a sign-off.",
    ),
];

/// Height of the row table; only the rows inside it are laid out.
const TABLE_HEIGHT: f32 = 360.0;
/// Characters of a row's prompt or answer shown in the table.
const PREVIEW_CHARS: usize = 70;
/// Bars in the token-length histogram.
const HISTOGRAM_BINS: usize = 40;
/// Problems and rejections listed by text before the list scrolls.
const LIST_HEIGHT: f32 = 160.0;

/// The bundled demo datasets folder: next to the executable or up to three folders above it (an
/// unpacked release, or `target/debug/finch` in a checkout), else the source tree Finch was built from.
pub fn demo_datasets_dir() -> Option<PathBuf> {
    let mut candidates = vec![];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join("assets").join("datasets"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("datasets"));
    candidates
        .into_iter()
        .find(|d| d.join(DEMO_DATASETS[0].0).join("train.jsonl").is_file())
}

/// The open dataset: the rows under edit and what loading the file reported.
struct Dataset {
    editor: DatasetEditor,
    path: PathBuf,
    format: Format,
    file_kind: FileKind,
    /// Records the loader skipped, in line order (they are not part of the editor's rows).
    rejected: Vec<Rejection>,
    /// Set when a filter replaced the rows: the editor's own saved state no longer describes the file.
    replaced: bool,
}

impl Dataset {
    fn has_unsaved_changes(&self) -> bool {
        self.replaced || self.editor.has_unsaved_changes()
    }
}

/// What the loading thread sends.
enum LoadMsg {
    Done(Result<Box<Dataset>, String>),
}

/// The tokenizer and chat template of the model open on the Models page.
#[derive(Clone)]
struct DataModel {
    path: PathBuf,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    /// Why the template is not the model's own, when it is not.
    note: Option<String>,
}

/// Reads a model's tokenizer and chat template (not its weights). Without a usable template of
/// its own, ChatML with the model's special tokens is used, as `finch data inspect` does.
fn open_data_model(path: &Path) -> Result<DataModel, String> {
    let files = crate::hub::open_model(&path.display().to_string()).map_err(|e| format!("{e:#}"))?;
    let choice = choose_template(Some(&files), None);
    Ok(DataModel {
        path: path.to_path_buf(),
        tokenizer: Arc::new(files.tokenizer),
        template: Arc::new(choice.template),
        note: choice.note,
    })
}

/// What the tokenizing thread sends.
enum TokenizeMsg {
    Progress { done: usize, total: usize },
    Done(TokenLengths),
}

/// Token length of every row under one model, for one state of the rows.
pub struct TokenLengths {
    revision: u64,
    model: PathBuf,
    /// `None` for a row the template or tokenizer cannot encode.
    pub per_row: Vec<Option<usize>>,
    pub encode_errors: usize,
    pub first_error: Option<String>,
    /// `(bin centre, rows)` of the histogram and the bin width in tokens.
    bars: Vec<[f64; 2]>,
    bin_width: f64,
    pub stats: Option<LengthStats>,
}

/// Bins token lengths into at most `bins` bars of equal integer width.
fn histogram(lengths: &[usize], bins: usize) -> (Vec<[f64; 2]>, f64) {
    let Some(&max) = lengths.iter().max() else {
        return (vec![], 1.0);
    };
    let width = (max + 1).div_ceil(bins.max(1)).max(1);
    let mut counts = vec![0usize; (max / width) + 1];
    for &n in lengths {
        counts[n / width] += 1;
    }
    let bars = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| [(i as f64 + 0.5) * width as f64, c as f64])
        .collect();
    (bars, width as f64)
}

/// One stretch of the inspector's rendered row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectorPiece {
    pub text: String,
    /// The tokens carry loss.
    pub trained: bool,
    /// The stretch is the template's end-of-turn marker.
    pub end_of_turn: bool,
}

/// Cuts the end-of-turn marker out of trained/masked segments so it can be drawn in its own style.
fn split_end_of_turn(segments: &[crate::data::inspect::Segment], marker: Option<&str>) -> Vec<InspectorPiece> {
    let mut pieces = vec![];
    for s in segments {
        let mut rest = s.text.as_str();
        if let Some(marker) = marker.filter(|m| !m.is_empty()) {
            while let Some(at) = rest.find(marker) {
                if at > 0 {
                    pieces.push(InspectorPiece {
                        text: rest[..at].to_string(),
                        trained: s.trained,
                        end_of_turn: false,
                    });
                }
                pieces.push(InspectorPiece {
                    text: marker.to_string(),
                    trained: s.trained,
                    end_of_turn: true,
                });
                rest = &rest[at + marker.len()..];
            }
        }
        if !rest.is_empty() {
            pieces.push(InspectorPiece {
                text: rest.to_string(),
                trained: s.trained,
                end_of_turn: false,
            });
        }
    }
    pieces
}

/// The inspector's view of one row, and the inputs it was computed from.
struct Inspected {
    key: (usize, u64, PathBuf, usize, LossOn),
    result: Result<Vec<InspectorPiece>, String>,
    end_of_turn: Option<String>,
    tokens: usize,
    trained_tokens: usize,
    truncated: bool,
}

/// Rows each quality filter would remove, for one state of the rows (indices, ascending).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterCounts {
    revision: u64,
    pub exact: Vec<usize>,
    /// Near-duplicates at the chosen threshold, exact ones included.
    pub near: Vec<usize>,
    /// Rows outside the token-length bounds; `None` without token lengths.
    pub length: Option<Vec<usize>>,
    /// The bounds and threshold these counts were made with.
    near_threshold: f32,
    length_bounds: (usize, usize),
}

/// Which filter to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterKind {
    Exact,
    Near,
    Length,
}

/// A dataset file written by a save.
struct Saved {
    revision: u64,
    editor: DatasetEditor,
    path: PathBuf,
    rows: usize,
}

/// Files written by a split.
struct SplitDone {
    train: (PathBuf, usize),
    validation: (PathBuf, usize),
}

/// The row being edited in the side panel.
struct Draft {
    index: usize,
    revision: u64,
    example: Example,
}

/// State of the Data page.
pub struct DataPage {
    /// The dataset file field.
    pub path_text: String,
    loading: Option<(PathBuf, Stream<LoadMsg>)>,
    load_started: Option<Instant>,
    dataset: Option<Dataset>,
    /// Bumped on every change of the rows; caches and background results carry the revision
    /// they were made for and are dropped when it moved on.
    revision: u64,
    /// Editors replaced by a filter, newest last: Undo restores them once the editor's own
    /// history is used up.
    before_filter: Vec<(DatasetEditor, bool)>,
    /// Table text of the rows laid out so far, for the current revision.
    previews: HashMap<usize, (String, String)>,
    previews_revision: u64,
    problems: Vec<Rejection>,
    problems_revision: u64,
    selected: Option<usize>,
    scroll_to: Option<usize>,
    goto_row: usize,
    draft: Option<Draft>,
    save_text: String,
    saving: Option<Job<Result<Saved, String>>>,
    model: Option<DataModel>,
    model_job: Option<(PathBuf, Job<Result<DataModel, String>>)>,
    /// Model path whose opening failed, so it is not retried every frame.
    model_failed: Option<PathBuf>,
    lengths: Option<TokenLengths>,
    tokenizing: Option<((u64, PathBuf), Stream<TokenizeMsg>)>,
    tokenize_progress: (usize, usize),
    /// The rows-and-model state whose count the user stopped.
    tokenize_stopped: Option<(u64, PathBuf)>,
    inspected: Option<Inspected>,
    split_fraction: f32,
    split_seed: u64,
    split_dir_text: String,
    splitting: Option<Job<Result<SplitDone, String>>>,
    near_threshold: f32,
    min_tokens: usize,
    max_tokens: usize,
    counting: Option<Job<Result<FilterCounts, String>>>,
    counts: Option<FilterCounts>,
    status: String,
    started: bool,
}

impl Default for DataPage {
    fn default() -> Self {
        DataPage {
            path_text: String::new(),
            loading: None,
            load_started: None,
            dataset: None,
            revision: 0,
            before_filter: vec![],
            previews: HashMap::new(),
            previews_revision: 0,
            problems: vec![],
            problems_revision: 0,
            selected: None,
            scroll_to: None,
            goto_row: 1,
            draft: None,
            save_text: String::new(),
            saving: None,
            model: None,
            model_job: None,
            model_failed: None,
            lengths: None,
            tokenizing: None,
            tokenize_progress: (0, 0),
            tokenize_stopped: None,
            inspected: None,
            split_fraction: 0.1,
            split_seed: 0,
            split_dir_text: String::new(),
            splitting: None,
            near_threshold: NearDuplicateConfig::default().threshold,
            min_tokens: 1,
            max_tokens: 2048,
            counting: None,
            counts: None,
            status: String::new(),
            started: false,
        }
    }
}

impl DataPage {
    fn rows(&self) -> &[Example] {
        self.dataset.as_ref().map_or(&[], |d| d.editor.rows())
    }

    fn can_undo(&self) -> bool {
        self.dataset.as_ref().is_some_and(|d| d.editor.can_undo()) || !self.before_filter.is_empty()
    }

    fn can_redo(&self) -> bool {
        self.dataset.as_ref().is_some_and(|d| d.editor.can_redo())
    }

    /// Token lengths when they describe the current rows.
    fn current_lengths(&self) -> Option<&TokenLengths> {
        self.lengths
            .as_ref()
            .filter(|l| l.revision == self.revision && self.model.as_ref().is_some_and(|m| m.path == l.model))
    }

    fn changed(&mut self) {
        self.revision += 1;
        if let Some(d) = &self.dataset {
            self.selected = self
                .selected
                .filter(|_| !d.editor.is_empty())
                .map(|i| i.min(d.editor.len() - 1));
        }
    }

    fn cancel_tokenizing(&mut self) {
        if let Some((_, stream)) = self.tokenizing.take() {
            stream.cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// `"Hello\nworld"` → `"Hello ¶ world"`, cut to `max` characters with an ellipsis.
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i >= max {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str(" ¶ "),
            '\r' | '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The table's prompt and answer text for a row.
fn preview(ex: &Example) -> (String, String) {
    match ex {
        Example::Text { text } => (one_line(text, PREVIEW_CHARS), String::new()),
        Example::Chat { messages } => {
            let first = |role: Role| {
                messages
                    .iter()
                    .find(|m| m.role == role)
                    .map(|m| one_line(&m.content, PREVIEW_CHARS))
                    .unwrap_or_default()
            };
            let turns = messages.iter().filter(|m| m.role == Role::Assistant).count();
            let mut answer = first(Role::Assistant);
            if turns > 1 {
                answer = format!("({turns} turns) {answer}");
            }
            (first(Role::User), answer)
        }
    }
}

/// Rows without the given indices (ascending or not).
fn without(rows: &[Example], remove: &[usize]) -> Vec<Example> {
    let remove: BTreeSet<usize> = remove.iter().copied().collect();
    rows.iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(_, ex)| ex.clone())
        .collect()
}

/// `<stem>.train.jsonl` and `<stem>.val.jsonl` in `dir`.
fn split_paths(file: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    (
        dir.join(format!("{stem}.train.jsonl")),
        dir.join(format!("{stem}.val.jsonl")),
    )
}

/// What the page's widgets asked for this frame; applied after drawing so the drawing code only
/// borrows the page.
enum Action {
    Open(PathBuf),
    BrowseOpen,
    CancelLoad,
    UseForTraining,
    Save(PathBuf),
    SaveAsDialog,
    Undo,
    Redo,
    AddRow,
    DeleteRow,
    Select(usize),
    ApplyDraft,
    DiscardDraft,
    Split,
    BrowseSplitDir,
    Count,
    ApplyFilter(FilterKind),
    CancelTokenize,
}

impl App {
    /// Opens a dataset file on a background thread, as the Open button does (tests call this).
    pub fn open_dataset(&mut self, ctx: &egui::Context, path: &Path) {
        self.data.path_text = path.display().to_string();
        if let Some((_, stream)) = self.data.loading.take() {
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
                self.data.loading = Some((path.to_path_buf(), stream));
                self.data.load_started = Some(Instant::now());
                self.data.status = format!("Reading {}…", path.display());
            }
            Err(e) => self.report("Cannot open the dataset", e, "Restart Finch."),
        }
    }

    /// Saves the rows to `path` (JSONL, atomically) on a background thread, as Save does.
    pub fn save_dataset_as(&mut self, ctx: &egui::Context, path: &Path) {
        let Some(d) = &self.data.dataset else { return };
        if self.data.saving.is_some() {
            return;
        }
        let mut editor = d.editor.clone();
        let revision = self.data.revision;
        let path = path.to_path_buf();
        self.data.save_text = path.display().to_string();
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
                self.data.saving = Some(job);
                self.data.status = "Saving…".into();
            }
            Err(e) => self.report("Cannot save the dataset", e, "Restart Finch."),
        }
    }

    /// The rows of the open dataset (empty when none is open).
    pub fn data_rows(&self) -> &[Example] {
        self.data.rows()
    }

    /// Records the loader rejected from the open file, in line order.
    pub fn data_rejected(&self) -> &[Rejection] {
        self.data.dataset.as_ref().map_or(&[], |d| &d.rejected)
    }

    /// True while the Data page reads, saves, splits, filters or tokenizes in the background.
    pub fn data_is_busy(&self) -> bool {
        let page = &self.data;
        page.loading.is_some()
            || page.saving.is_some()
            || page.splitting.is_some()
            || page.counting.is_some()
            || page.tokenizing.is_some()
            || page.model_job.is_some()
    }

    /// The Data page's status line ("Saved 24 rows to …", "Wrote … and …").
    pub fn data_status(&self) -> &str {
        &self.data.status
    }

    /// Whether the rows differ from the file they were loaded from or last saved to.
    pub fn data_has_unsaved_changes(&self) -> bool {
        self.data.dataset.as_ref().is_some_and(Dataset::has_unsaved_changes)
    }

    /// The token lengths the histogram draws (one per encodable row), when they are up to date.
    pub fn data_histogram_lengths(&self) -> Option<Vec<usize>> {
        self.data
            .current_lengths()
            .map(|l| l.per_row.iter().flatten().copied().collect())
    }

    /// The inspector's rendering of the selected row, when a model is open.
    pub fn data_inspector_pieces(&self) -> Option<&[InspectorPiece]> {
        self.data.inspected.as_ref()?.result.as_ref().ok().map(|p| p.as_slice())
    }

    /// Rows each quality filter would remove, once counted for the current rows.
    pub fn data_filter_counts(&self) -> Option<&FilterCounts> {
        self.data.counts.as_ref().filter(|c| c.revision == self.data.revision)
    }

    /// The selected row (0-based).
    pub fn data_selected_row(&self) -> Option<usize> {
        self.data.selected
    }

    fn set_dataset(&mut self, dataset: Dataset) {
        let page = &mut self.data;
        page.cancel_tokenizing();
        page.path_text = dataset.path.display().to_string();
        page.save_text = dataset.path.display().to_string();
        page.status = format!(
            "Opened {}: {} rows, {} rejected",
            dataset.path.display(),
            dataset.editor.len(),
            dataset.rejected.len()
        );
        page.selected = (!dataset.editor.is_empty()).then_some(0);
        page.scroll_to = Some(0);
        page.before_filter.clear();
        page.draft = None;
        page.counts = None;
        page.lengths = None;
        page.inspected = None;
        let path = dataset.path.clone();
        page.dataset = Some(dataset);
        page.changed();
        self.set_data_path(&path);
    }

    fn apply_data_action(&mut self, ctx: &egui::Context, action: Action) {
        match action {
            Action::Open(path) => self.open_dataset(ctx, &path),
            Action::BrowseOpen => {
                let dir = Path::new(self.data.path_text.trim()).parent().map(Path::to_path_buf);
                self.start_pick(ctx, PickPurpose::DataOpen, dir.as_deref());
            }
            Action::CancelLoad => {
                if let Some((path, stream)) = self.data.loading.take() {
                    stream.cancel.store(true, Ordering::Relaxed);
                    self.data.status = format!("Stopped reading {}", path.display());
                }
            }
            Action::UseForTraining => {
                if let Some(d) = &self.data.dataset {
                    let path = d.path.clone();
                    let unsaved = d.has_unsaved_changes();
                    self.set_data_path(&path);
                    self.data.status = if unsaved {
                        format!(
                            "The Train page now uses {}; it trains on the file as saved, so save your edits first",
                            path.display()
                        )
                    } else {
                        format!("The Train page now uses {}", path.display())
                    };
                }
            }
            Action::Save(path) => self.save_dataset_as(ctx, &path),
            Action::SaveAsDialog => {
                let dir = self
                    .data
                    .dataset
                    .as_ref()
                    .and_then(|d| d.path.parent().map(Path::to_path_buf));
                self.start_pick(ctx, PickPurpose::DataSaveAs, dir.as_deref());
            }
            Action::Undo => {
                let page = &mut self.data;
                let Some(d) = &mut page.dataset else { return };
                if d.editor.can_undo() {
                    d.editor.undo();
                    page.changed();
                } else if let Some((editor, _)) = page.before_filter.pop() {
                    d.editor = editor;
                    // The file may hold the filtered rows by now; count it as changed.
                    d.replaced = true;
                    page.status = "Restored the rows from before the filter".into();
                    page.changed();
                }
            }
            Action::Redo => {
                let page = &mut self.data;
                if let Some(d) = &mut page.dataset {
                    if d.editor.redo() {
                        page.changed();
                    }
                }
            }
            Action::AddRow => {
                let page = &mut self.data;
                let Some(d) = &mut page.dataset else { return };
                let text_rows = d.editor.rows().iter().any(|e| matches!(e, Example::Text { .. }));
                let example = if text_rows {
                    Example::Text { text: String::new() }
                } else {
                    Example::Chat {
                        messages: vec![Message::new(Role::User, ""), Message::new(Role::Assistant, "")],
                    }
                };
                let index = d.editor.add(example);
                page.changed();
                page.selected = Some(index);
                page.scroll_to = Some(index);
            }
            Action::DeleteRow => {
                let page = &mut self.data;
                let (Some(d), Some(index)) = (&mut page.dataset, page.selected) else {
                    return;
                };
                if d.editor.delete(index).is_ok() {
                    page.status = format!("Deleted row {}", index + 1);
                    page.changed();
                }
            }
            Action::Select(index) => self.data.selected = Some(index),
            Action::ApplyDraft => {
                let page = &mut self.data;
                let (Some(d), Some(draft)) = (&mut page.dataset, &page.draft) else {
                    return;
                };
                match d.editor.edit(draft.index, draft.example.clone()) {
                    Ok(()) => {
                        page.status = format!("Changed row {}", draft.index + 1);
                        page.changed();
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        self.report("Cannot change the row", e, "Select the row again and retype the edit.");
                    }
                }
            }
            Action::DiscardDraft => self.data.draft = None,
            Action::Split => self.start_split(ctx),
            Action::BrowseSplitDir => {
                let dir = self
                    .data
                    .dataset
                    .as_ref()
                    .and_then(|d| d.path.parent().map(Path::to_path_buf));
                self.start_pick(ctx, PickPurpose::DataSplitFolder, dir.as_deref());
            }
            Action::Count => self.start_counting(ctx),
            Action::ApplyFilter(kind) => self.apply_filter(kind),
            Action::CancelTokenize => {
                self.data.tokenize_stopped = self.data.tokenizing.as_ref().map(|(key, _)| key.clone());
                self.data.cancel_tokenizing();
                self.data.status = "Stopped counting tokens; they are counted again after the next change".into();
            }
        }
    }

    /// Answers of the Data page's file dialogs.
    pub(crate) fn data_pick(&mut self, ctx: &egui::Context, purpose: PickPurpose, path: &Path) {
        match purpose {
            PickPurpose::DataSaveAs => self.save_dataset_as(ctx, path),
            PickPurpose::DataSplitFolder => self.data.split_dir_text = path.display().to_string(),
            _ => self.open_dataset(ctx, path),
        }
    }

    fn start_split(&mut self, ctx: &egui::Context) {
        let Some(d) = &self.data.dataset else { return };
        let dir_text = self.data.split_dir_text.trim();
        let dir = if dir_text.is_empty() {
            d.path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        } else {
            PathBuf::from(dir_text)
        };
        let (train_path, validation_path) = split_paths(&d.path, &dir);
        let rows = d.editor.rows().to_vec();
        let (fraction, seed) = (self.data.split_fraction, self.data.split_seed);
        let job = Job::spawn("finch-data-split", ctx, move || {
            let split = train_validation_split(rows.len(), fraction, seed).map_err(|e| format!("{e:#}"))?;
            let (train, validation) = apply_split(&rows, &split);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let (n_train, n_validation) = (train.len(), validation.len());
            DatasetEditor::new(train)
                .save_jsonl(&train_path)
                .map_err(|e| format!("{e:#}"))?;
            DatasetEditor::new(validation)
                .save_jsonl(&validation_path)
                .map_err(|e| format!("{e:#}"))?;
            Ok(SplitDone {
                train: (train_path, n_train),
                validation: (validation_path, n_validation),
            })
        });
        match job {
            Ok(job) => {
                self.data.splitting = Some(job);
                self.data.status = "Writing the split…".into();
            }
            Err(e) => self.report("Cannot split the dataset", e, "Restart Finch."),
        }
    }

    fn start_counting(&mut self, ctx: &egui::Context) {
        let page = &self.data;
        let Some(d) = &page.dataset else { return };
        let rows = d.editor.rows().to_vec();
        let revision = page.revision;
        let threshold = page.near_threshold;
        let bounds = (page.min_tokens, page.max_tokens.max(page.min_tokens));
        let lengths = page.current_lengths().map(|l| l.per_row.clone());
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
                self.data.counting = Some(job);
                self.data.status = "Counting what each filter would remove…".into();
            }
            Err(e) => self.report("Cannot run the filters", e, "Restart Finch."),
        }
    }

    /// Replaces the rows by those the filter keeps. [`DatasetEditor`] has no multi-row step, so
    /// the filtered rows become a new editor and the old one is kept for Undo.
    fn apply_filter(&mut self, kind: FilterKind) {
        let page = &mut self.data;
        let (Some(d), Some(counts)) = (&mut page.dataset, &page.counts) else {
            return;
        };
        if counts.revision != page.revision {
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
        let kept = without(d.editor.rows(), remove);
        let removed = remove.len();
        let report = LoadReport {
            path: Some(d.path.clone()),
            format: d.format,
            file_kind: d.file_kind,
            rows: kept
                .into_iter()
                .enumerate()
                .map(|(i, example)| Row { line: i + 1, example })
                .collect(),
            rejected: vec![],
            duplicates: 0,
        };
        let old = std::mem::replace(&mut d.editor, DatasetEditor::from_report(&report));
        page.before_filter.push((old, d.replaced));
        d.replaced = true;
        page.status = format!("Removed {removed} {what}; Undo brings them back");
        page.changed();
    }

    pub(crate) fn poll_data(&mut self, ctx: &egui::Context) {
        if !self.data.started {
            self.data.started = true;
            // The last dataset (or FINCH_UI_DATA) opens at start, as the last model does.
            let last = self.train.data_path.trim().to_string();
            if !last.is_empty() && Path::new(&last).is_file() {
                self.open_dataset(ctx, Path::new(&last));
            }
        }
        let mut done = None;
        if let Some((_, stream)) = &mut self.data.loading {
            for msg in stream.drain() {
                let LoadMsg::Done(result) = msg;
                done = Some(result);
            }
            if done.is_none() && stream.is_finished() {
                self.data.loading = None;
            }
        }
        if let Some(result) = done {
            let path = self.data.loading.take().map(|(p, _)| p).unwrap_or_default();
            match result {
                Ok(dataset) => self.set_dataset(*dataset),
                Err(e) => {
                    self.data.status = format!("Could not open {}", path.display());
                    self.report(
                        "Cannot open the dataset",
                        e,
                        "Pick a .jsonl, .json, .csv or .parquet file with Alpaca, ShareGPT, messages, \
                         prompt/completion or text rows.",
                    );
                }
            }
        }
        self.poll_data_model(ctx);
        self.poll_data_jobs();
        self.poll_tokenizing(ctx);
    }

    /// Follows the model open on the Models page: reads its tokenizer and template once.
    fn poll_data_model(&mut self, ctx: &egui::Context) {
        let wanted = self.models.card.as_ref().map(|c| c.path.clone());
        let page = &mut self.data;
        if let Some((path, job)) = &mut page.model_job {
            if wanted.as_ref() != Some(path) {
                page.model_job = None;
            } else if let Some(result) = job.poll() {
                let path = path.clone();
                page.model_job = None;
                match result {
                    Ok(model) => page.model = Some(model),
                    Err(e) => {
                        page.model_failed = Some(path);
                        self.report(
                            "Cannot read the model's tokenizer for the Data page",
                            e,
                            "Open another model on the Models page.",
                        );
                    }
                }
                return;
            }
        }
        let page = &mut self.data;
        match &wanted {
            None => {
                if page.model.is_some() {
                    page.model = None;
                    page.inspected = None;
                    page.cancel_tokenizing();
                }
            }
            Some(path) => {
                let have = page.model.as_ref().is_some_and(|m| &m.path == path);
                let busy = page.model_job.as_ref().is_some_and(|(p, _)| p == path);
                if !have && !busy && page.model_failed.as_ref() != Some(path) {
                    let owned = path.clone();
                    match Job::spawn("finch-data-tokenizer", ctx, move || open_data_model(&owned)) {
                        Ok(job) => page.model_job = Some((path.clone(), job)),
                        Err(e) => self.report("Cannot read the model's tokenizer", e, "Restart Finch."),
                    }
                }
            }
        }
    }

    fn poll_data_jobs(&mut self) {
        let page = &mut self.data;
        if let Some(job) = &mut page.saving {
            if let Some(result) = job.poll() {
                page.saving = None;
                match result {
                    Ok(saved) => {
                        page.status = format!("Saved {} rows to {}", saved.rows, saved.path.display());
                        if let Some(d) = &mut page.dataset {
                            d.path = saved.path.clone();
                            d.file_kind = FileKind::Jsonl;
                            if saved.revision == page.revision {
                                // Same rows as when the save started: take the editor that knows it is saved.
                                d.editor = saved.editor;
                                d.replaced = false;
                            }
                        }
                        page.path_text = saved.path.display().to_string();
                        self.set_data_path(&saved.path);
                    }
                    Err(e) => {
                        page.status = "Not saved".into();
                        self.report(
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
        if let Some(job) = &mut page.splitting {
            if let Some(result) = job.poll() {
                page.splitting = None;
                match result {
                    Ok(done) => {
                        page.status = format!(
                            "Wrote {} training rows to {} and {} validation rows to {}",
                            done.train.1,
                            done.train.0.display(),
                            done.validation.1,
                            done.validation.0.display()
                        );
                    }
                    Err(e) => {
                        page.status = "Split not written".into();
                        self.report(
                            "Cannot write the split",
                            e,
                            "Choose a writable folder and a validation share below 1.",
                        );
                    }
                }
                return;
            }
        }
        if let Some(job) = &mut page.counting {
            if let Some(result) = job.poll() {
                page.counting = None;
                match result {
                    Ok(counts) => {
                        page.status = format!(
                            "Filters would remove: {} exact duplicates, {} near-duplicates{}",
                            counts.exact.len(),
                            counts.near.len(),
                            counts
                                .length
                                .as_ref()
                                .map(|l| format!(", {} rows outside the token bounds", l.len()))
                                .unwrap_or_default()
                        );
                        page.counts = Some(counts);
                    }
                    Err(e) => self.report(
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
    fn poll_tokenizing(&mut self, ctx: &egui::Context) {
        let loss_on = self.settings.train.loss_on;
        let page = &mut self.data;
        if let Some((_, stream)) = &mut page.tokenizing {
            let mut finished = None;
            for msg in stream.drain() {
                match msg {
                    TokenizeMsg::Progress { done, total } => page.tokenize_progress = (done, total),
                    TokenizeMsg::Done(lengths) => finished = Some(lengths),
                }
            }
            let ended = stream.is_finished();
            if let Some(lengths) = finished {
                page.lengths = Some(lengths);
                page.tokenizing = None;
            } else if ended {
                page.tokenizing = None;
            }
        }
        let (Some(model), Some(d)) = (&page.model, &page.dataset) else {
            return;
        };
        let key = (page.revision, model.path.clone());
        let up_to_date = page
            .lengths
            .as_ref()
            .is_some_and(|l| l.revision == key.0 && l.model == key.1);
        let running_for_key = page.tokenizing.as_ref().is_some_and(|(k, _)| *k == key);
        // A count stopped by the user is not restarted until the rows or the model change.
        let stopped_by_user = page.tokenize_stopped.as_ref() == Some(&key);
        if up_to_date || running_for_key || stopped_by_user {
            return;
        }
        let rows = d.editor.rows().to_vec();
        let total_rows = rows.len();
        let tokenizer = model.tokenizer.clone();
        let template = model.template.clone();
        let thread_key = key.clone();
        page.cancel_tokenizing();
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
                page.tokenize_progress = (0, total_rows);
                page.tokenizing = Some((key, stream));
            }
            Err(e) => self.report("Cannot count tokens", e, "Restart Finch."),
        }
    }

    pub(crate) fn data_page_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        let mut actions = vec![];
        ui.heading("Data");
        ui.add_space(6.0);
        self.data_file_ui(ui, &mut actions);

        if self.data.dataset.is_some() {
            // Ctrl+Z / Ctrl+Shift+Z (or Ctrl+Y) when no text field has focus: a focused text
            // field keeps its own undo.
            if ui.memory(|m| m.focused().is_none()) {
                let redo = ui.input_mut(|i| {
                    i.consume_shortcut(&egui::KeyboardShortcut::new(
                        egui::Modifiers::COMMAND | egui::Modifiers::SHIFT,
                        egui::Key::Z,
                    )) || i.consume_shortcut(&egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Y))
                });
                let undo = ui.input_mut(|i| {
                    i.consume_shortcut(&egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Z))
                });
                if redo {
                    actions.push(Action::Redo);
                } else if undo {
                    actions.push(Action::Undo);
                }
            }
            self.data_toolbar_ui(ui, &mut actions);
            ui.add_space(6.0);
            ui.columns(2, |cols| {
                self.data_table_ui(&mut cols[0], &mut actions);
                self.data_row_editor_ui(&mut cols[1], &mut actions);
            });
            self.data_problems_ui(ui);
            ui.add_space(10.0);
            self.data_tokens_ui(ui, &mut actions);
            ui.add_space(10.0);
            self.data_inspector_ui(ui);
            ui.add_space(10.0);
            self.data_split_ui(ui, &mut actions);
            ui.add_space(10.0);
            self.data_filters_ui(ui, &mut actions);
        }
        if !self.data.status.is_empty() {
            ui.add_space(8.0);
            ui.label(egui::RichText::new(&self.data.status).italics());
        }
        for action in actions {
            self.apply_data_action(&ctx, action);
        }
    }

    fn data_file_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let page = &mut self.data;
        ui.group(|ui| {
            egui::Grid::new("data-file")
                .num_columns(2)
                .spacing([12.0, 8.0])
                .show(ui, |ui| {
                    let label = ui.label("Dataset file").on_hover_text(
                        "A .jsonl, .json, .csv or .parquet file with Alpaca, ShareGPT, OpenAI messages, \
                         prompt/completion or text rows.",
                    );
                    ui.horizontal(|ui| {
                        let edit = ui.add(
                            egui::TextEdit::singleline(&mut page.path_text)
                                .hint_text("path to a dataset file")
                                .desired_width(420.0),
                        );
                        let edit = edit.labelled_by(label.id);
                        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                        if ui.button("Browse…").on_hover_text("Pick a dataset file.").clicked() {
                            actions.push(Action::BrowseOpen);
                        }
                        let path = page.path_text.trim().to_string();
                        if (ui
                            .add_enabled(!path.is_empty(), egui::Button::new("Open dataset"))
                            .clicked()
                            || enter)
                            && !path.is_empty()
                        {
                            actions.push(Action::Open(PathBuf::from(path)));
                        }
                    });
                    ui.end_row();
                    if let Some(dir) = demo_datasets_dir() {
                        ui.label("Demo datasets")
                            .on_hover_text("Small datasets bundled with Finch that a 135M model learns in minutes.");
                        ui.horizontal(|ui| {
                            for (name, about) in DEMO_DATASETS {
                                let file = dir.join(name).join("train.jsonl");
                                if file.is_file() && ui.button(name).on_hover_text(about).clicked() {
                                    actions.push(Action::Open(file));
                                }
                            }
                        });
                        ui.end_row();
                    }
                });
            if let Some((path, _)) = &page.loading {
                ui.horizontal(|ui| {
                    ui.spinner();
                    let secs = page.load_started.map_or(0.0, |t| t.elapsed().as_secs_f32());
                    ui.label(format!("Reading and checking {} ({secs:.0} s)…", path.display()));
                    if ui
                        .button("Cancel")
                        .on_hover_text("Stop reading this file; the dataset on screen stays.")
                        .clicked()
                    {
                        actions.push(Action::CancelLoad);
                    }
                });
            }
        });
    }

    fn data_toolbar_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let page = &mut self.data;
        let Some(d) = &page.dataset else { return };
        ui.horizontal_wrapped(|ui| {
            let unsaved = if d.has_unsaved_changes() {
                " · unsaved changes"
            } else {
                ""
            };
            ui.label(
                egui::RichText::new(format!(
                    "{} rows · {} · {} · {} rejected{unsaved}",
                    format_count(d.editor.len() as u64),
                    d.format.name(),
                    d.file_kind.name(),
                    d.rejected.len()
                ))
                .strong(),
            );
            if ui
                .button("Use for training")
                .on_hover_text("Make this file the Train page's data file.")
                .clicked()
            {
                actions.push(Action::UseForTraining);
            }
        });
        let (can_undo, can_redo) = (page.can_undo(), page.can_redo());
        ui.horizontal_wrapped(|ui| {
            let saving = page.saving.is_some();
            let save_label = ui
                .label("Save to")
                .on_hover_text("Where Save writes the rows, as JSONL (OpenAI messages or text records).");
            ui.add(egui::TextEdit::singleline(&mut page.save_text).desired_width(320.0))
                .labelled_by(save_label.id);
            let save_path = page.save_text.trim().to_string();
            let mut save_tip =
                "Write every row to this file atomically (the old file stays intact if it fails).".to_string();
            if !d.rejected.is_empty() && Path::new(&save_path) == d.path {
                save_tip.push_str(&format!(
                    " The {} rejected records are not rows and are not written.",
                    d.rejected.len()
                ));
            }
            if ui
                .add_enabled(!saving && !save_path.is_empty(), egui::Button::new("Save"))
                .on_hover_text(save_tip)
                .clicked()
            {
                actions.push(Action::Save(PathBuf::from(save_path)));
            }
            if ui
                .add_enabled(!saving, egui::Button::new("Save as…"))
                .on_hover_text("Pick a new file to write the rows to.")
                .clicked()
            {
                actions.push(Action::SaveAsDialog);
            }
            if saving {
                ui.spinner();
            }
            ui.separator();
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo"))
                .on_hover_text("Revert the last change (Ctrl+Z).")
                .clicked()
            {
                actions.push(Action::Undo);
            }
            if ui
                .add_enabled(can_redo, egui::Button::new("Redo"))
                .on_hover_text("Re-apply the last undone change (Ctrl+Shift+Z).")
                .clicked()
            {
                actions.push(Action::Redo);
            }
            ui.separator();
            if ui
                .button("Add row")
                .on_hover_text("Append an empty row and edit it on the right.")
                .clicked()
            {
                actions.push(Action::AddRow);
            }
            if ui
                .add_enabled(page.selected.is_some(), egui::Button::new("Delete row"))
                .on_hover_text("Delete the selected row.")
                .clicked()
            {
                actions.push(Action::DeleteRow);
            }
            ui.separator();
            let goto_label = ui.label("Go to row");
            let n = d.editor.len().max(1);
            let goto = ui
                .add(egui::DragValue::new(&mut page.goto_row).range(1..=n))
                .on_hover_text("Scroll the table to this row and select it.")
                .labelled_by(goto_label.id);
            if goto.changed() {
                let index = page.goto_row.clamp(1, n) - 1;
                page.scroll_to = Some(index);
                actions.push(Action::Select(index));
            }
        });
    }

    fn data_table_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let page = &mut self.data;
        let Some(d) = &page.dataset else { return };
        if page.previews_revision != page.revision {
            page.previews.clear();
            page.previews_revision = page.revision;
        }
        let lengths = page
            .lengths
            .as_ref()
            .filter(|l| l.revision == page.revision)
            .map(|l| &l.per_row);
        let row_height = ui
            .text_style_height(&egui::TextStyle::Body)
            .max(ui.spacing().interact_size.y);
        ui.horizontal(|ui| {
            for (head, width) in [("#", 56.0), ("Prompt", 240.0), ("Answer", 200.0)] {
                ui.add_sized(
                    [width, row_height],
                    egui::Label::new(egui::RichText::new(head).strong()),
                );
            }
            if lengths.is_some() {
                ui.label(egui::RichText::new("Tokens").strong());
            }
        });
        let mut area = egui::ScrollArea::vertical()
            .id_salt("data-table")
            .max_height(TABLE_HEIGHT)
            .auto_shrink([false, true]);
        if let Some(index) = page.scroll_to.take() {
            let spacing = ui.spacing().item_spacing.y;
            area = area.vertical_scroll_offset(index as f32 * (row_height + spacing));
        }
        let rows = d.editor.rows();
        let previews = &mut page.previews;
        let selected = page.selected;
        area.show_rows(ui, row_height, rows.len(), |ui, range| {
            for i in range {
                let (prompt, answer) = previews.entry(i).or_insert_with(|| preview(&rows[i]));
                ui.horizontal(|ui| {
                    let number = ui.add_sized(
                        [56.0, row_height],
                        egui::Button::selectable(selected == Some(i), (i + 1).to_string()),
                    );
                    let prompt_cell = ui.add_sized(
                        [240.0, row_height],
                        egui::Label::new(prompt.as_str()).truncate().sense(egui::Sense::click()),
                    );
                    let answer_cell = ui.add_sized(
                        [200.0, row_height],
                        egui::Label::new(answer.as_str()).truncate().sense(egui::Sense::click()),
                    );
                    if let Some(n) = lengths.and_then(|l| l.get(i).copied().flatten()) {
                        ui.label(n.to_string());
                    }
                    if number.clicked() || prompt_cell.clicked() || answer_cell.clicked() {
                        actions.push(Action::Select(i));
                    }
                });
            }
        });
        if d.editor.is_empty() {
            ui.label(egui::RichText::new("No rows: add one with Add row.").weak());
        }
    }

    fn data_row_editor_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let page = &mut self.data;
        let Some(d) = &page.dataset else { return };
        let Some(index) = page.selected.filter(|&i| i < d.editor.len()) else {
            ui.label(egui::RichText::new("Select a row to edit it.").weak());
            return;
        };
        let fresh = page
            .draft
            .as_ref()
            .is_some_and(|dr| dr.index == index && dr.revision == page.revision);
        if !fresh {
            page.draft = Some(Draft {
                index,
                revision: page.revision,
                example: d.editor.rows()[index].clone(),
            });
        }
        let Some(draft) = &mut page.draft else { return };
        let changed = draft.example != d.editor.rows()[index];
        ui.label(egui::RichText::new(format!("Row {}", index + 1)).strong());
        egui::ScrollArea::vertical()
            .id_salt("data-row-editor")
            .max_height(TABLE_HEIGHT - 40.0)
            .show(ui, |ui| match &mut draft.example {
                Example::Text { text } => {
                    let label = ui
                        .label("Text")
                        .on_hover_text("The raw text; every token of it is trained.");
                    ui.add(
                        egui::TextEdit::multiline(text)
                            .desired_rows(6)
                            .desired_width(f32::INFINITY),
                    )
                    .labelled_by(label.id);
                }
                Example::Chat { messages } => {
                    let mut remove = None;
                    for (m, message) in messages.iter_mut().enumerate() {
                        let role = match message.role {
                            Role::System => "System",
                            Role::User => "User",
                            Role::Assistant => "Assistant",
                        };
                        let label_id = ui
                            .horizontal(|ui| {
                                let label = ui.label(egui::RichText::new(role).strong());
                                if ui
                                    .small_button("Remove")
                                    .on_hover_text("Remove this message from the row.")
                                    .clicked()
                                {
                                    remove = Some(m);
                                }
                                label.id
                            })
                            .inner;
                        ui.add(
                            egui::TextEdit::multiline(&mut message.content)
                                .desired_rows(2)
                                .desired_width(f32::INFINITY),
                        )
                        .labelled_by(label_id);
                    }
                    if let Some(m) = remove {
                        messages.remove(m);
                    }
                    ui.horizontal(|ui| {
                        if ui
                            .small_button("Add user message")
                            .on_hover_text("Append a user turn.")
                            .clicked()
                        {
                            messages.push(Message::new(Role::User, ""));
                        }
                        if ui
                            .small_button("Add assistant message")
                            .on_hover_text("Append an assistant turn (trained by default).")
                            .clicked()
                        {
                            messages.push(Message::new(Role::Assistant, ""));
                        }
                    });
                }
            });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(changed, egui::Button::new("Apply edit"))
                .on_hover_text("Write the changes into the row (undoable).")
                .clicked()
            {
                actions.push(Action::ApplyDraft);
            }
            if ui
                .add_enabled(changed, egui::Button::new("Discard edit"))
                .on_hover_text("Forget the changes typed since the last Apply.")
                .clicked()
            {
                actions.push(Action::DiscardDraft);
            }
        });
    }

    fn data_problems_ui(&mut self, ui: &mut egui::Ui) {
        let page = &mut self.data;
        let Some(d) = &page.dataset else { return };
        if page.problems_revision != page.revision {
            page.problems = d.editor.problems();
            page.problems_revision = page.revision;
        }
        if !page.problems.is_empty() {
            ui.label(
                egui::RichText::new(format!(
                    "{} rows would be rejected when this file is loaded for training:",
                    page.problems.len()
                ))
                .color(ui.visuals().warn_fg_color),
            );
            list_ui(ui, "data-problems", &page.problems, |r| {
                describe_rejection(r).replacen("line", "row", 1)
            });
        }
        let rejected = &d.rejected;
        egui::CollapsingHeader::new(format!("Rejected records ({})", rejected.len()))
            .id_salt("data-rejected")
            .default_open(!rejected.is_empty())
            .show(ui, |ui| {
                if rejected.is_empty() {
                    ui.label("Every record in the file was loaded.");
                } else {
                    ui.label("These records of the file were skipped; fix them in the file and open it again.");
                    list_ui(ui, "data-rejected-list", rejected, describe_rejection);
                }
            });
    }

    fn data_tokens_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.heading("Token lengths");
        let seq_len = self.settings.train.seq_len;
        let page = &self.data;
        if page.model.is_none() {
            let text = if page.model_job.is_some() {
                "Reading the model's tokenizer…"
            } else {
                "Open a model to see token lengths (Models page)."
            };
            ui.label(egui::RichText::new(text).weak());
            return;
        }
        if let Some(model) = &page.model {
            if let Some(note) = &model.note {
                ui.label(egui::RichText::new(note).color(ui.visuals().warn_fg_color));
            }
        }
        if page.tokenizing.is_some() {
            ui.horizontal(|ui| {
                let (done, total) = page.tokenize_progress;
                ui.add(
                    egui::ProgressBar::new(if total > 0 { done as f32 / total as f32 } else { 0.0 })
                        .desired_width(240.0)
                        .text(format!("tokenizing {done} / {total} rows")),
                );
                if ui
                    .button("Stop counting")
                    .on_hover_text("Stop tokenizing; the histogram waits for the next change.")
                    .clicked()
                {
                    actions.push(Action::CancelTokenize);
                }
            });
        }
        let Some(lengths) = page.current_lengths() else {
            return;
        };
        let over = lengths.per_row.iter().flatten().filter(|&&n| n > seq_len).count();
        ui.horizontal_wrapped(|ui| {
            if let Some(s) = lengths.stats {
                ui.label(format!(
                    "min {} · median {} · p95 {} · max {} tokens",
                    s.min, s.median, s.p95, s.max
                ));
            }
            let text = format!("{over} rows longer than seq_len = {seq_len} would be truncated");
            if over > 0 {
                ui.label(egui::RichText::new(text).color(ui.visuals().warn_fg_color));
            } else {
                ui.label(text);
            }
        })
        .response
        .on_hover_text("seq_len is set on the Train page.");
        if lengths.encode_errors > 0 {
            ui.label(
                egui::RichText::new(format!(
                    "{} rows cannot be encoded with this template (first: {})",
                    lengths.encode_errors,
                    lengths.first_error.as_deref().unwrap_or("")
                ))
                .color(ui.visuals().error_fg_color),
            );
        }
        let bars: Vec<Bar> = lengths
            .bars
            .iter()
            .map(|b| Bar::new(b[0], b[1]).width(lengths.bin_width * 0.95))
            .collect();
        Plot::new("data-token-histogram")
            .height(200.0)
            .legend(Legend::default())
            .x_axis_label("tokens per row")
            .y_axis_label("rows")
            .allow_scroll(false)
            .show(ui, |plot| {
                plot.bar_chart(BarChart::new("rows", bars));
                plot.vline(VLine::new(format!("seq_len = {seq_len}"), seq_len as f64).width(2.0));
            });
    }

    fn data_inspector_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Template and loss mask");
        let seq_len = self.settings.train.seq_len;
        let loss_on = self.settings.train.loss_on;
        let page = &mut self.data;
        let Some(model) = &page.model else {
            ui.label(egui::RichText::new("Open a model to see a row rendered with its chat template.").weak());
            return;
        };
        let Some(index) = page.selected.filter(|&i| i < page.rows().len()) else {
            ui.label(egui::RichText::new("Select a row to see it as the model sees it.").weak());
            return;
        };
        let key = (index, page.revision, model.path.clone(), seq_len, loss_on);
        if page.inspected.as_ref().map(|i| &i.key) != Some(&key) {
            // One row: fast enough for the UI thread (a render and a tokenization).
            let rows = page.dataset.as_ref().map_or(&[][..], |d| d.editor.rows());
            let ex = &rows[index];
            let end_of_turn = model.template.end_of_turn();
            let encoded = encode_example(ex, &model.template, &model.tokenizer, loss_on, seq_len);
            let result = loss_segments(ex, &model.template, Some(&model.tokenizer), loss_on, seq_len)
                .map(|segments| split_end_of_turn(&segments, end_of_turn.as_deref()))
                .map_err(|e| format!("{e:#}"));
            let (tokens, trained_tokens, truncated) = encoded
                .as_ref()
                .map_or((0, 0, false), |t| (t.len(), t.trained_tokens(), t.truncated));
            page.inspected = Some(Inspected {
                key,
                result,
                end_of_turn,
                tokens,
                trained_tokens,
                truncated,
            });
        }
        let Some(inspected) = &page.inspected else { return };
        let trained_color = egui::Color32::from_rgb(40, 160, 80);
        let masked_color = ui.visuals().weak_text_color();
        let eot_fill = egui::Color32::from_rgb(200, 120, 20);
        ui.horizontal_wrapped(|ui| {
            ui.label(format!("Row {}:", index + 1));
            ui.label(egui::RichText::new("trained").color(trained_color).strong())
                .on_hover_text("Tokens the model learns to predict (the loss is computed on them).");
            ui.label(egui::RichText::new("masked").color(masked_color).strikethrough())
                .on_hover_text("Context tokens the model reads but is not trained to produce.");
            ui.label(
                egui::RichText::new("end of turn")
                    .background_color(eot_fill)
                    .color(egui::Color32::WHITE),
            )
            .on_hover_text(match &inspected.end_of_turn {
                Some(m) => {
                    format!("The template's end-of-turn marker `{m}`: trained, so the tuned model learns to stop.")
                }
                None => "This template writes no end-of-turn marker, so a tuned model will not learn to stop.".into(),
            });
            ui.label(
                egui::RichText::new(format!(
                    "· {} tokens, {} trained{}",
                    inspected.tokens,
                    inspected.trained_tokens,
                    if inspected.truncated {
                        format!(", cut at seq_len = {seq_len}")
                    } else {
                        String::new()
                    }
                ))
                .weak(),
            );
        });
        match &inspected.result {
            Err(e) => {
                ui.label(
                    egui::RichText::new(format!("This row cannot be rendered: {e}")).color(ui.visuals().error_fg_color),
                );
            }
            Ok(pieces) => {
                let mut job = egui::text::LayoutJob::default();
                let font = egui::TextStyle::Monospace.resolve(ui.style());
                for piece in pieces {
                    let mut format = egui::TextFormat::simple(font.clone(), masked_color);
                    if piece.end_of_turn {
                        format.background = eot_fill;
                        format.color = egui::Color32::WHITE;
                        if !piece.trained {
                            // A masked marker (the end of a user turn) keeps the marker colour but is struck through.
                            format.strikethrough = egui::Stroke::new(1.0, egui::Color32::WHITE);
                        }
                    } else if piece.trained {
                        format.color = trained_color;
                    } else {
                        format.strikethrough = egui::Stroke::new(0.5, masked_color);
                    }
                    job.append(&piece.text, 0.0, format);
                }
                job.wrap.max_width = ui.available_width();
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.label(job);
                });
            }
        }
    }

    fn data_split_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.heading("Train / validation split");
        let page = &mut self.data;
        let Some(d) = &page.dataset else { return };
        egui::Grid::new("data-split")
            .num_columns(2)
            .spacing([12.0, 8.0])
            .show(ui, |ui| {
                super::widgets::knob_row(
                    ui,
                    "Validation share",
                    "Part of the rows written to the validation file, for measuring the loss on unseen examples.",
                    |ui| ui.add(egui::Slider::new(&mut page.split_fraction, 0.0..=0.5).fixed_decimals(2)),
                );
                super::widgets::knob_row(
                    ui,
                    "Split seed",
                    "The same seed and share always pick the same validation rows.",
                    |ui| ui.add(egui::DragValue::new(&mut page.split_seed)),
                );
                let label = ui
                    .label("Split folder")
                    .on_hover_text("Where the two files are written; empty means next to the dataset file.");
                ui.horizontal(|ui| {
                    let hint = d.path.parent().map(|p| p.display().to_string()).unwrap_or_default();
                    ui.add(
                        egui::TextEdit::singleline(&mut page.split_dir_text)
                            .hint_text(hint)
                            .desired_width(320.0),
                    )
                    .labelled_by(label.id);
                    if ui.button("Choose…").on_hover_text("Pick the folder.").clicked() {
                        actions.push(Action::BrowseSplitDir);
                    }
                });
                ui.end_row();
            });
        let (train, validation) = split_paths(
            &d.path,
            Path::new(if page.split_dir_text.trim().is_empty() {
                "…"
            } else {
                page.split_dir_text.trim()
            }),
        );
        let names = format!(
            "{} and {}",
            train.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            validation.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        );
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    page.splitting.is_none() && !d.editor.is_empty(),
                    egui::Button::new("Write split"),
                )
                .on_hover_text(format!("Write the rows as {names}."))
                .clicked()
            {
                actions.push(Action::Split);
            }
            if page.splitting.is_some() {
                ui.spinner();
            }
        });
    }

    fn data_filters_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.heading("Quality filters");
        let has_lengths = self.data.current_lengths().is_some();
        let model_open = self.data.model.is_some();
        let page = &mut self.data;
        let counts = page.counts.as_ref().filter(|c| c.revision == page.revision);
        egui::Grid::new("data-filters")
            .num_columns(3)
            .spacing([12.0, 8.0])
            .show(ui, |ui| {
                ui.label("Exact duplicates")
                    .on_hover_text("Rows equal to an earlier row after ignoring case, punctuation and spacing.");
                ui.label("");
                filter_result_ui(ui, counts.map(|c| &c.exact), FilterKind::Exact, actions);
                ui.end_row();

                let label = ui.label("Near duplicates").on_hover_text(
                    "Rows whose word 3-grams overlap an earlier row's by at least the threshold (MinHash estimate); \
                     exact duplicates included.",
                );
                ui.add(egui::Slider::new(&mut page.near_threshold, 0.5..=1.0).fixed_decimals(2))
                    .on_hover_text("Similarity from which a row counts as a near-duplicate.")
                    .labelled_by(label.id);
                let stale = counts.is_some_and(|c| c.near_threshold != page.near_threshold);
                filter_result_ui(
                    ui,
                    counts.filter(|_| !stale).map(|c| &c.near),
                    FilterKind::Near,
                    actions,
                );
                ui.end_row();

                if has_lengths {
                    let label = ui
                        .label("Token length")
                        .on_hover_text("Remove rows with fewer or more tokens than these bounds.");
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::DragValue::new(&mut page.min_tokens)
                                .range(0..=1_000_000)
                                .prefix("min "),
                        )
                        .labelled_by(label.id);
                        ui.add(
                            egui::DragValue::new(&mut page.max_tokens)
                                .range(1..=1_000_000)
                                .prefix("max "),
                        );
                    });
                    let bounds = (page.min_tokens, page.max_tokens.max(page.min_tokens));
                    let stale = counts.is_some_and(|c| c.length_bounds != bounds);
                    filter_result_ui(
                        ui,
                        counts.filter(|_| !stale).and_then(|c| c.length.as_ref()),
                        FilterKind::Length,
                        actions,
                    );
                    ui.end_row();
                }
            });
        if !has_lengths {
            let text = if model_open {
                "The token-length filter appears once the tokens are counted."
            } else {
                "Open a model to filter by token length."
            };
            ui.label(egui::RichText::new(text).weak());
        }
        ui.horizontal(|ui| {
            if ui
                .add_enabled(page.counting.is_none(), egui::Button::new("Count rows to remove"))
                .on_hover_text("Run every filter and show how many rows each would remove; nothing is removed yet.")
                .clicked()
            {
                actions.push(Action::Count);
            }
            if page.counting.is_some() {
                ui.spinner();
            }
        });
    }
}

/// "removes N rows" and its Remove button, or a hint to count first.
fn filter_result_ui(ui: &mut egui::Ui, remove: Option<&Vec<usize>>, kind: FilterKind, actions: &mut Vec<Action>) {
    match remove {
        None => {
            ui.label(egui::RichText::new("not counted").weak());
        }
        Some(rows) => {
            ui.horizontal(|ui| {
                ui.label(format!("removes {} rows", rows.len()));
                let label = match kind {
                    FilterKind::Exact => "Remove exact duplicates",
                    FilterKind::Near => "Remove near duplicates",
                    FilterKind::Length => "Remove rows outside the bounds",
                };
                if !rows.is_empty()
                    && ui
                        .button(label)
                        .on_hover_text("Remove these rows from the table (Undo brings them back).")
                        .clicked()
                {
                    actions.push(Action::ApplyFilter(kind));
                }
            });
        }
    }
}

/// A list of rejections that lays out only its visible lines.
fn list_ui(ui: &mut egui::Ui, id: &str, items: &[Rejection], text: impl Fn(&Rejection) -> String) {
    let row_height = ui.text_style_height(&egui::TextStyle::Body);
    egui::ScrollArea::vertical()
        .id_salt(id)
        .max_height(LIST_HEIGHT)
        .auto_shrink([false, true])
        .show_rows(ui, row_height, items.len(), |ui, range| {
            for r in &items[range] {
                ui.label(text(r));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::inspect::Segment;

    #[test]
    fn end_of_turn_is_cut_out_of_segments_without_losing_text() {
        let segments = vec![
            Segment {
                text: "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".into(),
                trained: false,
            },
            Segment {
                text: "Hello!<|im_end|>".into(),
                trained: true,
            },
        ];
        let pieces = split_end_of_turn(&segments, Some("<|im_end|>"));
        let joined: String = pieces.iter().map(|p| p.text.as_str()).collect();
        let original: String = segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(joined, original);
        let eot: Vec<bool> = pieces.iter().filter(|p| p.end_of_turn).map(|p| p.trained).collect();
        assert_eq!(
            eot,
            vec![false, true],
            "the user turn's marker is masked, the answer's trained"
        );
        assert_eq!(
            pieces.last(),
            Some(&InspectorPiece {
                text: "<|im_end|>".into(),
                trained: true,
                end_of_turn: true
            })
        );
        assert_eq!(split_end_of_turn(&segments, None).len(), 2);
    }

    #[test]
    fn histogram_counts_every_length_once() {
        let lengths = [1, 5, 5, 39, 40, 79, 80];
        let (bars, width) = histogram(&lengths, 40);
        assert_eq!(width, 3.0, "81 possible lengths over 40 bins");
        let total: f64 = bars.iter().map(|b| b[1]).sum();
        assert_eq!(total, lengths.len() as f64);
        // 5 and 5 share the bin [3, 6) centred at 4.5.
        assert!(bars.contains(&[4.5, 2.0]));
        assert!(histogram(&[], 40).0.is_empty());
        assert_eq!(histogram(&[0, 0], 40), (vec![[0.5, 2.0]], 1.0));
    }

    #[test]
    fn previews_are_one_line_and_bounded() {
        let ex = Example::Chat {
            messages: vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "line one\nline two"),
                Message::new(Role::Assistant, "x".repeat(500)),
            ],
        };
        let (prompt, answer) = preview(&ex);
        assert_eq!(prompt, "line one ¶ line two");
        assert_eq!(answer.chars().count(), PREVIEW_CHARS + 1);
        assert!(answer.ends_with('…'));
    }

    #[test]
    fn removing_rows_keeps_order_and_split_paths_name_the_stem() {
        let rows: Vec<Example> = (0..5).map(|i| Example::Text { text: i.to_string() }).collect();
        let kept = without(&rows, &[3, 1]);
        assert_eq!(kept, vec![rows[0].clone(), rows[2].clone(), rows[4].clone()]);
        let (train, val) = split_paths(Path::new("/d/sums.jsonl"), Path::new("/out"));
        assert_eq!(train, Path::new("/out/sums.train.jsonl"));
        assert_eq!(val, Path::new("/out/sums.val.jsonl"));
    }

    #[test]
    fn bundled_demo_datasets_are_found() {
        let dir = demo_datasets_dir().expect("assets/datasets next to the source tree");
        for (name, _) in DEMO_DATASETS {
            assert!(dir.join(name).join("train.jsonl").is_file(), "{name}");
        }
    }
}
