//! The Data page's "Choosing data" panel: scores every row with the model open on the Models
//! page (answer loss and IFD, the engine's [`DataScorer::score`] that `finch data score` runs)
//! on a named thread with progress and Stop, draws a histogram of each score from the scores
//! saved on the rows, and keeps the top (or bottom) K% by either score
//! ([`crate::data::quality::select_by`], as `finch data score --keep` does). Scores land on the
//! rows as one undoable edit; keeping a share replaces the rows the way a filter does (Undo
//! brings the others back).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use eframe::egui;
use egui_plot::{Bar, BarChart, Plot, VLine};

use crate::data::meta::RowMeta;
use crate::data::quality::{select_by, Keep, ScoreKind};
use crate::data::Example;
use crate::train::score::{DataScorer, ScoreProgress, ScoreTable};
use crate::ui::worker::Stream;

/// Bars in each score histogram.
const SCORE_BINS: usize = 30;

/// What the scoring thread sends.
pub enum ScoreMsg {
    Progress(ScoreProgress),
    /// `Ok(None)`: stopped before the end.
    Done(Result<Option<ScoreTable>, String>),
}

/// How a scoring run ended, for the page to apply.
pub enum ScoreOutcome {
    /// Scores of the rows as they were at `revision`.
    Scored {
        revision: u64,
        table: ScoreTable,
    },
    Stopped,
    Failed(String),
}

/// What the panel's widgets asked for.
pub enum ScoreAction {
    Start,
    Stop,
    /// Keep these rows (ascending indices), dropping the others.
    Keep {
        rows: Vec<usize>,
        status: String,
    },
}

/// What a selection was asked for: by which score, which end, the share in tenths of a percent.
type SelectionKey = (ScoreKind, Keep, u32);

/// Per-row values of the two scores (NaN where a row has none) and their histograms, for one
/// state of the rows.
struct ScoreView {
    revision: u64,
    loss: Vec<f32>,
    ifd: Vec<f32>,
    loss_bars: (Vec<[f64; 2]>, f64),
    ifd_bars: (Vec<[f64; 2]>, f64),
    /// The last selection asked for: (by, keep, share in tenths of a percent) and its rows.
    selection: Option<(SelectionKey, Result<Vec<usize>, String>)>,
}

pub struct ScorePanel {
    /// Also compute IFD (two more forward passes per row).
    pub with_ifd: bool,
    pub by: ScoreKind,
    pub keep: Keep,
    /// Share of rows to keep, in percent.
    pub percent: f32,
    running: Option<(u64, Stream<ScoreMsg>)>,
    progress: Option<ScoreProgress>,
    view: Option<ScoreView>,
}

impl Default for ScorePanel {
    fn default() -> Self {
        ScorePanel {
            with_ifd: true,
            by: ScoreKind::Ifd,
            keep: Keep::Top,
            percent: 30.0,
            running: None,
            progress: None,
            view: None,
        }
    }
}

/// Bins finite values into at most `bins` equal-width bars between their min and max:
/// `(bin centre, rows)` and the bin width.
pub fn float_histogram(values: &[f32], bins: usize) -> (Vec<[f64; 2]>, f64) {
    let finite: Vec<f64> = values.iter().filter(|v| v.is_finite()).map(|&v| v as f64).collect();
    let (Some(min), Some(max)) = (
        finite.iter().copied().reduce(f64::min),
        finite.iter().copied().reduce(f64::max),
    ) else {
        return (vec![], 1.0);
    };
    let bins = bins.max(1);
    // All equal: one bar of a nominal width around the value.
    let width = if max > min { (max - min) / bins as f64 } else { 0.1 };
    let mut counts = vec![0usize; bins];
    for v in &finite {
        let bin = (((v - min) / width) as usize).min(bins - 1);
        counts[bin] += 1;
    }
    let bars = counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &c)| [min + (i as f64 + 0.5) * width, c as f64])
        .collect();
    (bars, width)
}

impl ScorePanel {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Scores `rows` (the rows at `revision`) with the model at `model` on a named thread;
    /// rows are cut to `seq_len` tokens, as training cuts them.
    pub fn start(
        &mut self,
        ctx: &egui::Context,
        model: PathBuf,
        rows: Vec<Example>,
        revision: u64,
        seq_len: usize,
    ) -> Result<(), String> {
        if self.running.is_some() {
            return Ok(());
        }
        let with_ifd = self.with_ifd;
        let stream = Stream::spawn("finch-data-score", ctx, move |send: &dyn Fn(ScoreMsg), cancel| {
            let result = DataScorer::open(&model.display().to_string()).and_then(|scorer| {
                scorer.score(&rows, seq_len, with_ifd, cancel, &mut |p| send(ScoreMsg::Progress(p)))
            });
            send(ScoreMsg::Done(result.map_err(|e| format!("{e:#}"))));
        })?;
        self.progress = None;
        self.running = Some((revision, stream));
        Ok(())
    }

