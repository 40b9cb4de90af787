//! Background work for the studio: every model open, Hub request, download, folder scan, chart
//! export and training run happens on a named thread that reports over a channel and wakes the
//! window with `ctx.request_repaint()`. The UI thread only polls with `try_recv`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;

use eframe::egui;

/// A one-shot background job: the thread sends its single result and ends.
pub struct Job<T> {
    rx: Receiver<T>,
}

impl<T: Send + 'static> Job<T> {
    /// Runs `work` on a thread called `name` and repaints `ctx` when the result is ready.
    pub fn spawn(name: &str, ctx: &egui::Context, work: impl FnOnce() -> T + Send + 'static) -> Result<Self, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // The receiver is gone only when the window closed; nothing is left to tell.
                let _ = tx.send(work());
                ctx.request_repaint();
            })
            .map_err(|e| format!("cannot start the `{name}` thread: {e}"))?;
        Ok(Job { rx })
    }

    /// The result once the job is done; `None` while it runs.
    pub fn poll(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

/// A long job that streams events (downloads, training) and can be cancelled.
pub struct Stream<E> {
    rx: Receiver<E>,
    /// Set to ask the thread to stop at its next check point.
    pub cancel: Arc<AtomicBool>,
    finished: bool,
}

impl<E: Send + 'static> Stream<E> {
    /// Runs `work(send, cancel)` on a thread called `name`. Every sent event repaints `ctx`.
    ///
    /// The channel is unbounded on purpose: the senders (download progress, at most 10 events a
    /// second, and training steps, at most a few a second) must never block on a window that is
    /// minimised and not draining, since a blocked trainer could not react to Stop.
    pub fn spawn(
        name: &str,
        ctx: &egui::Context,
        work: impl FnOnce(&dyn Fn(E), &AtomicBool) + Send + 'static,
    ) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let thread_cancel = cancel.clone();
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let send = |event: E| {
                    let _ = tx.send(event);
                    ctx.request_repaint();
                };
                work(&send, &thread_cancel);
            })
            .map_err(|e| format!("cannot start the `{name}` thread: {e}"))?;
        Ok(Stream {
            rx,
            cancel,
            finished: false,
        })
    }

    /// All events that arrived since the last call.
    pub fn drain(&mut self) -> Vec<E> {
        let mut events = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(event) => events.push(event),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.finished = true;
                    break;
                }
            }
        }
        events
    }

    /// True once the thread has ended and every event was drained.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// What a stream in `slot` sent since the last call; the slot is emptied once the thread has
/// ended and everything it sent was taken (for streams whose only message is their result).
pub fn drain_and_release<E: Send + 'static>(slot: &mut Option<Stream<E>>) -> Vec<E> {
    let Some(stream) = slot else { return vec![] };
    let events = stream.drain();
    if stream.is_finished() {
        *slot = None;
    }
    events
}

/// What a file or folder dialog is for, so its answer goes to the right field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickPurpose {
    ModelFolder,
    ModelGguf,
    DataFile,
    /// A dataset to open on the Data page.
    DataOpen,
    /// Where the Data page saves its rows.
    DataSaveAs,
    /// Where the Data page writes a train / validation split.
    DataSplitFolder,
    RunsFolder,
    ChartPng,
    ChartSvg,
    ChatAdapter,
    ExportAdapter,
    ExportFolder,
}

/// Opens a native file dialog without blocking the window. On macOS dialogs must run on the
/// main thread, so there the call blocks briefly instead.
pub fn pick_path(
    ctx: &egui::Context,
    purpose: PickPurpose,
    start_dir: Option<&Path>,
) -> Result<Job<Option<PathBuf>>, String> {
    let start_dir = start_dir.map(Path::to_path_buf);
    let pick = move || {
        let mut dialog = rfd::FileDialog::new();
        if let Some(dir) = &start_dir {
            dialog = dialog.set_directory(dir);
        }
        match purpose {
            PickPurpose::ModelFolder => dialog.set_title("Open a model folder").pick_folder(),
            PickPurpose::ModelGguf => dialog
                .set_title("Open a GGUF model")
                .add_filter("GGUF model", &["gguf"])
                .pick_file(),
            PickPurpose::DataFile => dialog
                .set_title("Pick training data")
                .add_filter("JSON Lines", &["jsonl", "json"])
                .pick_file(),
            PickPurpose::DataOpen => dialog
                .set_title("Open a dataset")
                .add_filter("Datasets", &["jsonl", "ndjson", "json", "csv", "parquet", "txt", "md"])
                .pick_file(),
            PickPurpose::DataSaveAs => dialog
                .set_title("Save the dataset as JSONL")
                .add_filter("JSON Lines", &["jsonl"])
                .set_file_name("dataset.jsonl")
                .save_file(),
            PickPurpose::DataSplitFolder => dialog.set_title("Folder for the split files").pick_folder(),
            PickPurpose::RunsFolder => dialog.set_title("Folder for training runs").pick_folder(),
            PickPurpose::ChartPng => dialog
                .set_title("Save chart as PNG")
                .add_filter("PNG image", &["png"])
                .set_file_name("loss.png")
                .save_file(),
            PickPurpose::ChartSvg => dialog
                .set_title("Save chart as SVG")
                .add_filter("SVG image", &["svg"])
                .set_file_name("loss.svg")
                .save_file(),
            PickPurpose::ChatAdapter => dialog.set_title("Open a run or adapter folder").pick_folder(),
            PickPurpose::ExportAdapter => dialog.set_title("Adapter to export").pick_folder(),
            PickPurpose::ExportFolder => dialog.set_title("Folder for the exported files").pick_folder(),
        }
    };
    if cfg!(target_os = "macos") {
        let (tx, rx) = mpsc::sync_channel(1);
        let _ = tx.send(pick());
        return Ok(Job { rx });
    }
    Job::spawn("finch-file-dialog", ctx, pick)
}
