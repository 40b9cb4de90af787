//! The studio's shell: page navigation, persisted settings, the error banner, the UI scale and
//! the close-while-training question. Pages live in their own files as `impl App` blocks.

use std::path::{Path, PathBuf};

use eframe::egui;
use serde::{Deserialize, Serialize};

use crate::train::TrainConfig;

use super::chat_page::{ChatPage, ChatSettings};
use super::data_page::DataPage;
use super::export_page::ExportPage;
use super::models_page::ModelsPage;
use super::train_page::TrainPage;
use super::worker::{pick_path, Job, PickPurpose};

/// Key under which [`Settings`] live in eframe's storage.
const SETTINGS_KEY: &str = "finch-settings";

/// The pages of the studio. Only pages whose engine exists are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Page {
    Models,
    Data,
    Train,
    Chat,
    Export,
    Settings,
}

impl Page {
    pub const ALL: [Page; 6] = [
        Page::Models,
        Page::Data,
        Page::Train,
        Page::Chat,
        Page::Export,
        Page::Settings,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Page::Models => "Models",
            Page::Data => "Data",
            Page::Train => "Train",
            Page::Chat => "Chat",
            Page::Export => "Export",
            Page::Settings => "Settings",
        }
    }

    /// Parses a page name as given in `FINCH_UI_PAGE` (case-insensitive).
    pub fn parse(name: &str) -> Option<Page> {
        Page::ALL
            .into_iter()
            .find(|p| p.title().eq_ignore_ascii_case(name.trim()))
    }
}

/// What persists between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Multiplies every size in the window; 1.5–2 suits a classroom projector.
    pub ui_scale: f32,
    pub page: Page,
    /// The model last opened (folder, `.gguf` file or Hub snapshot folder).
    pub last_model: Option<String>,
    /// The training data last picked.
    pub last_data: Option<String>,
    /// The run folder last started or resumed.
    pub last_run: Option<PathBuf>,
    /// Where new runs are created and past runs are listed from.
    pub runs_dir: PathBuf,
    /// The trainer settings last used (model, data and out are filled in at start).
    pub train: TrainConfig,
    /// System prompt, sampling settings and blind mode of the Chat page.
    pub chat: ChatSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ui_scale: 1.0,
            page: Page::Models,
            last_model: None,
            last_data: None,
            last_run: None,
            runs_dir: default_runs_dir(),
            train: crate::train::presets::Preset::QuickDemo.config(),
            chat: ChatSettings::default(),
        }
    }
}

/// `~/Finch/runs`: visible in the user's file manager, unlike an application data folder.
fn default_runs_dir() -> PathBuf {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(|home| PathBuf::from(home).join("Finch").join("runs"))
        .unwrap_or_else(|| PathBuf::from("runs"))
}

/// How the window was asked to start (from the environment; see [`StartOptions::from_env`]).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub page: Option<Page>,
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    /// A run folder whose curves the Train page shows at start.
    pub run: Option<PathBuf>,
}

impl StartOptions {
    /// `FINCH_UI_PAGE` (models, data, train, chat, export, settings), `FINCH_UI_MODEL`, `FINCH_UI_DATA` and
    /// `FINCH_UI_RUN` (paths): used by `scripts/screenshots.sh` to show each page with content.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        StartOptions {
            page: var("FINCH_UI_PAGE").and_then(|p| Page::parse(&p)),
            model: var("FINCH_UI_MODEL").map(PathBuf::from),
            data: var("FINCH_UI_DATA").map(PathBuf::from),
            run: var("FINCH_UI_RUN").map(PathBuf::from),
        }
    }
}

/// An error shown in the window: what failed, the underlying message, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiError {
    pub what: String,
    pub detail: String,
    pub fix: String,
}

/// Where the close-while-training conversation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// No close was requested, or nothing needed asking.
    Idle,
    /// The user asked to close during training; the question is on screen.
    Asking,
    /// The user chose to stop; the window closes once the trainer has checkpointed.
    StopThenClose,
}

/// The studio.
pub struct App {
    pub(crate) settings: Settings,
    pub(crate) errors: Vec<UiError>,
    pub(crate) models: ModelsPage,
    pub(crate) data: DataPage,
    pub(crate) train: TrainPage,
    pub(crate) chat: ChatPage,
    pub(crate) export: ExportPage,
    picking: Option<(PickPurpose, Job<Option<PathBuf>>)>,
    closing: Closing,
    started: bool,
    start: StartOptions,
}

impl App {
    /// The window's constructor: settings from eframe's storage, then the start options.
    pub fn new(cc: &eframe::CreationContext<'_>, start: StartOptions) -> Self {
        let settings = cc
            .storage
            .and_then(|s| eframe::get_value::<Settings>(s, SETTINGS_KEY))
            .unwrap_or_default();
        Self::with_settings(settings, start)
    }

