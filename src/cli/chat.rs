//! `finch chat`: talk to a model (optionally with an adapter) on the terminal, with streaming;
//! `--prompt` for one answer, `--json` for one JSON object per answer. Also the sampling flags
//! shared with `finch compare`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::data::{Message, Role};
use crate::generate::{
    chat_with, with_adapter, CachedTransformer, ChatFormat, Decoder, GenerateOptions, Generation, LoadedModel,
    SamplingParams,
};
use crate::model::quantized::QuantizedModel;

/// Sampling flags (greedy unless `--temperature` is above 0).
#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// Most tokens in one answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A string that ends the answer (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl GenArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model folder, .gguf file (or folder holding one), or Hub id.
    #[arg(long)]
    pub model: String,
    /// A `finch train` run folder or a PEFT adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Answer this one message and exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// One JSON object per answer (`text`, `tokens`, `finish_reason`, ...).
    #[arg(long)]
    pub json: bool,
    /// Run a Q4_1/Q8_0 GGUF model without dequantizing (Finch's integer kernels; less memory,
    /// faster decoding); an --adapter is applied unmerged in f32.
    #[arg(long)]
    pub quantized: bool,
    /// Fold the adapter into the weights (faster decoding; the changed matrices are copied).
    #[arg(long, requires = "adapter", conflicts_with = "quantized")]
    pub merge: bool,
    /// auto, cpu, cuda[:N], metal (auto: the GPU when there is one; --quantized runs on the CPU).
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceChoice,
    /// The chat template's `enable_thinking` (Qwen3; default: the template's own, thinking on).
    #[arg(long, value_name = "true|false")]
    pub enable_thinking: Option<bool>,
    #[command(flatten)]
    pub gen: GenArgs,
}

/// What `--json` prints for one answer.
#[derive(Debug, Serialize)]
pub struct AnswerJson<'a> {
    pub model: &'a str,
    pub text: &'a str,
    pub tokens: usize,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub decode_tokens_per_sec: f64,
}

impl<'a> AnswerJson<'a> {
    pub fn new(model: &'a str, g: &'a Generation) -> Self {
        AnswerJson {
            model,
            text: &g.text,
            tokens: g.token_ids.len(),
            finish_reason: g.finish_reason.as_str(),
            prompt_tokens: g.prompt_tokens,
            decode_tokens_per_sec: g.decode_tokens_per_sec(),
        }
    }
}

pub fn run(args: ChatArgs) -> anyhow::Result<i32> {
    let opts = args.gen.options();
    opts.sampling.validate()?;
    eprintln!("loading {} ...", args.model);
    // The f32 model (base weights shared with the adapter clone) or the quantized GGUF.
    let (format, f32_model, mut quantized, label) = if args.quantized {
        args.device.cpu_only("--quantized")?;
        let files =
            crate::hub::open_model(&args.model).with_context(|| format!("cannot open model `{}`", args.model))?;
        let format = ChatFormat::from_files(&files)?;
        let mut q = QuantizedModel::open(&files.path, &files.config)?;
        let label = match &args.adapter {
            Some(a) => {
                q.set_adapter(a)
                    .with_context(|| format!("cannot load adapter `{}`", a.display()))?;
                format!("{} (quantized)", a.display())
            }
            None => "base (quantized)".to_string(),
        };
        (format, None, Some(q), label)
    } else {
        let device = args.device.open()?;
        let loaded = LoadedModel::open_on(&args.model, &device)
            .with_context(|| format!("cannot open model `{}`", args.model))?;
        let (model, label) = match &args.adapter {
            Some(a) => {
                let tuned =
                    with_adapter(&loaded.model, a).with_context(|| format!("cannot load adapter `{}`", a.display()))?;
                if args.merge {
                    (tuned.merged()?, format!("{} (merged)", a.display()))
                } else {
                    (tuned, a.display().to_string())
                }
            }
            None => (loaded.model.clone(), "base".to_string()),
        };
        (loaded.format, Some(model), None, label)
    };
    let mut format = format;
    if let Some(on) = args.enable_thinking {
        format.template = format
            .template
            .clone()
            .with_variable("enable_thinking", serde_json::Value::Bool(on))?;
    }
    let mut cached = f32_model.as_ref().map(CachedTransformer::new);
    let decoder: &mut (dyn Decoder + Send) = match (&mut cached, &mut quantized) {
        (Some(c), _) => c,
        (None, Some(q)) => q,
        (None, None) => anyhow::bail!("no model loaded"),
    };
    let mut history = vec![];
    if let Some(s) = &args.system {
        history.push(Message::new(Role::System, s.clone()));
    }
    // Ctrl-C stops the answer being generated; a second one (or one at the prompt) exits.
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (cancel.clone(), generating.clone());
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) && !cancel.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(130);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let mut answer = |history: &mut Vec<Message>, user: String| -> anyhow::Result<()> {
        history.push(Message::new(Role::User, user));
        cancel.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let g = chat_with(decoder, &format, history, &opts, &cancel, &mut |piece| {
            if !args.json {
                // A closed stdout (piped into `head`) is not an error worth aborting for.
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        });
        generating.store(false, Ordering::SeqCst);
        let g = match g {
            Ok(g) => g,
            Err(e) => {
                history.pop();
                return Err(e.into());
            }
        };
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&AnswerJson::new(&label, &g))?)?;
        } else {
            writeln!(out)?;
            if g.finish_reason != crate::generate::FinishReason::Eos {
                eprintln!("[{}]", g.finish_reason.as_str());
            }
        }
        history.push(Message::new(Role::Assistant, g.text));
        Ok(())
    };
    if let Some(p) = &args.prompt {
        answer(&mut history, p.clone())?;
        return Ok(0);
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {label}; /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        let line = line.trim_end();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(usize::from(args.system.is_some()));
                continue;
            }
            _ => {}
        }
        if let Err(e) = answer(&mut history, line.to_string()) {
            // In a conversation an over-long message is reported and the chat goes on.
            eprintln!("error: {e:#}");
            if !interactive {
                return Ok(1);
            }
        }
    }
    Ok(0)
}
