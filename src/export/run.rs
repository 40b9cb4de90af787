//! The export workflow shared by `finch export` and the studio's Export page: check the output
//! folder, then run the stages of one format, reporting each stage before it starts and checking
//! the cancel flag between stages. A cancelled or failed export removes what it wrote, so an
//! output folder holds a complete export or nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{export_gguf, export_merged, export_peft};
use crate::generate::{resolve_adapter_dir, with_adapter, LoadedModel};

/// What an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The adapter alone (`adapter_config.json` + `adapter_model.safetensors`), for PEFT.
    Peft,
    /// The base model with the adapter folded in, as a Hugging Face folder.
    Merged,
    /// `model-f16.gguf`, `model-q8_0.gguf` and a `Modelfile` for llama.cpp and Ollama.
    Gguf,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 3] = [ExportFormat::Peft, ExportFormat::Merged, ExportFormat::Gguf];

    /// The name on the command line (`--format peft`).
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Peft => "peft",
            ExportFormat::Merged => "merged",
            ExportFormat::Gguf => "gguf",
        }
    }

    pub fn from_name(name: &str) -> Option<ExportFormat> {
        let name = name.trim().to_ascii_lowercase();
        ExportFormat::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The name shown in the studio.
    pub fn title(self) -> &'static str {
        match self {
            ExportFormat::Peft => "PEFT adapter",
            ExportFormat::Merged => "Merged model (Hugging Face folder)",
            ExportFormat::Gguf => "GGUF f16 + q8_0 with Ollama Modelfile",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            ExportFormat::Peft => {
                "The small adapter files alone; load them on top of the base model with Python PEFT or Finch."
            }
            ExportFormat::Merged => {
                "A standalone model folder (safetensors, config, tokenizer, chat template) for transformers or Finch."
            }
            ExportFormat::Gguf => {
                "Merged weights as GGUF files for llama.cpp, LM Studio and Ollama, with a Modelfile that keeps the \
                 chat template and stop tokens."
            }
        }
    }

    /// The default output folder's name.
    pub fn folder_name(self) -> &'static str {
        match self {
            ExportFormat::Peft => "export-peft",
            ExportFormat::Merged => "export-merged",
            ExportFormat::Gguf => "export-gguf",
        }
    }

    /// Merged and GGUF exports fold the adapter into its base model, so they need it.
    pub fn needs_model(self) -> bool {
        self != ExportFormat::Peft
    }

    /// How many stages [`run`] reports for this format.
    pub fn stages(self) -> usize {
        if self.needs_model() {
            3
        } else {
            2
        }
    }
}

/// One export to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRequest {
    pub format: ExportFormat,
    /// A run folder (holding `adapter/`) or a PEFT adapter folder.
    pub adapter: PathBuf,
    /// The base model (folder, `.gguf` or Hub id); needed by merged and GGUF exports.
    pub model: Option<String>,
    /// A new or empty folder.
    pub out: PathBuf,
    /// Where the adapter is folded into the base (merged and GGUF exports).
    pub device: crate::device::DeviceChoice,
}

/// What [`run`] reports while it works.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportEvent {
    /// Stage `index` (1-based) of `total` started.
    Stage { index: usize, total: usize, text: String },
}

/// A finished export.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub format: ExportFormat,
    pub out: PathBuf,
    /// Every file written, sorted, with its size in bytes.
    pub files: Vec<(PathBuf, u64)>,
    /// For GGUF: the command that makes an Ollama model of it.
    pub ollama_command: Option<String>,
}

/// How an export ended without finishing; in both cases the partial output is gone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("the export was cancelled")]
    Cancelled,
    /// What was being done and why it failed, in one line.
    #[error("{0}")]
    Failed(String),
}

/// Runs `request`, calling `on_event` before each stage and stopping at the next stage once
/// `cancel` is set. Refuses an output folder that holds anything (it would be mixed with, and on
/// failure removed with, the export).
pub fn run(
    request: &ExportRequest,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(ExportEvent),
) -> Result<Exported, ExportError> {
    let out = &request.out;
    let existed = out.exists();
    if existed {
        match std::fs::read_dir(out).map(|mut d| d.next().is_none()) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ExportError::Failed(format!(
                    "{} is not empty; export into a new or empty folder",
                    out.display()
                )))
            }
            Err(e) => return Err(ExportError::Failed(format!("cannot read {}: {e}", out.display()))),
        }
    }
    match run_stages(request, cancel, on_event) {
        Ok(()) => Ok(Exported {
            format: request.format,
            out: out.clone(),
            files: list_files(out),
            ollama_command: (request.format == ExportFormat::Gguf).then(|| ollama_command(out)),
        }),
        Err(early) => {
            // A partial export is worse than none: remove what was written.
            let _ = std::fs::remove_dir_all(out);
            if existed {
                let _ = std::fs::create_dir_all(out);
            }
            Err(early)
        }
    }
}

/// Turns an engine error into a failure saying what was being done.
fn failed(what: &'static str) -> impl Fn(crate::Error) -> ExportError {
    move |e| ExportError::Failed(format!("{what}: {e:#}"))
}

