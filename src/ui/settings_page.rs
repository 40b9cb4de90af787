//! The Settings page: UI scale (up to projector size), the runs folder and where the Hub cache is.

use std::path::PathBuf;

use eframe::egui;

use super::shared::Shared;
use super::worker::PickPurpose;

/// The Settings page; everything it edits lives in [`Shared::settings`].
pub struct SettingsPage;

impl SettingsPage {
    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Settings");
        ui.add_space(8.0);
        egui::Grid::new("settings-grid")
            .num_columns(2)
            .spacing([16.0, 10.0])
            .show(ui, |ui| {
                ui.label("UI scale")
                    .on_hover_text("Makes every text and control larger; 1.5 or more for a classroom projector.");
                ui.horizontal(|ui| {
                    ui.add(egui::Slider::new(&mut shared.settings.ui_scale, 0.75..=2.5).step_by(0.05));
                    for (label, scale) in [("Laptop", 1.0), ("Large", 1.5), ("Projector", 2.0)] {
                        if ui.button(label).clicked() {
                            shared.settings.ui_scale = scale;
                        }
                    }
                });
                ui.end_row();

                ui.label("Runs folder")
                    .on_hover_text("New training runs are created here, and past runs are listed from here.");
                ui.horizontal(|ui| {
                    let mut text = shared.settings.runs_dir.display().to_string();
                    if ui
                        .add(egui::TextEdit::singleline(&mut text).desired_width(360.0))
                        .changed()
                    {
                        shared.settings.runs_dir = PathBuf::from(text);
                        shared.requests.rescan_runs = true;
                    }
                    if ui.button("Browse…").clicked() {
                        let dir = shared.settings.runs_dir.clone();
                        shared.pick(PickPurpose::RunsFolder, Some(&dir));
                    }
                });
                ui.end_row();

                ui.label("Hub cache")
                    .on_hover_text("Downloaded models are shared with Python's huggingface_hub through this folder.");
                ui.label(shared.hub.cache_dir.display().to_string());
                ui.end_row();
            });
    }
}
