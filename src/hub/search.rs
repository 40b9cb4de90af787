//! Model search: `/api/models` with the text-generation filter, turned into [`ModelSummary`]s that
//! say whether Finch can tune the model (a supported architecture, safetensors or GGUF weights,
//! and small enough for LoRA on a desktop).

use serde::Serialize;
use serde_json::Value;

use super::api::{encode_component, Client};
use super::Result;
use crate::model::Family;

/// Models above this many parameters are not offered by default. LoRA in f32 on a desktop CPU
/// is practical up to roughly the 1.5–1.7B models (SmolLM2-1.7B, Qwen2.5-1.5B); with a Q4_1/Q8_0
/// frozen base (`--precision q4_1`) the 3–4B instruction models fit too (Llama 3.2 3B, Qwen2.5
/// 3B, Phi-3.5-mini and Phi-4-mini at 3.8B), slowly.
pub const MAX_TUNABLE_PARAMETERS: u64 = 4_000_000_000;

/// The Hub can return up to this many models per page.
const MAX_PAGE: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchSort {
    #[default]
    Downloads,
    Likes,
}

impl SearchSort {
    fn api_name(self) -> &'static str {
        match self {
            SearchSort::Downloads => "downloads",
            SearchSort::Likes => "likes",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    pub text: String,
    pub limit: usize,
    /// Also list models Finch cannot tune (other architectures, pickle-only, too large).
    pub include_unsupported: bool,
    pub sort: SearchSort,
}

impl SearchQuery {
    pub fn new(text: impl Into<String>) -> Self {
        SearchQuery {
            text: text.into(),
            limit: 20,
            include_unsupported: false,
            sort: SearchSort::Downloads,
        }
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSummary {
    pub id: String,
    pub downloads: u64,
    pub likes: u64,
    /// From the `license:…` tag.
    pub license: Option<String>,
    /// From the safetensors or GGUF metadata the Hub computes.
    pub parameters: Option<u64>,
    /// Total size of the repo's files.
    pub storage_bytes: Option<u64>,
    /// `model_type` from config.json (or the GGUF architecture).
    pub model_type: Option<String>,
    pub has_safetensors: bool,
    pub has_gguf: bool,
    /// Needs accepting a licence or a token.
    pub gated: bool,
    pub supported: bool,
    /// Why Finch cannot tune it, when `supported` is false.
    pub unsupported_reason: Option<String>,
}

pub(crate) fn search(client: &Client, query: &SearchQuery) -> Result<Vec<ModelSummary>> {
    if query.limit == 0 {
        return Ok(Vec::new());
    }
    // Unsupported results are dropped here, so ask for more than will be shown.
    let page = if query.include_unsupported {
        query.limit.min(MAX_PAGE)
    } else {
        (query.limit * 5).clamp(query.limit.min(MAX_PAGE), MAX_PAGE)
    };
    let mut params = vec![
        format!("search={}", encode_component(query.text.trim())),
        "filter=text-generation".to_string(),
        format!("sort={}", query.sort.api_name()),
        "direction=-1".to_string(),
        format!("limit={page}"),
    ];
    for field in [
        "downloads",
        "likes",
        "tags",
        "config",
        "safetensors",
        "gguf",
        "gated",
        "usedStorage",
    ] {
        params.push(format!("expand%5B%5D={field}"));
    }
    let raw = client.search(&params.join("&"))?;
    Ok(raw
        .iter()
        .filter_map(summarize)
        .filter(|m| query.include_unsupported || m.supported)
        .take(query.limit)
        .collect())
}

/// Reads one entry of the `/api/models` answer; `None` when it has no id.
pub(crate) fn summarize(value: &Value) -> Option<ModelSummary> {
    let id = value.get("id").or_else(|| value.get("modelId"))?.as_str()?.to_string();
    let tags: Vec<&str> = value
        .get("tags")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let number = |v: Option<&Value>| v.and_then(Value::as_u64);
    let safetensors = value.get("safetensors").filter(|v| !v.is_null());
    let gguf = value.get("gguf").filter(|v| !v.is_null());
    let has_safetensors = safetensors.is_some() || tags.contains(&"safetensors");
    let has_gguf = gguf.is_some() || tags.contains(&"gguf");
    let parameters =
        number(safetensors.and_then(|s| s.get("total"))).or_else(|| number(gguf.and_then(|g| g.get("total"))));
    let model_type = value
        .get("config")
        .and_then(|c| c.get("model_type"))
        .and_then(Value::as_str)
        .or_else(|| gguf.and_then(|g| g.get("architecture")).and_then(Value::as_str))
        .map(str::to_string)
        .or_else(|| {
            // Without config metadata, the architecture usually appears as a tag.
            tags.iter()
                .find(|t| Family::from_model_type(t).is_some())
                .map(|t| t.to_string())
        });
    let license = tags.iter().find_map(|t| t.strip_prefix("license:")).map(str::to_string);
    let gated = match value.get("gated") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty() && s != "false",
        _ => false,
    };

    let unsupported_reason = match (&model_type, parameters) {
        (None, _) => Some("architecture unknown".to_string()),
        (Some(mt), _) if Family::from_model_type(mt).is_none() => {
            Some(format!("architecture `{mt}` (Finch supports {})", Family::SUPPORTED))
        }
        _ if !has_safetensors && !has_gguf => Some("no safetensors or GGUF weights".to_string()),
        (_, Some(n)) if n > MAX_TUNABLE_PARAMETERS => Some(format!(
            "{:.1}B parameters is above the {:.0}B Finch tunes",
            n as f64 / 1e9,
            MAX_TUNABLE_PARAMETERS as f64 / 1e9
        )),
        _ => None,
    };
    Some(ModelSummary {
        id,
        downloads: number(value.get("downloads")).unwrap_or(0),
        likes: number(value.get("likes")).unwrap_or(0),
        license,
        parameters,
        storage_bytes: number(value.get("usedStorage")),
        model_type,
        has_safetensors,
        has_gguf,
        gated,
        supported: unsupported_reason.is_none(),
        unsupported_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn summary_reads_real_hub_fields() {
        // Shape of a real `/api/models?expand[]=…` entry for SmolLM2-135M-Instruct.
        let v = json!({
            "_id": "x", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "downloads": 123456, "likes": 200,
            "tags": ["transformers", "safetensors", "llama", "text-generation", "license:apache-2.0"],
            "config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
            "safetensors": {"parameters": {"BF16": 134515008}, "total": 134515008},
            "gated": false, "usedStorage": 1100000000u64
        });
        let s = summarize(&v).unwrap();
        assert_eq!(s.id, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(s.license.as_deref(), Some("apache-2.0"));
        assert_eq!(s.parameters, Some(134515008));
        assert_eq!(s.model_type.as_deref(), Some("llama"));
        assert!(s.supported && !s.gated && s.has_safetensors);

        let big = json!({"id": "a/big", "tags": ["qwen2", "safetensors"], "safetensors": {"total": 7_600_000_000u64}, "gated": "manual"});
        let s = summarize(&big).unwrap();
        assert!(!s.supported && s.gated);
        assert!(s.unsupported_reason.unwrap().contains("7.6B"));

        let gguf = json!({"id": "a/g", "tags": ["gguf"], "gguf": {"total": 134515008, "architecture": "llama"}});
        assert!(summarize(&gguf).unwrap().supported);

        // Gemma 3 text models, as safetensors (model_type gemma3_text) and as llama.cpp GGUF
        // (architecture gemma3).
        let gemma = json!({
            "id": "google/gemma-3-270m-it", "tags": ["transformers", "safetensors", "gemma3_text"],
            "config": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"},
            "safetensors": {"total": 268_098_176u64}, "gated": "manual"
        });
        let s = summarize(&gemma).unwrap();
        assert!(s.supported, "{:?}", s.unsupported_reason);
        let gemma_gguf = json!({"id": "a/gemma-3-1b-GGUF", "tags": ["gguf"], "gguf": {"total": 999_885_952u64, "architecture": "gemma3"}});
        assert!(summarize(&gemma_gguf).unwrap().supported);

        // Phi-3.5-mini / Phi-4-mini (3.8B, Phi3ForCausalLM) as safetensors and as llama.cpp GGUF.
        let phi = json!({
            "id": "microsoft/Phi-4-mini-instruct", "tags": ["transformers", "safetensors", "phi3"],
            "config": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"},
            "safetensors": {"total": 3_836_021_760u64}
        });
        let s = summarize(&phi).unwrap();
        assert!(s.supported, "{:?}", s.unsupported_reason);
        let phi_gguf = json!({"id": "a/Phi-3.5-mini-instruct-GGUF", "tags": ["gguf"], "gguf": {"total": 3_821_079_552u64, "architecture": "phi3"}});
        assert!(summarize(&phi_gguf).unwrap().supported);

        let pickle = json!({"id": "a/p", "tags": ["pytorch", "llama"], "config": {"model_type": "llama"}});
        assert!(summarize(&pickle)
            .unwrap()
            .unsupported_reason
            .unwrap()
            .contains("safetensors"));
    }
}
