//! The studio's shell: owns the pages and the [`Shared`] state, draws the navigation and the
//! error banner, applies the UI scale, routes file-dialog answers to the page that asked, and asks
//! before closing while a run trains. Each page is a struct with `poll` (every frame, for its
//! background jobs) and `ui` (when it is shown); pages talk only through [`Shared`].

use std::path::PathBuf;

use eframe::egui;

use super::chat_page::ChatPage;
use super::data_page::DataPage;
use super::export_page::ExportPage;
use super::models_page::ModelsPage;
use super::settings_page::SettingsPage;
use super::shared::{Page, Settings, Shared};
use super::train_page::TrainPage;
use super::worker::{pick_path, Job, PickPurpose};

/// Key under which [`Settings`] live in eframe's storage.
const SETTINGS_KEY: &str = "finch-settings";

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
    pub(crate) shared: Shared,
    pub(crate) models: ModelsPage,
    pub(crate) data: DataPage,
    pub(crate) train: TrainPage,
    pub(crate) chat: ChatPage,
    pub(crate) export: ExportPage,
    settings_page: SettingsPage,
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
    pub fn with_settings(mut settings: Settings, start: StartOptions) -> Self {
        if let Some(page) = start.page {
            settings.page = page;
        }
        let data = start
            .data
            .clone()
            .or_else(|| settings.last_data.as_ref().map(PathBuf::from));
        let mut app = App {
            shared: Shared::new(settings),
            models: ModelsPage::default(),
            data: DataPage::default(),
            train: TrainPage::default(),
            chat: ChatPage::default(),
            export: ExportPage::default(),
            settings_page: SettingsPage,
            picking: None,
            closing: Closing::Idle,
            started: false,
            start,
        };
        if let Some(data) = data {
            app.train.data_path = data.display().to_string();
            app.data.open_at_start(data);
        }
        app
    }

    /// Writes the settings to eframe's storage.
    pub fn save_to(&self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.shared.settings);
    }

    /// Reads settings written by [`App::save_to`].
    pub fn load_settings(storage: &dyn eframe::Storage) -> Option<Settings> {
        eframe::get_value(storage, SETTINGS_KEY)
    }

    /// Starts the file dialog a page asked for; its answer is handled in [`App::handle_pick`].
    fn start_pick(&mut self, ctx: &egui::Context) {
        let Some((purpose, start_dir)) = self.shared.requests.pick.take() else {
            return;
        };
        if self.picking.is_some() {
            return;
        }
        match pick_path(ctx, purpose, start_dir.as_deref()) {
            Ok(job) => self.picking = Some((purpose, job)),
            Err(e) => self
                .shared
                .report("Cannot open a file dialog", e, "Type the path into the field instead."),
        }
    }

    /// Gives a file dialog's answer to the page that asked.
    fn handle_pick(&mut self, ctx: &egui::Context) {
        let Some((purpose, job)) = &mut self.picking else {
            return;
        };
        let purpose = *purpose;
        let Some(answer) = job.poll() else { return };
        self.picking = None;
        let Some(path) = answer else { return };
        let shared = &mut self.shared;
        match purpose {
            PickPurpose::ModelFolder | PickPurpose::ModelGguf => self.models.open(ctx, shared, &path),
            PickPurpose::DataFile => self.train.set_data_path(shared, &path),
            PickPurpose::DataOpen | PickPurpose::DataSaveAs | PickPurpose::DataSplitFolder => {
                self.data.on_pick(ctx, shared, purpose, &path)
            }
            PickPurpose::RunsFolder => {
                shared.settings.runs_dir = path;
                shared.requests.rescan_runs = true;
            }
            PickPurpose::ChartPng | PickPurpose::ChartSvg => self.train.save_chart(ctx, shared, &path),
            PickPurpose::ChatAdapter => self.chat.add_adapter(shared, &path),
            PickPurpose::ExportAdapter => self.export.set_adapter(&path),
            PickPurpose::ExportFolder => self.export.set_out(&path),
        }
    }

    /// Applies the start options once, when a context exists to run jobs with.
    fn first_frame(&mut self, ctx: &egui::Context) {
        if self.started {
            return;
        }
        self.started = true;
        let shared = &mut self.shared;
        let model = self
            .start
            .model
            .clone()
            .or_else(|| shared.settings.last_model.as_ref().map(PathBuf::from));
        if let Some(model) = model {
            // A model that moved since the last launch is not an error worth a banner.
            if model.exists() {
                self.models.open(ctx, shared, &model);
            }
        }
        self.models.refresh_cached(ctx, shared);
        shared.requests.rescan_runs = true;
        if let Some(run) = self.start.run.clone() {
            self.train.show_run(ctx, shared, &run);
        }
    }

    /// The whole window. [`eframe::App::ui`] calls this; tests call it through `egui_kittest`.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.first_frame(&ctx);
        let scale = self.shared.settings.ui_scale.clamp(0.5, 3.0);
        if (ctx.zoom_factor() - scale).abs() > 1e-3 {
            ctx.set_zoom_factor(scale);
        }
        self.handle_pick(&ctx);
        let shared = &mut self.shared;
        self.models.poll(&ctx, shared);
        self.data.poll(&ctx, shared);
        self.train.poll(&ctx, shared);
        self.chat.poll(&ctx, shared);
        self.export.poll(shared);
        self.close_request_ui(&ctx);

        egui::Panel::left("finch-nav")
            .resizable(false)
            .exact_size(150.0)
            .show(ui, |ui| self.nav_ui(ui));
        if !self.shared.errors().is_empty() {
            egui::Panel::top("finch-errors").show(ui, |ui| errors_ui(ui, &mut self.shared));
        }
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
                let shared = &mut self.shared;
                match shared.settings.page {
                    Page::Models => self.models.ui(ui, shared),
                    Page::Data => self.data.ui(ui, shared),
                    Page::Train => self.train.ui(ui, shared),
                    Page::Chat => self.chat.ui(ui, shared),
                    Page::Export => self.export.ui(ui, shared),
                    Page::Settings => self.settings_page.ui(ui, shared),
                }
            });
        });
        self.start_pick(&ctx);
    }

    fn nav_ui(&mut self, ui: &mut egui::Ui) {
        ui.add_space(8.0);
        ui.heading("Finch");
        ui.add_space(12.0);
        for page in Page::ALL {
            let selected = self.shared.settings.page == page;
            let button = egui::Button::selectable(selected, egui::RichText::new(page.title()).size(18.0));
            if ui.add_sized([ui.available_width(), 32.0], button).clicked() {
                self.shared.settings.page = page;
            }
        }
        ui.add_space(16.0);
        ui.separator();
        if let Some(card) = &self.shared.model {
            ui.label(egui::RichText::new("Model").small().weak());
            ui.label(&card.name);
        }
        if self.train.is_running() {
            ui.label(egui::RichText::new("Training").small().weak());
            ui.label(self.train.progress_text());
        }
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

/// The error banner: what failed, the detail and what to do, each with Dismiss.
fn errors_ui(ui: &mut egui::Ui, shared: &mut Shared) {
    let mut dismiss = None;
    for (i, e) in shared.errors().iter().enumerate() {
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
        shared.dismiss_error(i);
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