fn run_stages(
    request: &ExportRequest,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(ExportEvent),
) -> Result<(), ExportError> {
    let (format, adapter, out) = (request.format, &request.adapter, &request.out);
    let total = format.stages();
    let mut stage = |index: usize, text: String| -> Result<(), ExportError> {
        if cancel.load(Ordering::Relaxed) {
            return Err(ExportError::Cancelled);
        }
        on_event(ExportEvent::Stage { index, total, text });
        Ok(())
    };
    match format {
        ExportFormat::Peft => {
            stage(1, "Checking the adapter".into())?;
            let dir = resolve_adapter_dir(adapter).map_err(failed("cannot find the adapter"))?;
            // Loading checks that the folder is a complete, readable adapter before copying.
            crate::lora::load_adapter(&dir, &candle_core::Device::Cpu).map_err(failed("cannot read the adapter"))?;
            stage(2, "Writing adapter_config.json and adapter_model.safetensors".into())?;
            export_peft(&dir, out).map_err(failed("cannot write the adapter"))?;
        }
        ExportFormat::Merged | ExportFormat::Gguf => {
            let spec = request.model.as_deref().ok_or_else(|| {
                ExportError::Failed(format!(
                    "a {} export folds the adapter into its base model: give the model it was trained on",
                    format.name()
                ))
            })?;
            stage(1, format!("Loading the base model {spec}"))?;
            let device = request.device.open().map_err(failed("cannot open the device"))?;
            let loaded = LoadedModel::open_on(spec, &device).map_err(failed("cannot load the base model"))?;
            stage(2, "Attaching the adapter".into())?;
            let tuned = with_adapter(&loaded.model, adapter).map_err(failed("cannot load the adapter"))?;
            if format == ExportFormat::Merged {
                stage(
                    3,
                    "Merging and writing model.safetensors, config.json and the tokenizer files".into(),
                )?;
                export_merged(&loaded.files, &loaded.format, &tuned, out).map_err(failed("cannot write the model"))?;
            } else {
                stage(
                    3,
                    "Merging and writing model-f16.gguf, model-q8_0.gguf and Modelfile".into(),
                )?;
                export_gguf(&loaded.files, &loaded.format, &tuned, out)
                    .map_err(failed("cannot write the GGUF files"))?;
            }
        }
    }
    Ok(())
}

/// `cd "<out>" && ollama create <name> -f Modelfile`.
pub fn ollama_command(out: &Path) -> String {
    format!(
        "cd \"{}\" && ollama create {} -f Modelfile",
        out.display(),
        ollama_name(out)
    )
}

/// A model name Ollama accepts, from the run folder holding `out`: lowercase letters, digits,
/// `-`, `_` and `.`.
fn ollama_name(out: &Path) -> String {
    let source = out
        .parent()
        .and_then(Path::file_name)
        .or_else(|| out.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = source
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() {
        "finch-model".into()
    } else {
        name
    }
}

/// Every file under `dir` (recursively), sorted, with sizes.
fn list_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((p, size));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_names_are_valid() {
        assert_eq!(ollama_name(Path::new("/r/Tiny Llama v2/export-gguf")), "tiny-llama-v2");
        assert_eq!(ollama_name(Path::new("/r/smol.capitals/export-gguf")), "smol.capitals");
        assert_eq!(ollama_name(Path::new("/export-gguf")), "export-gguf");
        assert_eq!(ollama_name(Path::new("/…/export-gguf")), "finch-model");
    }

    #[test]
    fn format_names_round_trip() {
        for f in ExportFormat::ALL {
            assert_eq!(ExportFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(ExportFormat::from_name("onnx"), None);
    }

    #[test]
    fn a_folder_that_is_not_empty_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
        let request = ExportRequest {
            format: ExportFormat::Peft,
            adapter: dir.path().join("no-adapter"),
            model: None,
            out: dir.path().to_path_buf(),
            device: Default::default(),
        };
        let mut events = vec![];
        let err = run(&request, &AtomicBool::new(false), &mut |e| events.push(e)).unwrap_err();
        assert!(err.to_string().contains("is not empty"), "{err}");
        assert!(events.is_empty(), "no stage started");
        assert!(dir.path().join("keep.txt").is_file());
    }

    #[test]
    fn a_failed_or_cancelled_export_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let request = ExportRequest {
            format: ExportFormat::Peft,
            adapter: dir.path().join("no-adapter"),
            model: None,
            out: out.clone(),
            device: Default::default(),
        };
        let mut events = vec![];
        let err = run(&request, &AtomicBool::new(false), &mut |e| events.push(e)).unwrap_err();
        assert!(err.to_string().starts_with("cannot find the adapter"), "{err}");
        assert_eq!(
            events,
            [ExportEvent::Stage {
                index: 1,
                total: 2,
                text: "Checking the adapter".into()
            }]
        );
        assert!(!out.exists());
        let cancelled = run(&request, &AtomicBool::new(true), &mut |_| {}).unwrap_err();
        assert_eq!(cancelled, ExportError::Cancelled);
        assert!(!out.exists());

        let merged = ExportRequest {
            format: ExportFormat::Merged,
            ..request
        };
        let err = run(&merged, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("base model"), "{err}");
    }
}
