//! Saving the training chart as a PNG or SVG file with plotters, so a curve can go into a report
//! or onto a slide. The same series the window plots are drawn, with egui's own font.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use eframe::egui;
use plotters::prelude::*;

/// One named curve: `(step, value)` points in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartSeries {
    pub name: String,
    pub points: Vec<[f64; 2]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("{path}: the file name must end in .png or .svg")]
    UnknownFormat { path: PathBuf },
    #[error("there is nothing to draw yet: train a run or tick runs in the history first")]
    Empty,
    #[error("cannot draw the chart into {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
}

const FONT_FAMILY: &str = "sans-serif";

/// plotters' `ab_glyph` text needs a registered font; egui ships one, so no system font is needed.
fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let defs = egui::FontDefinitions::default();
            let data = defs
                .font_data
                .get("Ubuntu-Light")
                .or_else(|| defs.font_data.values().next())
                .ok_or("egui has no built-in font")?;
            // plotters keeps fonts for the life of the process; one copy is leaked on purpose.
            let bytes: &'static [u8] = Box::leak((*data.font).as_ref().to_vec().into_boxed_slice());
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| "the built-in font could not be read".to_string())
        })
        .clone()
}

/// Writes the series to `path`; the format follows the extension (`.png` or `.svg`).
pub fn save_chart(path: &Path, title: &str, series: &[ChartSeries]) -> Result<(), ChartError> {
    let series: Vec<&ChartSeries> = series.iter().filter(|s| !s.points.is_empty()).collect();
    if series.is_empty() {
        return Err(ChartError::Empty);
    }
    let draw_err = |reason: String| ChartError::Draw {
        path: path.to_path_buf(),
        reason,
    };
    register_font().map_err(draw_err)?;
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let size_px = (1200, 700);
    match ext.as_str() {
        "png" => {
            let root = BitMapBackend::new(path, size_px).into_drawing_area();
            draw(&root, title, &series).map_err(draw_err)?;
            root.present().map_err(|e| draw_err(e.to_string()))
        }
        "svg" => {
            let root = SVGBackend::new(path, size_px).into_drawing_area();
            draw(&root, title, &series).map_err(draw_err)?;
            root.present().map_err(|e| draw_err(e.to_string()))
        }
        _ => Err(ChartError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// A colour per series that matches neither the background nor its neighbours.
fn series_color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[i % COLORS.len()]
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[&ChartSeries],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for p in all.filter(|p| p[1].is_finite()) {
        x_max = x_max.max(p[0]);
        y_min = y_min.min(p[1]);
        y_max = y_max.max(p[1]);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT_FAMILY, 28))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style((FONT_FAMILY, 16))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = series_color(i);
        chart
            .draw_series(LineSeries::new(
                s.points.iter().filter(|p| p[1].is_finite()).map(|p| (p[0], p[1])),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 16))
        .draw()
        .map_err(err)?;
    Ok(())
}
