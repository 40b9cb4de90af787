//! `finch export`: an adapter as a PEFT folder, a merged Hugging Face folder, or GGUF (f16 and
//! q8_0) with an Ollama Modelfile, through the same workflow as the studio's Export page
//! ([`crate::export::run`]). Stages go to stderr; one JSON line on stdout lists what was written.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use clap::Args;

use crate::export::{ExportEvent, ExportFormat, ExportRequest};

fn parse_format(name: &str) -> Result<ExportFormat, String> {
    ExportFormat::from_name(name).ok_or_else(|| format!("unknown format `{name}` (expected peft, merged or gguf)"))
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub model: String,
    /// A `finch train` run folder or a PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// peft, merged or gguf.
    #[arg(long, value_parser = parse_format)]
    pub format: ExportFormat,
    /// A new or empty folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the adapter is folded in: auto, cpu, cuda[:N], metal (auto: the GPU when there is one).
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceChoice,
}

pub fn run(args: ExportArgs) -> anyhow::Result<i32> {
    let request = ExportRequest {
        format: args.format,
        adapter: args.adapter,
        model: Some(args.model),
        out: args.out,
        device: args.device,
    };
    let exported = crate::export::run(&request, &AtomicBool::new(false), &mut |event| match event {
        ExportEvent::Stage { index, total, text } => eprintln!("[{index}/{total}] {text}"),
    })?;
    if let Some(cmd) = &exported.ollama_command {
        eprintln!("to use it in Ollama: {cmd}");
    }
    let v = serde_json::json!({
        "format": exported.format.name(),
        "written": exported.files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>(),
    });
    println!("{v}");
    Ok(0)
}
