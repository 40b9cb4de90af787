//! `finch hub …`: search the Hugging Face Hub, download models into the shared cache with a
//! progress bar, list and remove cached models, and save an access token. Settings come from the
//! same environment variables Python's `huggingface_hub` reads (`HF_ENDPOINT`, `HF_HOME`,
//! `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE`), overridable with flags. Human output goes to
//! stderr or a table on stdout; `--json` and the download's last line are machine-readable.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use serde_json::json;

use crate::cli::progress::{human_bytes, DownloadBar};
use crate::hub::token::{finch_token_path, find_token, save_token, TokenSource};
use crate::hub::{DownloadRequest, Hub, HubError, HubOptions, ModelSummary, SearchQuery, SearchSort, Token};

#[derive(Debug, clap::Args)]
pub struct HubArgs {
    /// Hub server [default: $HF_ENDPOINT, else https://huggingface.co]
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    /// Hub cache folder [default: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub]
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: HubCommand,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SortArg {
    Downloads,
    Likes,
}

#[derive(Debug, clap::Subcommand)]
pub enum HubCommand {
    /// Search text-generation models; only small models Finch can tune unless --all
    Search {
        query: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Also show models Finch cannot tune (other architectures, pickle-only, too large)
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = SortArg::Downloads)]
        sort: SortArg,
        /// Print the results as JSON
        #[arg(long)]
        json: bool,
    },
    /// Download the files Finch needs (config, tokenizer, weights) into the cache
    Download {
        /// Model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct
        id: String,
        /// Branch, tag or commit
        #[arg(long, default_value = "main")]
        revision: String,
        /// For repos with GGUF files: a file name or a quantisation such as Q4_K_M
        /// [default for GGUF-only repos: Q8_0, then Q4_K_M, …]
        #[arg(long)]
        gguf_file: Option<String>,
    },
    /// List cached models and their disk use
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a model from the cache
    Rm { id: String },
    /// Save an access token for gated models (read from stdin)
    Login {
        /// Save without checking the token with the Hub
        #[arg(long)]
        no_verify: bool,
    },
}

/// Set by Ctrl-C during a download; the partial file is kept for resume.
static CANCEL: AtomicBool = AtomicBool::new(false);

pub fn run(args: HubArgs) -> anyhow::Result<i32> {
    let mut options = HubOptions::from_env();
    if let Some(endpoint) = args.endpoint {
        options = options.with_endpoint(endpoint);
    }
    if let Some(cache_dir) = args.cache_dir {
        options.cache_dir = cache_dir;
    }
    let hub = Hub::new(options);
    match args.command {
        HubCommand::Search {
            query,
            limit,
            all,
            sort,
            json,
        } => search(&hub, query, limit, all, sort, json),
        HubCommand::Download {
            id,
            revision,
            gguf_file,
        } => download(&hub, id, revision, gguf_file),
        HubCommand::List { json } => list(&hub, json),
        HubCommand::Rm { id } => {
            let freed_bytes = hub.remove(&id)?;
            eprintln!("removed {id} ({})", human_bytes(freed_bytes));
            println!("{}", json!({ "removed": id, "freed_bytes": freed_bytes }));
            Ok(0)
        }
        HubCommand::Login { no_verify } => login(&hub, no_verify),
    }
}

fn search(hub: &Hub, text: String, limit: usize, all: bool, sort: SortArg, as_json: bool) -> anyhow::Result<i32> {
    let query = SearchQuery {
        text,
        limit,
        include_unsupported: all,
        sort: match sort {
            SortArg::Downloads => SearchSort::Downloads,
            SortArg::Likes => SearchSort::Likes,
        },
    };
    let results = hub.search(&query)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(0);
    }
    if results.is_empty() {
        eprintln!(
            "no {}models matched `{}`{}",
            if all { "" } else { "supported " },
            query.text,
            if all { "" } else { " (--all shows every model)" }
        );
        return Ok(0);
    }
    print!("{}", search_table(&results, all));
    Ok(0)
}

