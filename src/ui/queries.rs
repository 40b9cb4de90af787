//! The studio as tests (and scripts) drive it: one-line questions and actions on [`App`] that
//! hand over to the page concerned, so a test reads `app.data_rows()` without knowing how pages
//! are laid out.

use std::path::Path;

use eframe::egui;

use crate::data::load::Rejection;
use crate::data::meta::RowMeta;
use crate::data::quality::ScoreKind;
use crate::data::Example;
use crate::hub::{CachedModel, HubOptions};
use crate::train::history::{ProbeRound, RunHistory};
use crate::train::PreflightReport;

use super::app::App;
use super::chat_page::{ChatTurn, CompareRound};
use super::data_page::generate::GeneratePanel;
use super::data_page::{FilterCounts, InspectorPiece};
use super::export_page::ExportPage;
use super::models_page::ModelCard;
use super::shared::{Page, Settings, UiError};

impl App {
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.shared.settings
    }

    pub fn page(&self) -> Page {
        self.shared.settings.page
    }

    /// Errors currently shown in the banner, oldest first.
    pub fn errors(&self) -> &[UiError] {
        self.shared.errors()
    }

    /// Shows an error in the window (and nowhere else).
    pub fn report(&mut self, what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) {
        self.shared.report(what, detail, fix);
    }

    /// Uses these Hub settings instead of the environment's (`HF_ENDPOINT`, `HF_HUB_CACHE`, …).
    pub fn set_hub_options(&mut self, options: HubOptions) {
        self.shared.hub = options;
    }

    // Models page.

    /// Opens a model folder or `.gguf` file, as the file dialog would.
    pub fn open_model_path(&mut self, ctx: &egui::Context, path: &Path) {
        self.models.open(ctx, &mut self.shared, path);
    }

    /// The opened model, if any.
    pub fn model_card(&self) -> Option<&ModelCard> {
        self.shared.model.as_ref()
    }

    /// Models in the Hugging Face cache, as last listed.
    pub fn cached_models(&self) -> &[CachedModel] {
        self.models.cached()
    }

    // Data page.

    /// The rows of the open dataset (empty when none is open).
    pub fn data_rows(&self) -> &[Example] {
        self.data.rows()
    }

    /// Records the loader rejected from the open file, in line order.
    pub fn data_rejected(&self) -> &[Rejection] {
        self.data.rejected()
    }

    /// True while the Data page reads, saves, splits, filters or tokenizes in the background.
    pub fn data_is_busy(&self) -> bool {
        self.data.is_busy()
    }

    /// The Data page's status line ("Saved 24 rows to …", "Wrote … and …").
    pub fn data_status(&self) -> &str {
        self.data.status()
    }

    /// Whether the rows differ from the file they were loaded from or last saved to.
    pub fn data_has_unsaved_changes(&self) -> bool {
        self.data.has_unsaved_changes()
    }

    /// The token lengths the histogram draws (one per encodable row), when they are up to date.
    pub fn data_histogram_lengths(&self) -> Option<Vec<usize>> {
        self.data.histogram_lengths()
    }

    /// The inspector's rendering of the selected row, when a model is open.
    pub fn data_inspector_pieces(&self) -> Option<&[InspectorPiece]> {
        self.data.inspector_pieces()
    }

    /// Rows each quality filter would remove, once counted for the current rows.
    pub fn data_filter_counts(&self) -> Option<&FilterCounts> {
        self.data.filter_counts()
    }

    /// The selected row (0-based).
    pub fn data_selected_row(&self) -> Option<usize> {
        self.data.selected_row()
    }

    /// Each row's provenance and scores, as they will be saved.
    pub fn data_meta(&self) -> &[RowMeta] {
        self.data.meta()
    }

    /// The `(bin centre, rows)` bars of the Data page's histogram of a score.
    pub fn data_score_bars(&mut self, kind: ScoreKind) -> Vec<[f64; 2]> {
        self.data.score_bars(kind)
    }

    /// The Data page's Generate panel (its candidates, progress and status).
    pub fn data_generate(&self) -> &GeneratePanel {
        &self.data.generate
    }

    // Train page.

    /// Sets the training data file, as the file dialog would.
    pub fn set_data_path(&mut self, path: &Path) {
        self.train.set_data_path(&mut self.shared, path);
    }

    /// The data file field of the Train page.
    pub fn data_path(&self) -> &str {
        &self.train.data_path
    }

    /// The live curves of the run on the Train page (loss, rewards, …).
    pub fn live_curves(&self) -> &crate::ui::train_page::LiveCurves {
        &self.train.live
    }

    /// Whether the Train page found preference pairs in its data file (and so offers DPO / ORPO).
    pub fn train_data_is_preference(&self) -> bool {
        self.train.data_is_preference()
    }

    /// Starts a new run with the current settings, or resumes the run in `resume_dir`.
    pub fn start_training(&mut self, ctx: &egui::Context, resume_dir: Option<&Path>) {
        self.train.start_training(ctx, &mut self.shared, resume_dir);
    }

    /// Asks a running training to stop after the current step, as the Stop button does.
    pub fn stop_training(&mut self) {
        self.train.request_stop();
    }

    pub fn is_training(&self) -> bool {
        self.train.is_running()
    }

    /// The status line of the Train page ("Finished 10 steps in 3 s", "Saved the chart to …").
    pub fn train_status(&self) -> &str {
        self.train.status()
    }

    /// The training-loss points the live plot draws (one per optimizer step).
    pub fn live_loss_points(&self) -> &[[f64; 2]] {
        &self.train.live.loss
    }

    /// Past runs found under the runs folder.
    pub fn run_history(&self) -> &[RunHistory] {
        self.shared.runs()
    }

    /// Saves the chart to `path` (`.png` or `.svg`) on a background thread, as the Save buttons do.
    pub fn save_chart(&mut self, ctx: &egui::Context, path: &Path) {
        self.train.save_chart(ctx, &mut self.shared, path);
    }

    pub fn is_preflighting(&self) -> bool {
        self.train.is_preflighting()
    }

    /// The preflight's progress line ("Preflight: measuring step 2/5…") or its result sentence.
    pub fn preflight_status(&self) -> &str {
        self.train.preflight_status()
    }

    /// The last finished preflight's figures.
    pub fn preflight_report(&self) -> Option<&PreflightReport> {
        self.train.preflight_report.as_ref()
    }

    /// The probe answers of the run on screen, oldest first.
    pub fn probe_rounds(&self) -> &[ProbeRound] {
        self.train.probes()
    }

    /// The probe step marked on the loss plot.
    pub fn highlighted_probe_step(&self) -> Option<usize> {
        self.train.highlighted_step
    }

    // Chat page.

    /// The single-model conversation.
    pub fn chat_turns(&self) -> &[ChatTurn] {
        self.chat.turns()
    }

    /// The comparison rounds, oldest first.
    pub fn compare_rounds(&self) -> &[CompareRound] {
        self.chat.rounds()
    }

    pub fn is_generating(&self) -> bool {
        self.chat.is_generating()
    }

    /// True once the opened model is loaded for generation.
    pub fn chat_model_ready(&self) -> bool {
        self.chat.model_ready(&self.shared)
    }

    /// (votes in the file, the file) after the last saved vote.
    pub fn votes_saved(&self) -> Option<(usize, &Path)> {
        self.chat.votes_saved()
    }

    // Export page.

    /// The Export page's state.
    pub fn export_state(&self) -> &ExportPage {
        &self.export
    }

    pub fn is_exporting(&self) -> bool {
        self.export.is_running()
    }
}
