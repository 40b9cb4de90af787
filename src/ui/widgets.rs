//! Small formatting helpers and widgets shared by the pages.

use eframe::egui;

/// `1536` → `1.5 KB`; decimal units, as the Hub shows sizes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `134_515_008` → `134.5M`: parameter and download counts.
pub fn format_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

/// `3725.0` → `1 h 02 min`; `42.0` → `42 s`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "–".into();
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else if m > 0 {
        format!("{m} min {s:02} s")
    } else {
        format!("{s} s")
    }
}

/// A labelled row in a settings grid: the label carries the one-sentence explanation as a
/// tooltip, and the control is linked to the label so screen readers (and tests) find it by name.
pub fn knob_row(ui: &mut egui::Ui, label: &str, tooltip: &str, add: impl FnOnce(&mut egui::Ui) -> egui::Response) {
    let label_response = ui.label(label).on_hover_text(tooltip);
    let response = add(ui).on_hover_text(tooltip);
    response.labelled_by(label_response.id);
    ui.end_row();
}

/// What this build and machine offer, asked once per process (probing a GPU driver is not a
/// per-frame job).
pub fn offered_devices() -> &'static [crate::device::DeviceOffer] {
    static OFFERS: std::sync::OnceLock<Vec<crate::device::DeviceOffer>> = std::sync::OnceLock::new();
    OFFERS.get_or_init(crate::device::offered)
}

/// The device picker every page uses: `auto` and each device kind; those this build or machine
/// cannot use are listed greyed with the reason ("built without CUDA", "no NVIDIA driver found").
pub fn device_combo(ui: &mut egui::Ui, id: &str, choice: &mut crate::device::DeviceChoice) -> egui::Response {
    egui::ComboBox::from_id_salt(id)
        .selected_text(choice.to_string())
        .show_ui(ui, |ui| {
            ui.selectable_value(choice, crate::device::DeviceChoice::Auto, "auto");
            for offer in offered_devices() {
                match &offer.unavailable {
                    None => {
                        ui.selectable_value(choice, offer.choice, offer.label.as_str());
                    }
                    Some(why) => {
                        ui.weak(format!("{}: {why}", offer.label));
                    }
                }
            }
        })
        .response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_counts_and_durations() {
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(1_500), "1.5 KB");
        assert_eq!(format_bytes(269_060_000), "269.1 MB");
        assert_eq!(format_count(9_999), "9999");
        assert_eq!(format_count(134_515_008), "134.5M");
        assert_eq!(format_count(1_540_000_000), "1.54B");
        assert_eq!(format_duration(42.4), "42 s");
        assert_eq!(format_duration(125.0), "2 min 05 s");
        assert_eq!(format_duration(3725.0), "1 h 02 min");
        assert_eq!(format_duration(f64::NAN), "–");
    }
}