fn search_table(results: &[ModelSummary], all: bool) -> String {
    let id_width = results.iter().map(|m| m.id.len()).max().unwrap_or(2).max(2);
    let mut out = format!(
        "{:<id_width$}  {:>9}  {:>6}  {:<14}  {:>12}{}\n",
        "ID",
        "DOWNLOADS",
        "LIKES",
        "LICENCE",
        "SIZE",
        if all { "  FINCH" } else { "" }
    );
    for m in results {
        let size = match (m.parameters, m.storage_bytes) {
            (Some(p), _) => format!("{} params", human_count(p)),
            (None, Some(b)) => human_bytes(b),
            (None, None) => "?".to_string(),
        };
        let mut licence = m.license.clone().unwrap_or_else(|| "?".to_string());
        if m.gated {
            licence.push_str(" (gated)");
        }
        let finch = if !all {
            String::new()
        } else if m.supported {
            "  yes".to_string()
        } else {
            format!("  no: {}", m.unsupported_reason.as_deref().unwrap_or("unsupported"))
        };
        out.push_str(&format!(
            "{:<id_width$}  {:>9}  {:>6}  {:<14}  {:>12}{finch}\n",
            m.id,
            human_count(m.downloads),
            human_count(m.likes),
            licence,
            size
        ));
    }
    out
}

fn download(hub: &Hub, id: String, revision: String, gguf_file: Option<String>) -> anyhow::Result<i32> {
    // Ctrl-C stops between chunks; a second handler (another command set one) is fine to skip.
    let _ = ctrlc::set_handler(|| CANCEL.store(true, Ordering::SeqCst));
    let request = DownloadRequest::new(&id)
        .with_revision(&revision)
        .with_gguf_file(gguf_file);
    let mut bar = DownloadBar::new();
    let result = hub.download(&request, &mut |event| bar.on_event(&event), &CANCEL);
    bar.finish_line();
    let snapshot = match result {
        Ok(path) => path,
        Err(err @ HubError::Cancelled { .. }) => {
            eprintln!("{err}");
            return Ok(130);
        }
        Err(err) => return Err(err.into()),
    };
    let commit = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    println!(
        "{}",
        json!({ "id": id, "revision": revision, "commit": commit, "path": snapshot })
    );
    Ok(0)
}

fn list(hub: &Hub, as_json: bool) -> anyhow::Result<i32> {
    let models = hub.list_cached()?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(0);
    }
    if models.is_empty() {
        eprintln!("no models in {}", hub.options().cache_dir.display());
        return Ok(0);
    }
    let id_width = models.iter().map(|m| m.id.len()).max().unwrap_or(2).max(2);
    println!("{:<id_width$}  {:>10}  REVISIONS", "ID", "SIZE");
    for m in &models {
        let revisions: Vec<String> = m
            .revisions
            .iter()
            .map(|r| {
                let short: String = r.commit.chars().take(8).collect();
                let refs = if r.refs.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.refs.join(", "))
                };
                let partial = if r.usable { "" } else { " [incomplete]" };
                format!("{short}{refs}{partial}")
            })
            .collect();
        println!(
            "{:<id_width$}  {:>10}  {}",
            m.id,
            human_bytes(m.size_bytes),
            revisions.join("; ")
        );
    }
    Ok(0)
}

fn login(hub: &Hub, no_verify: bool) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!(
            "Paste an access token from {}/settings/tokens and press Enter: ",
            hub.options().endpoint
        );
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the token from stdin")?;
    let Some(token) = Token::new(&line) else {
        bail!("no token given on stdin");
    };
    let user = if no_verify {
        None
    } else {
        match hub.whoami(&token) {
            Ok(name) => Some(name),
            Err(err @ HubError::Network { .. }) => {
                bail!("{err}; the token was not checked or saved (use --no-verify to save it anyway)")
            }
            Err(err) => return Err(err.into()),
        }
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let path = finch_token_path(&var);
    save_token(&path, &token)?;
    if let Some(name) = &user {
        eprintln!("token for {name} saved to {}", path.display());
    }
    // The lookup order gives these precedence; say so rather than silently using another token.
    match find_token(&var) {
        Some((_, TokenSource::Env)) => eprintln!("note: HF_TOKEN is set and takes precedence over the saved token"),
        Some((_, TokenSource::HuggingFaceFile(p))) => {
            eprintln!(
                "note: {} (from huggingface-cli login) takes precedence over the saved token",
                p.display()
            )
        }
        _ => {}
    }
    println!("{}", json!({ "saved": path, "user": user }));
    Ok(0)
}

/// [`crate::hub::resolve_model`] with a progress bar on stderr, for commands that accept a Hub id
/// as `--model`.
pub fn resolve_model_with_progress(spec: &str) -> anyhow::Result<PathBuf> {
    let mut bar = DownloadBar::new();
    let cancel = AtomicBool::new(false);
    let result = crate::hub::resolve_model_with(spec, &HubOptions::from_env(), &mut |e| bar.on_event(&e), &cancel);
    bar.finish_line();
    Ok(result?)
}

fn human_count(n: u64) -> String {
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}B", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_naturally() {
        assert_eq!(human_count(134_515_008), "134.5M");
        assert_eq!(human_count(1_711_376_384), "1.7B");
    }
}
