//! The Models page: open a local folder or `.gguf` file, search the Hugging Face Hub, download
//! with progress and cancel, list the models already cached, and show a card for the open model.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use eframe::egui;

use crate::hub::{CachedModel, DownloadProgress, DownloadRequest, HubOptions, ModelSummary, SearchQuery, Token};
use crate::model::load::TemplateSource;

use super::shared::Shared;
use super::widgets::{format_bytes, format_count};
use super::worker::{Job, PickPurpose, Stream};

/// What the card shows about an opened model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    /// Folder or file name, for headings.
    pub name: String,
    pub path: PathBuf,
    pub family: String,
    pub parameters: usize,
    pub context_length: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// `Ok(true)` when a chat template is present and parses; `Err` carries the parse error.
    pub chat_template: Result<bool, String>,
    /// "safetensors" or "GGUF".
    pub format: &'static str,
    /// The whole configuration (shapes for the training memory estimate).
    pub config: crate::model::ModelConfig,
}

impl ModelCard {
    /// Opens the model files (config, tokenizer, template; not the weights) and summarises them.
    pub fn open(path: &Path) -> crate::Result<ModelCard> {
        let spec = path.display().to_string();
        let files = crate::hub::open_model(&spec)?;
        let chat_template = match files.chat_template() {
            Ok(t) => Ok(t.is_some()),
            Err(e) => Err(format!("{e:#}")),
        };
        let format = match files.template {
            TemplateSource::Embedded { .. } => "GGUF",
            _ if files.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) => "GGUF",
            _ => "safetensors",
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.clone());
        Ok(ModelCard {
            name: hub_name_from_snapshot(path).unwrap_or(name),
            path: path.to_path_buf(),
            family: files.config.family.name().to_string(),
            parameters: files.config.num_parameters(),
            context_length: files.config.max_position_embeddings,
            layers: files.config.num_hidden_layers,
            hidden_size: files.config.hidden_size,
            vocab_size: files.config.vocab_size,
            chat_template,
            format,
            config: files.config.clone(),
        })
    }
}

/// "~9.1 GB with the Train page's settings; ~2.6 GB with q4_1 and checkpointing".
fn training_memory_text(model: &crate::model::ModelConfig, train: &crate::train::TrainConfig) -> String {
    use crate::train::memory::{estimate, gb};
    let now = estimate(model, train);
    let small = crate::train::TrainConfig {
        precision: crate::train::Precision::Q4_1,
        checkpoint_activations: true,
        ..train.clone()
    };
    let small = estimate(model, &small);
    if (small.total_mb - now.total_mb).abs() < 1.0 {
        format!("~{} with the Train page's settings", gb(now.total_mb))
    } else {
        format!(
            "~{} with the Train page's settings; ~{} with q4_1 and checkpointing",
            gb(now.total_mb),
            gb(small.total_mb)
        )
    }
}

/// `…/models--org--name/snapshots/<commit>` → `org/name`, so cached models show their Hub id.
fn hub_name_from_snapshot(path: &Path) -> Option<String> {
    let snapshots = path.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo = snapshots.parent()?.file_name()?.to_str()?;
    Some(repo.strip_prefix("models--")?.replacen("--", "/", 1))
}

/// A running download.
struct Download {
    id: String,
    stream: Stream<Result<DownloadProgress, String>>,
    done_bytes: u64,
    total_bytes: u64,
    current_file: String,
    cancelled: bool,
}

/// State of the Models page.
#[derive(Default)]
pub struct ModelsPage {
    /// The path field: a model folder or `.gguf` file.
    pub path_text: String,
    /// The model being opened; once open, its card is [`Shared::model`].
    opening: Option<(PathBuf, Job<Result<ModelCard, String>>)>,
    search_text: String,
    include_unsupported: bool,
    searching: Option<Job<Result<Vec<ModelSummary>, String>>>,
    results: Vec<ModelSummary>,
    searched: bool,
    download: Option<Download>,
    listing: Option<Job<Result<Vec<CachedModel>, String>>>,
    cached: Vec<CachedModel>,
    /// Token for gated models; kept in memory only.
    token_text: String,
}

