//! The desktop studio (eframe/egui). The only part of Finch that knows about a GUI: it drives the
//! engine through the library's public API on named background threads, with results coming
//! back over channels, so the window never waits for a model load, a download or a training step.
//!
//! Pages: Models (open, Hub search/download, cache, model card), Data (open or demo datasets, a
//! virtualized row table, rejected rows, edit/undo/save, token-length histogram, template and
//! loss-mask inspector, split, quality filters), Train (settings, presets, live curves, probe
//! prompts, preflight, run history, chart export), Chat (streaming chat with the base model or an
//! adapter; Compare side by side, with blind A/B votes saved for preference tuning), Export (PEFT
//! adapter, merged model, GGUF + Ollama Modelfile) and Settings (UI scale, runs folder).
//!
//! Each page is a struct that owns its state, with `poll` (its background jobs, every frame) and
//! `ui(&mut self, ui, &mut Shared)`; what pages share is in [`shared::Shared`], and the shell in
//! [`app`] owns the pages. The big pages are folders: `state.rs` (jobs, polling, actions) and
//! `view.rs` (drawing).

pub mod app;
pub mod chart;
pub mod chat_page;
pub mod data_page;
pub mod export_page;
pub mod models_page;
mod queries;
pub mod settings_page;
pub mod shared;
pub mod train_page;
pub mod widgets;
pub mod worker;

pub use app::{App, StartOptions};
pub use shared::{Page, Settings, Shared, UiError};

use eframe::egui;

/// Opens the studio window and returns when it is closed.
pub fn run_native(start: StartOptions) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Finch")
            .with_app_id("finch")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([720.0, 480.0]),
        ..Default::default()
    };
    eframe::run_native("Finch", options, Box::new(move |cc| Ok(Box::new(App::new(cc, start))))).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the studio window: {e}. Finch needs a desktop session (X11 or Wayland) with OpenGL; \
             the command-line tools (`finch --help`) work without one"
        )
    })
}
