//! `finch compare`: the same prompt to the base model and each adapter, answers side by side
//! (columns on a terminal, sections in a pipe, or one JSON object with `--json`). The base
//! weights are loaded once and shared by every adapter (with `--quantized`, one quantized model
//! whose adapter is swapped between answers).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;

use crate::cli::chat::{AnswerJson, GenArgs};
use crate::data::{Message, Role};
use crate::generate::{chat, chat_with, with_adapter, ChatFormat, Generation, LoadedModel};
use crate::model::quantized::QuantizedModel;

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[arg(long)]
    pub model: String,
    /// A `finch train` run folder or a PEFT adapter folder (repeatable).
    #[arg(long, required = true)]
    pub adapter: Vec<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub system: Option<String>,
    /// One JSON object: `prompt` and `answers` (one per model, base first).
    #[arg(long)]
    pub json: bool,
    /// Run a Q4_1/Q8_0 GGUF model without dequantizing (as `chat --quantized`); adapters are
    /// applied unmerged in f32.
    #[arg(long)]
    pub quantized: bool,
    /// auto, cpu, cuda[:N], metal (auto: the GPU when there is one; --quantized runs on the CPU).
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceChoice,
    #[command(flatten)]
    pub gen: GenArgs,
}

pub fn run(args: CompareArgs) -> anyhow::Result<i32> {
    let opts = args.gen.options();
    opts.sampling.validate()?;
    let mut messages = vec![];
    if let Some(s) = &args.system {
        messages.push(Message::new(Role::System, s.clone()));
    }
    messages.push(Message::new(Role::User, args.prompt.clone()));
    let no_cancel = AtomicBool::new(false);
    let mut answers: Vec<(String, Generation)> = vec![];
    if args.quantized {
        args.device.cpu_only("--quantized")?;
        let files =
            crate::hub::open_model(&args.model).with_context(|| format!("cannot open model `{}`", args.model))?;
        let format = ChatFormat::from_files(&files)?;
        let mut q = QuantizedModel::open(&files.path, &files.config)?;
        let sides = std::iter::once(None).chain(args.adapter.iter().map(Some));
        for adapter in sides {
            let label = match adapter {
                None => {
                    q.clear_adapter();
                    "base".to_string()
                }
                Some(a) => {
                    q.set_adapter(a)
                        .with_context(|| format!("cannot load adapter `{}`", a.display()))?;
                    a.display().to_string()
                }
            };
            eprintln!("generating with {label} (quantized) ...");
            let g = chat_with(&mut q, &format, &messages, &opts, &no_cancel, &mut |_| {})?;
            answers.push((label, g));
        }
    } else {
        let device = args.device.open()?;
        let loaded = LoadedModel::open_on(&args.model, &device)
            .with_context(|| format!("cannot open model `{}`", args.model))?;
        let mut models = vec![("base".to_string(), loaded.model.clone())];
        for a in &args.adapter {
            let m = with_adapter(&loaded.model, a).with_context(|| format!("cannot load adapter `{}`", a.display()))?;
            models.push((a.display().to_string(), m));
        }
        for (label, model) in &models {
            eprintln!("generating with {label} ...");
            let g = chat(model, &loaded.format, &messages, &opts, &no_cancel, &mut |_| {})?;
            answers.push((label.clone(), g));
        }
    }
    if args.json {
        let list: Vec<AnswerJson> = answers.iter().map(|(l, g)| AnswerJson::new(l, g)).collect();
        let v = serde_json::json!({ "prompt": args.prompt, "answers": list });
        println!("{}", serde_json::to_string(&v)?);
    } else if std::io::stdout().is_terminal() {
        let width: usize = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(120);
        let cols: Vec<(&str, &str)> = answers.iter().map(|(l, g)| (l.as_str(), g.text.as_str())).collect();
        print!("{}", columns(&cols, width));
    } else {
        for (label, g) in &answers {
            println!(
                "=== {label} [{}, {} tokens]",
                g.finish_reason.as_str(),
                g.token_ids.len()
            );
            println!("{}\n", g.text);
        }
    }
    Ok(0)
}

/// Lays out `(title, text)` pairs as side-by-side columns `width` characters wide in total,
/// wrapping words (and breaking words longer than a column).
pub fn columns(items: &[(&str, &str)], width: usize) -> String {
    let n = items.len().max(1);
    let col = (width.saturating_sub(3 * (n - 1)) / n).max(10);
    let wrapped: Vec<Vec<String>> = items
        .iter()
        .map(|(title, text)| {
            let mut lines = wrap(title, col);
            lines.push("-".repeat(col));
            lines.extend(wrap(text, col));
            lines
        })
        .collect();
    let rows = wrapped.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = String::new();
    for r in 0..rows {
        let cells: Vec<String> = wrapped
            .iter()
            .map(|lines| {
                let cell = lines.get(r).map(String::as_str).unwrap_or("");
                format!("{cell}{}", " ".repeat(col - cell.chars().count()))
            })
            .collect();
        out.push_str(cells.join(" | ").trim_end());
        out.push('\n');
    }
    out
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![];
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split_whitespace() {
            let mut word: Vec<char> = word.chars().collect();
            while word.len() > width {
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
                lines.push(word.drain(..width).collect());
            }
            let word: String = word.into_iter().collect();
            let len = line.chars().count();
            if len > 0 && len + 1 + word.chars().count() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_wrap_and_align() {
        let out = columns(&[("base", "one two three four"), ("tuned", "a\nbbbbbbbbbbbbbb")], 23);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "base       | tuned");
        assert_eq!(lines[1], "---------- | ----------");
        assert_eq!(lines[2], "one two    | a");
        assert_eq!(lines[3], "three four | bbbbbbbbbb");
        assert_eq!(lines[4], "           | bbbb");
    }
}