impl ModelsPage {
    /// The shared Hub settings, with the token typed into the page if any.
    pub fn hub_options(&self, shared: &Shared) -> HubOptions {
        let options = shared.hub.clone();
        match Token::new(self.token_text.trim()) {
            Some(token) => options.with_token(Some(token)),
            None => options,
        }
    }

    /// True while a model is being opened.
    pub fn is_opening(&self) -> bool {
        self.opening.is_some()
    }

    /// Cached models as last listed.
    pub fn cached(&self) -> &[CachedModel] {
        &self.cached
    }
}

impl ModelsPage {
    /// Opens a model folder or `.gguf` file on a background thread, as the Open button does.
    pub fn open(&mut self, ctx: &egui::Context, shared: &mut Shared, path: &Path) {
        self.path_text = path.display().to_string();
        let owned = path.to_path_buf();
        let job = Job::spawn("finch-open-model", ctx, move || {
            ModelCard::open(&owned).map_err(|e| format!("{e:#}"))
        });
        match job {
            Ok(job) => self.opening = Some((path.to_path_buf(), job)),
            Err(e) => shared.report("Cannot open the model", e, "Try again; if it persists, restart Finch."),
        }
    }

    /// Lists the models in the Hugging Face cache on a background thread.
    pub fn refresh_cached(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        if self.listing.is_some() {
            return;
        }
        let cache_dir = self.hub_options(shared).cache_dir;
        let job = Job::spawn("finch-list-cache", ctx, move || {
            crate::hub::list_cached(&cache_dir).map_err(|e| format!("{e:#}"))
        });
        match job {
            Ok(job) => self.listing = Some(job),
            Err(e) => shared.report("Cannot list cached models", e, "Restart Finch."),
        }
    }

    pub fn poll(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        if let Some((path, job)) = &mut self.opening {
            if let Some(result) = job.poll() {
                let path = path.clone();
                self.opening = None;
                match result {
                    Ok(card) => {
                        shared.settings.last_model = Some(path.display().to_string());
                        shared.model = Some(card);
                    }
                    Err(e) => shared.report(
                        format!("Cannot open the model {}", path.display()),
                        e,
                        "Pick a folder holding config.json, tokenizer.json and model.safetensors, or a .gguf file \
                         of a Llama or Qwen2 model.",
                    ),
                }
            }
        }
        if let Some(job) = &mut self.searching {
            if let Some(result) = job.poll() {
                self.searching = None;
                self.searched = true;
                match result {
                    Ok(mut results) => {
                        // Models Finch can tune come first, most downloaded first within each group.
                        results.sort_by(|a, b| b.supported.cmp(&a.supported).then(b.downloads.cmp(&a.downloads)));
                        self.results = results;
                    }
                    Err(e) => shared.report(
                        "The Hub search failed",
                        e,
                        "Check the internet connection (or HF_ENDPOINT); cached models below still work offline.",
                    ),
                }
            }
        }
        if let Some(job) = &mut self.listing {
            if let Some(result) = job.poll() {
                self.listing = None;
                match result {
                    Ok(cached) => self.cached = cached,
                    Err(e) => shared.report(
                        "Cannot list the Hugging Face cache",
                        e,
                        "Check that HF_HOME / HF_HUB_CACHE point to a readable folder.",
                    ),
                }
            }
        }
        let mut finished = None;
        if let Some(dl) = &mut self.download {
            for event in dl.stream.drain() {
                match event {
                    Ok(DownloadProgress::Planned {
                        total_bytes,
                        done_bytes,
                        ..
                    }) => {
                        dl.total_bytes = total_bytes;
                        dl.done_bytes = done_bytes;
                    }
                    Ok(DownloadProgress::FileStarted { file, .. }) => dl.current_file = file,
                    Ok(DownloadProgress::Bytes {
                        done_bytes,
                        total_bytes,
                        ..
                    }) => {
                        dl.done_bytes = done_bytes;
                        dl.total_bytes = total_bytes;
                    }
                    Ok(DownloadProgress::WaitingForLock { file, .. }) => {
                        dl.current_file = format!("{file} (waiting for another download of it)")
                    }
                    Ok(DownloadProgress::Verifying { file }) => dl.current_file = format!("{file} (verifying)"),
                    Ok(DownloadProgress::FileDone { .. }) => {}
                    Ok(DownloadProgress::Finished { snapshot, .. }) => finished = Some(Ok(snapshot)),
                    Err(e) => finished = Some(Err((dl.id.clone(), e, dl.cancelled))),
                }
            }
            if dl.stream.is_finished() && finished.is_none() {
                finished = Some(Err((dl.id.clone(), "the download stopped".into(), dl.cancelled)));
            }
        }
        if let Some(outcome) = finished {
            self.download = None;
            match outcome {
                Ok(snapshot) => self.open(ctx, shared, &snapshot),
                Err((_, _, true)) => {}
                Err((id, e, false)) => shared.report(
                    format!("Downloading {id} failed"),
                    e,
                    "Check the connection and the free disk space, then press Download again: finished files are \
                     kept and a partial file resumes. Gated models need a token (below) and an accepted licence.",
                ),
            }
            self.refresh_cached(ctx, shared);
        }
    }