    pub fn cancel(&mut self) {
        if let Some((_, stream)) = &self.running {
            stream.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Takes what the thread sent; never blocks.
    pub fn poll(&mut self) -> Option<ScoreOutcome> {
        let (revision, stream) = self.running.as_mut()?;
        let revision = *revision;
        let mut outcome = None;
        for msg in stream.drain() {
            match msg {
                ScoreMsg::Progress(p) => self.progress = Some(p),
                ScoreMsg::Done(Ok(Some(table))) => outcome = Some(ScoreOutcome::Scored { revision, table }),
                ScoreMsg::Done(Ok(None)) => outcome = Some(ScoreOutcome::Stopped),
                ScoreMsg::Done(Err(e)) => outcome = Some(ScoreOutcome::Failed(e)),
            }
        }
        if outcome.is_some() || stream.is_finished() {
            self.running = None;
            self.progress = None;
        }
        outcome
    }

    /// The `(bin centre, rows)` bars of a score's histogram for the rows at `revision`.
    pub fn bars(&mut self, kind: ScoreKind, meta: &[RowMeta], revision: u64) -> Vec<[f64; 2]> {
        self.ensure_view(meta, revision);
        match (&self.view, kind) {
            (Some(v), ScoreKind::Loss) => v.loss_bars.0.clone(),
            (Some(v), ScoreKind::Ifd) => v.ifd_bars.0.clone(),
            (None, _) => vec![],
        }
    }

    fn ensure_view(&mut self, meta: &[RowMeta], revision: u64) {
        if self.view.as_ref().is_some_and(|v| v.revision == revision) {
            return;
        }
        let value = |f: fn(&crate::data::meta::RowScores) -> Option<f32>| -> Vec<f32> {
            meta.iter()
                .map(|m| m.scores.as_ref().and_then(f).unwrap_or(f32::NAN))
                .collect()
        };
        let loss = value(|s| s.answer_loss);
        let ifd = value(|s| s.ifd);
        self.view = Some(ScoreView {
            revision,
            loss_bars: float_histogram(&loss, SCORE_BINS),
            ifd_bars: float_histogram(&ifd, SCORE_BINS),
            loss,
            ifd,
            selection: None,
        });
    }

    /// Draws the panel for rows with `meta` at `revision`; `model_open` says whether the
    /// Models page has a model to score with.
    pub fn ui(&mut self, ui: &mut egui::Ui, meta: &[RowMeta], revision: u64, model_open: bool) -> Option<ScoreAction> {
        let mut action = None;
        ui.heading("Choosing data");
        ui.horizontal(|ui| {
            if let Some((_, _)) = &self.running {
                let (what, done, total) = match self.progress {
                    Some(ScoreProgress::Loss { done, total }) => ("answer loss", done, total),
                    Some(ScoreProgress::Ifd { done, total }) => ("IFD", done, total),
                    None => ("loading the model", 0, 0),
                };
                ui.add(
                    egui::ProgressBar::new(if total > 0 { done as f32 / total as f32 } else { 0.0 })
                        .desired_width(240.0)
                        .text(format!("{what}: {done} / {total} rows")),
                );
                if ui
                    .button("Stop scoring")
                    .on_hover_text("Stop after the current row; the rows keep the scores they had.")
                    .clicked()
                {
                    action = Some(ScoreAction::Stop);
                }
            } else {
                let button = ui
                    .add_enabled(model_open && !meta.is_empty(), egui::Button::new("Score rows"))
                    .on_hover_text(
                        "The answer loss of every row under the model open on the Models page (and IFD: the \
                         answer's loss with its instruction ÷ without it). The scores are saved with the rows.",
                    )
                    .on_disabled_hover_text("Open a model on the Models page to score rows with it.");
                if button.clicked() {
                    action = Some(ScoreAction::Start);
                }
                ui.checkbox(&mut self.with_ifd, "IFD too")
                    .on_hover_text("Two more forward passes per row.");
            }
        });
        self.ensure_view(meta, revision);
        let Some(view) = self.view.as_mut() else {
            return action;
        };
        let scored = |v: &[f32]| v.iter().filter(|x| x.is_finite()).count();
        let (n_loss, n_ifd) = (scored(&view.loss), scored(&view.ifd));
        if n_loss == 0 && n_ifd == 0 {
            let text = if model_open {
                "No row has scores yet: Score rows computes them."
            } else {
                "No row has scores yet: open a model on the Models page, then Score rows."
            };
            ui.label(egui::RichText::new(text).weak());
            return action;
        }
        // The cut-off of the share that Keep would keep, drawn on its histogram.
        let key = (self.by, self.keep, (self.percent * 10.0).round() as u32);
        if view.selection.as_ref().is_none_or(|(k, _)| *k != key) {
            let values = match self.by {
                ScoreKind::Loss => &view.loss,
                ScoreKind::Ifd => &view.ifd,
            };
            let chosen = select_by(self.by, values, self.percent / 100.0, self.keep).map_err(|e| e.to_string());
            view.selection = Some((key, chosen));
        }
        let (selected_values, chosen) = match (&view.selection, self.by) {
            (Some((_, chosen)), ScoreKind::Loss) => (&view.loss, chosen),
            (Some((_, chosen)), ScoreKind::Ifd) => (&view.ifd, chosen),
            (None, _) => return action,
        };
        let cut = chosen.as_ref().ok().and_then(|rows| {
            let kept = rows.iter().map(|&i| selected_values[i]);
            match self.keep {
                Keep::Top => kept.reduce(f32::min),
                Keep::Bottom => kept.reduce(f32::max),
            }
        });
        ui.columns(2, |cols| {
            let plots = [
                (
                    ScoreKind::Loss,
                    "Answer loss",
                    "data-loss-histogram",
                    &view.loss_bars,
                    n_loss,
                ),
                (ScoreKind::Ifd, "IFD", "data-ifd-histogram", &view.ifd_bars, n_ifd),
            ];
            for (col, (kind, title, id, (bars, width), n)) in cols.iter_mut().zip(plots) {
                col.label(egui::RichText::new(format!("{title} ({n} rows scored)")).strong());
                if n == 0 {
                    col.label(egui::RichText::new("not computed").weak());
                    continue;
                }
                let bars: Vec<Bar> = bars.iter().map(|b| Bar::new(b[0], b[1]).width(width * 0.95)).collect();
                Plot::new(id)
                    .height(160.0)
                    .x_axis_label(title)
                    .y_axis_label("rows")
                    .allow_scroll(false)
                    .show(col, |plot| {
                        plot.bar_chart(BarChart::new(title, bars));
                        if kind == ScoreKind::Ifd {
                            plot.vline(VLine::new("IFD = 1", 1.0).width(1.5));
                        }
                        if let Some(cut) = cut.filter(|_| kind == self.by) {
                            plot.vline(VLine::new("kept from here", cut as f64).width(2.0));
                        }
                    });
            }
        });
        ui.horizontal(|ui| {
            let label = ui.label("Keep");
            ui.radio_value(&mut self.keep, Keep::Top, "top");
            ui.radio_value(&mut self.keep, Keep::Bottom, "bottom");
            ui.add(
                egui::Slider::new(&mut self.percent, 1.0..=100.0)
                    .suffix(" %")
                    .fixed_decimals(0),
            )
            .labelled_by(label.id)
            .on_hover_text("Share of the scored rows to keep.");
            ui.label("by");
            ui.radio_value(&mut self.by, ScoreKind::Loss, "answer loss");
            ui.radio_value(&mut self.by, ScoreKind::Ifd, "IFD");
        });
        match chosen {
            Err(e) => {
                ui.label(egui::RichText::new(e).color(ui.visuals().error_fg_color));
            }
            Ok(rows) => {
                let unscored = selected_values.iter().filter(|v| !v.is_finite()).count();
                let mut note = format!("keeps {} of {} rows", rows.len(), meta.len());
                if self.by == ScoreKind::Ifd {
                    let useless = selected_values.iter().filter(|v| **v >= 1.0).count();
                    note.push_str(&format!(
                        "; rows with IFD ≥ 1 ({useless}) and rows without an IFD ({unscored}) are never kept"
                    ));
                } else if unscored > 0 {
                    note.push_str(&format!("; {unscored} rows without a score are not kept"));
                }
                ui.horizontal(|ui| {
                    ui.label(note);
                    if ui
                        .add_enabled(
                            rows.len() < meta.len(),
                            egui::Button::new(format!("Keep {} rows", rows.len())),
                        )
                        .on_hover_text("Remove the other rows from the table (Undo brings them back).")
                        .clicked()
                    {
                        let end = match self.keep {
                            Keep::Top => "top",
                            Keep::Bottom => "bottom",
                        };
                        action = Some(ScoreAction::Keep {
                            rows: rows.clone(),
                            status: format!(
                                "Kept the {end} {:.0}% by {} ({} of {} rows); Undo brings the others back",
                                self.percent,
                                self.by.name(),
                                rows.len(),
                                meta.len()
                            ),
                        });
                    }
                });
            }
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_histogram_counts_every_finite_value_once() {
        let (bars, width) = float_histogram(&[0.0, 0.1, 0.5, 1.0, f32::NAN, 1.0], 4);
        assert!((width - 0.25).abs() < 1e-9);
        let total: f64 = bars.iter().map(|b| b[1]).sum();
        assert_eq!(total, 5.0, "NaN is not counted");
        // 0.0 and 0.1 share the first bin; the maximum falls in the last.
        assert_eq!(bars[0], [0.125, 2.0]);
        assert_eq!(bars.last().map(|b| b[1]), Some(2.0));
        assert!(float_histogram(&[f32::NAN], 4).0.is_empty());
        assert_eq!(float_histogram(&[2.0, 2.0], 4).0, vec![[2.05, 2.0]]);
    }
}