    /// An app with the given settings (tests, or a caller with its own storage).
    pub fn with_settings(settings: Settings, start: StartOptions) -> Self {
        let mut app = App {
            models: ModelsPage::default(),
            data: DataPage::default(),
            train: TrainPage::default(),
            chat: ChatPage::default(),
            export: ExportPage::default(),
            errors: Vec::new(),
            picking: None,
            closing: Closing::Idle,
            started: false,
            start,
            settings,
        };
        if let Some(page) = app.start.page {
            app.settings.page = page;
        }
        if let Some(data) = app
            .start
            .data
            .clone()
            .or_else(|| app.settings.last_data.as_ref().map(PathBuf::from))
        {
            app.train.data_path = data.display().to_string();
        }
        app
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    pub fn page(&self) -> Page {
        self.settings.page
    }

    /// Errors currently shown in the banner, oldest first.
    pub fn errors(&self) -> &[UiError] {
        &self.errors
    }

    /// Shows an error in the window (and nowhere else).
    pub fn report(&mut self, what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) {
        let error = UiError {
            what: what.into(),
            detail: detail.into(),
            fix: fix.into(),
        };
        // The same failure repeated (a button pressed twice) is shown once.
        if !self.errors.contains(&error) {
            self.errors.push(error);
        }
    }

    /// Writes the settings to eframe's storage.
    pub fn save_to(&self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }

    /// Reads settings written by [`App::save_to`].
    pub fn load_settings(storage: &dyn eframe::Storage) -> Option<Settings> {
        eframe::get_value(storage, SETTINGS_KEY)
    }

    /// Starts a native file dialog; its answer is handled in [`App::handle_pick`].
    pub(crate) fn start_pick(&mut self, ctx: &egui::Context, purpose: PickPurpose, start_dir: Option<&Path>) {
        if self.picking.is_some() {
            return;
        }
        match pick_path(ctx, purpose, start_dir) {
            Ok(job) => self.picking = Some((purpose, job)),
            Err(e) => self.report("Cannot open a file dialog", e, "Type the path into the field instead."),
        }
    }

    fn handle_pick(&mut self, ctx: &egui::Context) {
        let Some((purpose, job)) = &mut self.picking else {
            return;
        };
        let purpose = *purpose;
        let Some(answer) = job.poll() else { return };
        self.picking = None;
        let Some(path) = answer else { return };
        match purpose {
            PickPurpose::ModelFolder | PickPurpose::ModelGguf => self.open_model_path_in(ctx, &path),
            PickPurpose::DataFile => self.set_data_path(&path),
            PickPurpose::DataOpen | PickPurpose::DataSaveAs | PickPurpose::DataSplitFolder => {
                self.data_pick(ctx, purpose, &path)
            }
            PickPurpose::RunsFolder => {
                self.settings.runs_dir = path;
                self.train.history_stale = true;
            }
            PickPurpose::ChartPng | PickPurpose::ChartSvg => self.save_chart_in(ctx, &path),
            PickPurpose::ChatAdapter => self.add_chat_adapter(&path),
            PickPurpose::ExportAdapter => self.set_export_adapter(&path),
            PickPurpose::ExportFolder => self.set_export_out(&path),
        }
    }

    /// Applies the start options once, when a context exists to run jobs with.
    fn first_frame(&mut self, ctx: &egui::Context) {
        if self.started {
            return;
        }
        self.started = true;
        let model = self
            .start
            .model
            .clone()
            .or_else(|| self.settings.last_model.as_ref().map(PathBuf::from));
        if let Some(model) = model {
            // A model that moved since the last launch is not an error worth a banner.
            if model.exists() {
                self.open_model_path_in(ctx, &model);
            }
        }
        self.refresh_cached(ctx);
        self.train.history_stale = true;
        if let Some(run) = self.start.run.clone() {
            self.show_run(ctx, &run);
        }
    }

    /// The whole window. [`eframe::App::ui`] calls this; tests call it through `egui_kittest`.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.first_frame(&ctx);
        let scale = self.settings.ui_scale.clamp(0.5, 3.0);
        if (ctx.zoom_factor() - scale).abs() > 1e-3 {
            ctx.set_zoom_factor(scale);
        }
        self.handle_pick(&ctx);
        self.poll_models(&ctx);
        self.poll_data(&ctx);
        self.poll_train(&ctx);
        self.poll_chat(&ctx);
        self.poll_export();
        self.close_request_ui(&ctx);

        egui::Panel::left("finch-nav")
            .resizable(false)
            .exact_size(150.0)
            .show(ui, |ui| self.nav_ui(ui));
        if !self.errors.is_empty() {
            egui::Panel::top("finch-errors").show(ui, |ui| self.errors_ui(ui));
        }
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| match self.settings.page {
                    Page::Models => self.models_page_ui(ui),
                    Page::Data => self.data_page_ui(ui),
                    Page::Train => self.train_page_ui(ui),
                    Page::Chat => self.chat_page_ui(ui),
                    Page::Export => self.export_page_ui(ui),
                    Page::Settings => self.settings_page_ui(ui),
                });
        });
    }

    fn nav_ui(&mut self, ui: &mut egui::Ui) {
        ui.add_space(8.0);
        ui.heading("Finch");
        ui.add_space(12.0);
        for page in Page::ALL {
            let selected = self.settings.page == page;
            let button = egui::Button::selectable(selected, egui::RichText::new(page.title()).size(18.0));
            if ui.add_sized([ui.available_width(), 32.0], button).clicked() {
                self.settings.page = page;
            }
        }
        ui.add_space(16.0);
        ui.separator();
        if let Some(card) = &self.models.card {
            ui.label(egui::RichText::new("Model").small().weak());
            ui.label(&card.name);
        }
        if self.train.is_running() {
            ui.label(egui::RichText::new("Training").small().weak());
            ui.label(self.train.progress_text());
        }
    }

    fn errors_ui(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, e) in self.errors.iter().enumerate() {
            egui::Frame::new()
                .fill(ui.visuals().error_fg_color.gamma_multiply(0.15))
                .inner_margin(8.0)
                .corner_radius(4.0)
                .show(ui, |ui| {
                    ui.horizontal(|ui| {
                        ui.vertical(|ui| {
                            ui.label(egui::RichText::new(&e.what).strong().color(ui.visuals().error_fg_color));
                            ui.label(&e.detail);
                            ui.label(egui::RichText::new(format!("What to do: {}", e.fix)).italics());
                        });
                        ui.with_layout(egui::Layout::right_to_left(egui::Align::TOP), |ui| {
                            if ui.button("Dismiss").clicked() {
                                dismiss = Some(i);
                            }
                        });
                    });
                });
            ui.add_space(4.0);
        }
        if let Some(i) = dismiss {
            self.errors.remove(i);
        }
    }

    fn settings_page_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Settings");
        ui.add_space(8.0);
        egui::Grid::new("settings-grid")
            .num_columns(2)
            .spacing([16.0, 10.0])
            .show(ui, |ui| {
                ui.label("UI scale")
                    .on_hover_text("Makes every text and control larger; 1.5 or more for a classroom projector.");
                ui.horizontal(|ui| {
                    ui.add(egui::Slider::new(&mut self.settings.ui_scale, 0.75..=2.5).step_by(0.05));
                    for (label, scale) in [("Laptop", 1.0), ("Large", 1.5), ("Projector", 2.0)] {
                        if ui.button(label).clicked() {
                            self.settings.ui_scale = scale;
                        }
                    }
                });
                ui.end_row();

                ui.label("Runs folder")
                    .on_hover_text("New training runs are created here, and past runs are listed from here.");
                ui.horizontal(|ui| {
                    let mut text = self.settings.runs_dir.display().to_string();
                    if ui
                        .add(egui::TextEdit::singleline(&mut text).desired_width(360.0))
                        .changed()
                    {
                        self.settings.runs_dir = PathBuf::from(text);
                        self.train.history_stale = true;
                    }
                    if ui.button("Browse…").clicked() {
                        let dir = self.settings.runs_dir.clone();
                        self.start_pick(ui.ctx(), PickPurpose::RunsFolder, Some(&dir));
                    }
                });
                ui.end_row();

                ui.label("Hub cache")
                    .on_hover_text("Downloaded models are shared with Python's huggingface_hub through this folder.");
                ui.label(self.models.hub_options().cache_dir.display().to_string());
                ui.end_row();
            });
    }

    /// Intercepts a window close while a run trains: asks, then stops and closes after the
    /// trainer has written its checkpoint.
    fn close_request_ui(&mut self, ctx: &egui::Context) {
        if ctx.input(|i| i.viewport().close_requested())
            && self.train.is_running()
            && self.closing != Closing::StopThenClose
        {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.closing = Closing::Asking;
        }
        match self.closing {
            Closing::Idle => {}
            Closing::StopThenClose => {
                if !self.train.is_running() {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
            Closing::Asking => {
                let modal = egui::Modal::new(egui::Id::unique("finch-close-while-training")).show(ctx, |ui| {
                    ui.heading("Training is running");
                    ui.label("Closing stops the run after the current step and saves a checkpoint, so you can resume it later.");
                    ui.add_space(8.0);
                    ui.horizontal(|ui| {
                        if ui.button("Stop training and close").clicked() {
                            self.train.request_stop();
                            self.closing = Closing::StopThenClose;
                        }
                        if ui.button("Keep training").clicked() {
                            self.closing = Closing::Idle;
                        }
                    });
                });
                if modal.should_close() && self.closing == Closing::Asking {
                    self.closing = Closing::Idle;
                }
            }
        }
    }

    /// True while the close question is on screen (tests).
    pub fn is_asking_to_close(&self) -> bool {
        self.closing == Closing::Asking
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        self.save_to(storage);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // A close that bypassed the question (a signal, a session logout) still stops the run so
        // the trainer thread can checkpoint while the process winds down.
        self.train.request_stop();
        self.train.wait_for_stop(std::time::Duration::from_secs(30));
    }
}
