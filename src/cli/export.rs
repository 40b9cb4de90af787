//! `finch export`: an adapter as a PEFT folder, a merged Hugging Face folder, or GGUF (f16 and
//! q8_0) with an Ollama Modelfile. Prints one JSON line with what was written.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::export::{export_gguf, export_merged, export_peft};
use crate::generate::{resolve_adapter_dir, with_adapter, LoadedModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Peft,
    Merged,
    Gguf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub model: String,
    /// A `finch train` run folder or a PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    #[arg(long)]
    pub out: PathBuf,
    /// Where the adapter is folded in: auto, cpu, cuda[:N], metal (auto: the GPU when there is one).
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceChoice,
}

pub fn run(args: ExportArgs) -> anyhow::Result<i32> {
    let written: Vec<PathBuf> = match args.format {
        ExportFormat::Peft => {
            let dir = resolve_adapter_dir(&args.adapter)?;
            // Loading checks that the folder is a complete, readable adapter before copying.
            crate::lora::load_adapter(&dir, &candle_core::Device::Cpu)?;
            export_peft(&dir, &args.out)?;
            vec![args.out.clone()]
        }
        ExportFormat::Merged | ExportFormat::Gguf => {
            let device = args.device.open()?;
            let loaded = LoadedModel::open_on(&args.model, &device)
                .with_context(|| format!("cannot open model `{}`", args.model))?;
            let model = with_adapter(&loaded.model, &args.adapter)
                .with_context(|| format!("cannot load adapter `{}`", args.adapter.display()))?;
            if args.format == ExportFormat::Merged {
                export_merged(&loaded.files, &loaded.format, &model, &args.out)?;
                vec![args.out.clone()]
            } else {
                let mut paths = export_gguf(&loaded.files, &loaded.format, &model, &args.out)?;
                paths.push(args.out.join("Modelfile"));
                paths
            }
        }
    };
    let v = serde_json::json!({
        "format": format!("{:?}", args.format).to_lowercase(),
        "written": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    println!("{v}");
    Ok(0)
}
