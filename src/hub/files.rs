//! Which files of a Hub repository Finch downloads: the config and tokenizer files, and either
//! safetensors weights (single file or index + shards) or one GGUF file. Pickle-only repos are
//! refused here, before anything is downloaded.

use std::collections::BTreeSet;

use super::{HubError, Result};

/// Small files downloaded whenever the repo has them.
pub(crate) const SUPPORT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

pub(crate) const SAFETENSORS_SINGLE: &str = "model.safetensors";
pub(crate) const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// GGUF quantisations tried in order when a repo has several and none was named: Q8_0 is nearly
/// lossless for small models, then the usual size/quality compromises.
pub const GGUF_QUANT_PREFERENCE: &[&str] = &[
    "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_K_S", "Q5_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32",
];

/// What to download from a repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Weights {
    Single,
    /// The index is downloaded first; its shards are added once it is read.
    Sharded,
    Gguf(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selection {
    /// Files to fetch before the shards are known (support files, index or single weights file).
    pub files: Vec<String>,
    pub weights: Weights,
}

/// A repo file name safe to turn into a path inside the snapshot folder.
pub(crate) fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains(['\\', '\0', '\n', '\r'])
        && !name.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

fn is_pickle_or_foreign_weights(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

fn is_split_gguf(name: &str) -> bool {
    // llama.cpp's split files: `model-00001-of-00003.gguf`.
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".gguf") && lower.contains("-of-")
}

/// Chooses the files to download from the repo's file list.
pub(crate) fn select(id: &str, siblings: &[String], gguf_file: Option<&str>) -> Result<Selection> {
    let present: BTreeSet<&str> = siblings.iter().map(String::as_str).collect();
    let mut files: Vec<String> = SUPPORT_FILES
        .iter()
        .filter(|f| present.contains(**f))
        .map(|f| f.to_string())
        .collect();
    let ggufs: Vec<&str> = siblings
        .iter()
        .map(String::as_str)
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf") && is_safe_file_name(f))
        .collect();

    let weights = if let Some(wanted) = gguf_file {
        Weights::Gguf(find_gguf(id, &ggufs, wanted)?.to_string())
    } else if present.contains(SAFETENSORS_INDEX) {
        Weights::Sharded
    } else if present.contains(SAFETENSORS_SINGLE) {
        Weights::Single
    } else if let Some(chosen) = pick_gguf(&ggufs) {
        Weights::Gguf(chosen.to_string())
    } else {
        let pickles: Vec<&str> = siblings
            .iter()
            .map(String::as_str)
            .filter(|f| is_pickle_or_foreign_weights(f))
            .collect();
        if pickles.is_empty() {
            return Err(HubError::NoWeights { id: id.to_string() });
        }
        return Err(HubError::PickleOnly {
            id: id.to_string(),
            files: pickles.join(", "),
        });
    };

    match &weights {
        Weights::Single => files.push(SAFETENSORS_SINGLE.to_string()),
        Weights::Sharded => files.push(SAFETENSORS_INDEX.to_string()),
        Weights::Gguf(name) => files.push(name.clone()),
    }
    if !matches!(weights, Weights::Gguf(_)) && !present.contains("config.json") {
        return Err(HubError::MissingFile {
            id: id.to_string(),
            file: "config.json".to_string(),
            weights: "safetensors weights".to_string(),
        });
    }
    Ok(Selection { files, weights })
}

/// The GGUF named by `wanted`: a path in the repo, a file name, or a quantisation such as
/// `Q4_K_M` that exactly one (unsplit) file names.
fn find_gguf<'a>(id: &str, ggufs: &[&'a str], wanted: &str) -> Result<&'a str> {
    if let Some(found) = ggufs
        .iter()
        .find(|f| **f == wanted || f.rsplit('/').next() == Some(wanted))
    {
        return Ok(found);
    }
    let quant = wanted.to_ascii_uppercase();
    let by_quant: Vec<&str> = ggufs
        .iter()
        .copied()
        .filter(|f| !is_split_gguf(f) && names_quant(f, &quant))
        .collect();
    match by_quant.as_slice() {
        [one] => Ok(one),
        _ => Err(HubError::GgufNotFound {
            id: id.to_string(),
            wanted: wanted.to_string(),
            available: if ggufs.is_empty() {
                "none".to_string()
            } else {
                ggufs.join(", ")
            },
        }),
    }
}