    fn start_search(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let mut query = SearchQuery::new(self.search_text.trim());
        query.include_unsupported = self.include_unsupported;
        let options = self.hub_options(shared);
        let job = Job::spawn("finch-hub-search", ctx, move || {
            crate::hub::search(&options, &query).map_err(|e| format!("{e:#}"))
        });
        match job {
            Ok(job) => self.searching = Some(job),
            Err(e) => shared.report("Cannot search the Hub", e, "Restart Finch."),
        }
    }

    fn start_download(&mut self, ctx: &egui::Context, shared: &mut Shared, id: &str) {
        if self.download.is_some() {
            return;
        }
        let options = self.hub_options(shared);
        let request = DownloadRequest::new(id);
        let stream = Stream::spawn("finch-hub-download", ctx, move |send, cancel| {
            let result = crate::hub::download(&options, &request, &mut |p| send(Ok(p)), cancel);
            if let Err(e) = result {
                send(Err(format!("{e:#}")));
            }
        });
        match stream {
            Ok(stream) => {
                self.download = Some(Download {
                    id: id.to_string(),
                    stream,
                    done_bytes: 0,
                    total_bytes: 0,
                    current_file: String::new(),
                    cancelled: false,
                })
            }
            Err(e) => shared.report("Cannot start the download", e, "Restart Finch."),
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Models");
        ui.add_space(6.0);
        self.card_ui(ui, shared);
        ui.add_space(10.0);
        ui.group(|ui| self.open_ui(ui, shared));
        ui.add_space(10.0);
        ui.group(|ui| self.hub_ui(ui, shared));
        ui.add_space(10.0);
        ui.group(|ui| self.cached_ui(ui, shared));
    }

    /// Open a model folder or `.gguf` file on this computer.
    fn open_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        ui.label(egui::RichText::new("Open a model on this computer").strong());
        ui.horizontal(|ui| {
            let label = ui.label("Model path");
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.path_text)
                    .hint_text("folder with config.json, or a .gguf file")
                    .desired_width(380.0),
            );
            let edit = edit.labelled_by(label.id);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            let can_open = !self.path_text.trim().is_empty() && !self.is_opening();
            let clicked = ui.add_enabled(can_open, egui::Button::new("Open")).clicked();
            if can_open && (clicked || enter) {
                let path = PathBuf::from(self.path_text.trim());
                self.open(&ctx, shared, &path);
            }
            if ui
                .button("Folder…")
                .on_hover_text("Pick a Hugging Face model folder")
                .clicked()
            {
                shared.pick(PickPurpose::ModelFolder, None);
            }
            if ui
                .button("GGUF file…")
                .on_hover_text("Pick a .gguf model file")
                .clicked()
            {
                shared.pick(PickPurpose::ModelGguf, None);
            }
            if self.is_opening() {
                ui.spinner();
                ui.label("Opening…");
            }
        });
    }

    /// Search the Hub, the access token, the download in progress and the results.
    fn hub_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        let search_label = ui.label(egui::RichText::new("Search the Hugging Face Hub").strong());
        ui.horizontal(|ui| {
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.search_text)
                    .hint_text("e.g. SmolLM2, Qwen2.5 0.5B")
                    .desired_width(300.0),
            );
            let edit = edit.labelled_by(search_label.id);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            let searching = self.searching.is_some();
            if (ui.add_enabled(!searching, egui::Button::new("Search")).clicked() || enter) && !searching {
                self.start_search(&ctx, shared);
            }
            ui.checkbox(&mut self.include_unsupported, "Show models Finch cannot tune")
                .on_hover_text("Also list other architectures and models over 4B parameters, greyed out.");
            if searching {
                ui.spinner();
            }
        });
        ui.horizontal(|ui| {
            ui.label("Access token");
            ui.add(
                egui::TextEdit::singleline(&mut self.token_text)
                    .password(true)
                    .hint_text("only for gated models (hf_…)")
                    .desired_width(260.0),
            )
            .on_hover_text(
                "Gated models (e.g. Llama) need a Hugging Face token and an accepted licence on the model's web \
                 page. HF_TOKEN and `huggingface-cli login` tokens are used automatically.",
            );
        });
        self.download_ui(ui);
        self.search_results_ui(ui, &ctx, shared);
    }

    /// The models in the Hugging Face cache, each with a Use button.
    fn cached_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        ui.horizontal(|ui| {
            ui.label(egui::RichText::new("Downloaded models").strong());
            if ui.small_button("Refresh").clicked() {
                self.refresh_cached(&ctx, shared);
            }
        });
        if self.cached.is_empty() {
            ui.label(egui::RichText::new("No models in the Hugging Face cache yet.").weak());
        }
        let mut open = None;
        egui::Grid::new("cached-models")
            .striped(true)
            .num_columns(3)
            .show(ui, |ui| {
                for model in &self.cached {
                    ui.label(&model.id);
                    ui.label(format_bytes(model.size_bytes));
                    match model.revisions.iter().find(|r| r.usable) {
                        Some(rev) => {
                            if ui.button("Use").on_hover_text(rev.path.display().to_string()).clicked() {
                                open = Some(rev.path.clone());
                            }
                        }
                        None => {
                            ui.label(egui::RichText::new("incomplete").weak())
                                .on_hover_text("Download it again to finish the missing files.");
                        }
                    }
                    ui.end_row();
                }
            });
        if let Some(path) = open {
            self.open(&ctx, shared, &path);
        }
    }

    fn card_ui(&mut self, ui: &mut egui::Ui, shared: &Shared) {
        let Some(card) = &shared.model else {
            ui.label(egui::RichText::new("No model open. Open one below, or search the Hub.").weak());
            return;
        };
        egui::Frame::group(ui.style()).inner_margin(12.0).show(ui, |ui| {
            ui.label(egui::RichText::new(&card.name).heading().strong());
            ui.label(egui::RichText::new(card.path.display().to_string()).small().weak());
            ui.add_space(4.0);
            egui::Grid::new("model-card")
                .num_columns(2)
                .spacing([24.0, 4.0])
                .show(ui, |ui| {
                    ui.label("Family");
                    ui.label(&card.family);
                    ui.end_row();
                    ui.label("Parameters");
                    ui.label(format_count(card.parameters as u64));
                    ui.end_row();
                    ui.label("Context length");
                    ui.label(format!("{} tokens", card.context_length));
                    ui.end_row();
                    ui.label("Shape");
                    ui.label(format!(
                        "{} layers, hidden size {}, vocabulary {}",
                        card.layers, card.hidden_size, card.vocab_size
                    ));
                    ui.end_row();
                    ui.label("Weights");
                    ui.label(card.format);
                    ui.end_row();
                    ui.label("Training memory").on_hover_text(
                        "Estimated peak memory of a LoRA run with the Train page's settings (batch, sequence \
                         length, rank, precision), and with the smallest base and activation checkpointing.",
                    );
                    ui.label(training_memory_text(&card.config, &shared.settings.train));
                    ui.end_row();
                    ui.label("Chat template");
                    match &card.chat_template {
                        Ok(true) => ui.label("present"),
                        Ok(false) => ui.label(
                            egui::RichText::new("missing: training needs one").color(ui.visuals().warn_fg_color),
                        ),
                        Err(e) => {
                            ui.label(egui::RichText::new(format!("broken: {e}")).color(ui.visuals().error_fg_color))
                        }
                    };
                    ui.end_row();
                });
        });
    }

    fn download_ui(&mut self, ui: &mut egui::Ui) {
        let Some(dl) = &mut self.download else { return };
        ui.horizontal(|ui| {
            let fraction = if dl.total_bytes > 0 {
                dl.done_bytes as f32 / dl.total_bytes as f32
            } else {
                0.0
            };
            ui.label(format!("Downloading {}", dl.id));
            ui.add(egui::ProgressBar::new(fraction).desired_width(260.0).text(format!(
                "{} / {}",
                format_bytes(dl.done_bytes),
                format_bytes(dl.total_bytes)
            )));
            if dl.cancelled {
                ui.label("Cancelling…");
            } else if ui.button("Cancel").clicked() {
                dl.cancelled = true;
                dl.stream.cancel.store(true, Ordering::Relaxed);
            }
        });
        if !dl.current_file.is_empty() {
            ui.label(egui::RichText::new(&dl.current_file).small().weak());
        }
    }

    fn search_results_ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context, shared: &mut Shared) {
        if self.searched && self.results.is_empty() {
            ui.label(egui::RichText::new("No matching models.").weak());
            return;
        }
        let downloading = self.download.is_some();
        let mut download = None;
        egui::Grid::new("hub-results")
            .striped(true)
            .num_columns(6)
            .show(ui, |ui| {
                if !self.results.is_empty() {
                    for head in ["Model", "Parameters", "Size", "Licence", "Downloads", ""] {
                        ui.label(egui::RichText::new(head).strong());
                    }
                    ui.end_row();
                }
                for m in &self.results {
                    let name = egui::RichText::new(&m.id);
                    let name = if m.supported { name } else { name.weak() };
                    let label = ui.label(name);
                    if let Some(reason) = &m.unsupported_reason {
                        label.on_hover_text(reason);
                    }
                    ui.label(m.parameters.map(format_count).unwrap_or_else(|| "?".into()));
                    ui.label(m.storage_bytes.map(format_bytes).unwrap_or_else(|| "?".into()));
                    ui.label(m.license.as_deref().unwrap_or("?"));
                    ui.label(format_count(m.downloads));
                    if m.supported {
                        let text = if m.gated { "Download (gated)" } else { "Download" };
                        if ui.add_enabled(!downloading, egui::Button::new(text)).clicked() {
                            download = Some(m.id.clone());
                        }
                    } else {
                        ui.label("");
                    }
                    ui.end_row();
                }
            });
        if let Some(id) = download {
            self.start_download(ctx, shared, &id);
        }
    }
}
