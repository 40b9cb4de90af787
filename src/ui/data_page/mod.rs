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

//!
//! `state.rs` holds the jobs, their polling and the actions; `view.rs` draws the page and turns
//! clicks into [`Action`]s, applied after drawing.

pub mod choose;
pub mod generate;
mod state;
mod view;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use crate::data::edit::DatasetEditor;
use crate::data::inspect::LengthStats;
use crate::data::load::{FileKind, Format, Rejection};
use crate::data::meta::RowMeta;
use crate::data::quality::NearDuplicateConfig;
use crate::data::{Example, LossOn, Role};
use crate::model::template_choice::choose_template;
use crate::template::ChatTemplate;

use super::worker::{Job, Stream};

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
    /// A dataset to open on the first frame (the last one used, or `FINCH_UI_DATA`).
    open_at_start: Option<PathBuf>,
    /// The Generate panel (rows made by the local model).
    pub generate: generate::GeneratePanel,
    /// Scores, their histograms and keeping a share by score.
    pub choose: choose::ScorePanel,
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
            open_at_start: None,
            generate: generate::GeneratePanel::default(),
            choose: choose::ScorePanel::default(),
        }
    }
}

impl DataPage {
    /// Opens `path` on the first frame, when the window can run jobs.
    pub fn open_at_start(&mut self, path: PathBuf) {
        self.open_at_start = Some(path);
    }

    /// The rows of the open dataset (empty when none is open).
    pub fn rows(&self) -> &[Example] {
        self.dataset.as_ref().map_or(&[], |d| d.editor.rows())
    }

    /// Records the loader rejected from the open file, in line order.
    pub fn rejected(&self) -> &[Rejection] {
        self.dataset.as_ref().map_or(&[], |d| &d.rejected)
    }

    /// True while the Data page reads, saves, splits, filters or tokenizes in the background.
    pub fn is_busy(&self) -> bool {
        self.loading.is_some()
            || self.saving.is_some()
            || self.splitting.is_some()
            || self.counting.is_some()
            || self.tokenizing.is_some()
            || self.model_job.is_some()
            || self.choose.is_running()
    }

    /// The Data page's status line ("Saved 24 rows to …", "Wrote … and …").
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Whether the rows differ from the file they were loaded from or last saved to.
    pub fn has_unsaved_changes(&self) -> bool {
        self.dataset.as_ref().is_some_and(Dataset::has_unsaved_changes)
    }

    /// The token lengths the histogram draws (one per encodable row), when they are up to date.
    pub fn histogram_lengths(&self) -> Option<Vec<usize>> {
        self.current_lengths()
            .map(|l| l.per_row.iter().flatten().copied().collect())
    }

    /// Each row's provenance and scores (empty when no dataset is open).
    pub fn meta(&self) -> &[RowMeta] {
        self.dataset.as_ref().map_or(&[], |d| d.editor.meta())
    }

    /// The `(bin centre, rows)` bars of a score's histogram, from the scores on the rows.
    pub fn score_bars(&mut self, kind: crate::data::quality::ScoreKind) -> Vec<[f64; 2]> {
        let Some(d) = &self.dataset else { return vec![] };
        self.choose.bars(kind, d.editor.meta(), self.revision)
    }

    /// The inspector's rendering of the selected row, when a model is open.
    pub fn inspector_pieces(&self) -> Option<&[InspectorPiece]> {
        self.inspected.as_ref()?.result.as_ref().ok().map(|p| p.as_slice())
    }

    /// Rows each quality filter would remove, once counted for the current rows.
    pub fn filter_counts(&self) -> Option<&FilterCounts> {
        self.counts.as_ref().filter(|c| c.revision == self.revision)
    }

    /// The selected row (0-based).
    pub fn selected_row(&self) -> Option<usize> {
        self.selected
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
        Example::Chat { messages, .. } => {
            let first = |role: Role| {
                messages
                    .iter()
                    .find(|m| m.role == role)
                    .map(|m| one_line(&m.content, PREVIEW_CHARS))
                    .unwrap_or_default()
            };
            let turns = messages.iter().filter(|m| m.role == Role::Assistant).count();
            // A first answer that only calls tools is previewed as its calls.
            let mut answer = match messages.iter().find(|m| m.role == Role::Assistant) {
                Some(m) if m.content.trim().is_empty() && !m.tool_calls.is_empty() => {
                    let calls: Vec<String> = m
                        .tool_calls
                        .iter()
                        .map(|c| format!("{}({})", c.name, c.arguments))
                        .collect();
                    one_line(&format!("[tool call] {}", calls.join(", ")), PREVIEW_CHARS)
                }
                _ => first(Role::Assistant),
            };
            if turns > 1 {
                answer = format!("({turns} turns) {answer}");
            }
            (first(Role::User), answer)
        }
        Example::Preference {
            prompt,
            chosen,
            rejected,
            ..
        } => {
            let text = |msgs: &[crate::data::Message], role: Role| {
                msgs.iter()
                    .rev()
                    .find(|m| m.role == role)
                    .map(|m| m.content.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let answer = format!(
                "chosen: {} | rejected: {}",
                text(chosen, Role::Assistant),
                text(rejected, Role::Assistant)
            );
            (
                one_line(&text(prompt, Role::User), PREVIEW_CHARS),
                one_line(&answer, PREVIEW_CHARS),
            )
        }
    }
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
    /// Score every row with the Models page's model.
    Score,
    StopScoring,
    /// Keep only these rows (ascending indices), with this status line.
    KeepRows(Vec<usize>, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::inspect::Segment;
    use crate::data::Message;

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
            tools: None,
        };
        let (prompt, answer) = preview(&ex);
        assert_eq!(prompt, "line one ¶ line two");
        assert_eq!(answer.chars().count(), PREVIEW_CHARS + 1);
        assert!(answer.ends_with('…'));
    }

    #[test]
    fn split_paths_name_the_stem() {
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