/// The preferred GGUF among `ggufs` (split files are skipped: Finch loads one file).
fn pick_gguf<'a>(ggufs: &[&'a str]) -> Option<&'a str> {
    let whole: Vec<&str> = ggufs.iter().copied().filter(|f| !is_split_gguf(f)).collect();
    for quant in GGUF_QUANT_PREFERENCE {
        if let Some(found) = whole.iter().find(|f| names_quant(f, quant)) {
            return Some(found);
        }
    }
    let mut sorted = whole;
    sorted.sort();
    sorted.first().copied()
}

/// `smollm2-135m-instruct-q8_0.gguf` names `Q8_0`; `IQ4_XS` does not name `Q4_0`-like prefixes by accident.
fn names_quant(file: &str, quant: &str) -> bool {
    let upper = file.rsplit('/').next().unwrap_or(file).to_ascii_uppercase();
    let bytes = upper.as_bytes();
    let mut start = 0;
    while let Some(pos) = upper[start..].find(quant) {
        let at = start + pos;
        let end = at + quant.len();
        let before_ok = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let after_ok = end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        if before_ok && after_ok {
            return true;
        }
        start = at + 1;
    }
    false
}

/// The distinct shard files listed in a `model.safetensors.index.json`, sorted.
pub(crate) fn index_shards(text: &str) -> std::result::Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| "no `weight_map` object".to_string())?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("`weight_map.{tensor}` is not a file name"))?;
        if !is_safe_file_name(file) {
            return Err(format!("shard name `{file}` is not a plain relative path"));
        }
        shards.insert(file.to_string());
    }
    Ok(shards.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn safetensors_repo_gets_support_files_and_weights_only() {
        let sel = select(
            "o/m",
            &names(&[
                "README.md",
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "tokenizer.json",
                "tokenizer_config.json",
                "onnx/model.onnx",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(sel.weights, Weights::Single);
        assert_eq!(
            sel.files,
            names(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors"
            ])
        );
    }

    #[test]
    fn pickle_only_repo_is_refused_with_the_files_named() {
        let err = select("o/m", &names(&["config.json", "pytorch_model.bin"]), None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("pytorch_model.bin") && msg.contains("never unpickles"),
            "{msg}"
        );
        assert!(matches!(
            select("o/m", &names(&["README.md"]), None),
            Err(HubError::NoWeights { .. })
        ));
    }

    #[test]
    fn gguf_choice_follows_preference_and_explicit_names() {
        let repo = names(&[
            "m.IQ4_XS.gguf",
            "m.Q4_K_M.gguf",
            "m.Q8_0.gguf",
            "m.Q8_0-00001-of-00002.gguf",
            "README.md",
        ]);
        assert_eq!(
            select("o/m", &repo, None).unwrap().weights,
            Weights::Gguf("m.Q8_0.gguf".into())
        );
        let no_q8 = names(&["m.IQ4_XS.gguf", "m.Q4_K_M.gguf", "m.Q4_K_S.gguf"]);
        assert_eq!(
            select("o/m", &no_q8, None).unwrap().weights,
            Weights::Gguf("m.Q4_K_M.gguf".into())
        );
        assert_eq!(
            select("o/m", &repo, Some("m.IQ4_XS.gguf")).unwrap().weights,
            Weights::Gguf("m.IQ4_XS.gguf".into())
        );
        assert_eq!(
            select("o/m", &repo, Some("q4_k_m")).unwrap().weights,
            Weights::Gguf("m.Q4_K_M.gguf".into())
        );
        let err = select("o/m", &repo, Some("nope.gguf")).unwrap_err().to_string();
        assert!(err.contains("m.Q4_K_M.gguf") && err.contains("nope.gguf"), "{err}");
        assert!(!names_quant("m.IQ4_XS.gguf", "Q4_0"));
        assert!(!names_quant("m.Q4_K_M.gguf", "Q4_K"));
    }

    #[test]
    fn index_shards_are_validated() {
        let ok = r#"{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            index_shards(ok).unwrap(),
            names(&["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
        );
        assert!(index_shards(r#"{"weight_map": {"a": "../../evil"}}"#).is_err());
        assert!(index_shards(r#"{"metadata": {}}"#).is_err());
    }
}
