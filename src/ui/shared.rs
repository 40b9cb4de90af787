//! What the studio's pages share, in one place: the persisted [`Settings`], the error banner, the
//! model open on the Models page, the runs under the runs folder, the Hub settings, and the
//! requests one page makes of another ("train on this data file", "the runs folder changed",
//! "open a file dialog"). Pages read and write this, never each other's fields; the shell
//! ([`super::App`]) hands it to every page and acts on the requests.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hub::HubOptions;
use crate::train::history::RunHistory;
use crate::train::TrainConfig;

use super::chat_page::ChatSettings;
use super::models_page::ModelCard;
use super::worker::PickPurpose;

/// The pages of the studio.
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

/// An error shown in the window: what failed, the underlying message, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiError {
    pub what: String,
    pub detail: String,
    pub fix: String,
}

/// What one page asks of another (or of the shell); each is taken by the one it is for.
#[derive(Debug, Default)]
pub struct Requests {
    /// The runs folder may have changed: the Train page rescans it.
    pub rescan_runs: bool,
    /// "Train on this data file": the Train page makes it its data file.
    pub train_on: Option<PathBuf>,
    /// The objective to preselect with `train_on` ("Train on my votes" asks for DPO).
    pub train_method: Option<crate::train::Method>,
    /// A file dialog to open, with the folder it starts in; its answer goes back to the page
    /// that asked (the shell routes it by purpose).
    pub pick: Option<(PickPurpose, Option<PathBuf>)>,
}

/// State every page may read and change.
pub struct Shared {
    pub settings: Settings,
    errors: Vec<UiError>,
    /// The model open on the Models page.
    pub model: Option<ModelCard>,
    /// Runs under the runs folder as last scanned, newest first.
    runs: Vec<RunHistory>,
    /// Runs with a finished adapter, as (name, folder); computed when the runs change so no page
    /// touches the disk every frame.
    run_adapters: Vec<(String, PathBuf)>,
    /// Adapter folders added by hand on the Chat page, as (name, folder).
    added_adapters: Vec<(String, PathBuf)>,
    /// Hub settings: the environment's, or a test's fake Hub and cache.
    pub hub: HubOptions,
    pub requests: Requests,
}

impl Shared {
    pub fn new(settings: Settings) -> Self {
        Shared {
            settings,
            errors: Vec::new(),
            model: None,
            runs: Vec::new(),
            run_adapters: Vec::new(),
            added_adapters: Vec::new(),
            hub: HubOptions::from_env(),
            requests: Requests::default(),
        }
    }

    /// Shows an error in the window (and nowhere else). The same failure repeated (a button
    /// pressed twice) is shown once.
    pub fn report(&mut self, what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) {
        let error = UiError {
            what: what.into(),
            detail: detail.into(),
            fix: fix.into(),
        };
        if !self.errors.contains(&error) {
            self.errors.push(error);
        }
    }

    /// Errors currently shown in the banner, oldest first.
    pub fn errors(&self) -> &[UiError] {
        &self.errors
    }

    pub fn dismiss_error(&mut self, index: usize) {
        if index < self.errors.len() {
            self.errors.remove(index);
        }
    }

    /// Asks the shell to open a file dialog for `purpose` (one at a time).
    pub fn pick(&mut self, purpose: PickPurpose, start_dir: Option<&Path>) {
        self.requests.pick = Some((purpose, start_dir.map(Path::to_path_buf)));
    }

    /// Runs under the runs folder as last scanned, newest first.
    pub fn runs(&self) -> &[RunHistory] {
        &self.runs
    }

    /// Publishes a new scan of the runs folder.
    pub fn set_runs(&mut self, runs: Vec<RunHistory>) {
        self.run_adapters = runs
            .iter()
            .filter(|r| r.has_adapter())
            .map(|r| (r.name.clone(), r.dir.clone()))
            .collect();
        self.runs = runs;
    }

    /// Runs with a finished adapter, then folders added by hand: (name, folder).
    pub fn adapters(&self) -> impl Iterator<Item = &(String, PathBuf)> {
        self.run_adapters.iter().chain(self.added_adapters.iter())
    }

    /// Adds an adapter folder to [`Shared::adapters`] unless it is listed already.
    pub fn add_adapter(&mut self, name: String, dir: PathBuf) {
        if !self.adapters().any(|(_, d)| *d == dir) {
            self.added_adapters.push((name, dir));
        }
    }

    /// The name an adapter folder is listed under.
    pub fn adapter_name(&self, dir: &Path) -> String {
        self.adapters()
            .find(|(_, d)| d == dir)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| adapter_folder_name(dir))
    }
}

/// A name for an adapter folder: a run's adapter folder is named `adapter`, so the run's name
/// says more.
pub fn adapter_folder_name(dir: &Path) -> String {
    let named = if dir.file_name().is_some_and(|n| n == "adapter") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    named
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}
