//! The tokenizer stored in a GGUF file's metadata, rebuilt as a `tokenizers::Tokenizer` that
//! encodes exactly like the Hugging Face `tokenizer.json` it was converted from. Only byte-level
//! BPE (`tokenizer.ggml.model = "gpt2"`, used by SmolLM, Llama 3 and Qwen2) is rebuilt; GGUF
//! keeps only the vocabulary, merges and a pre-tokenizer *name* (`tokenizer.ggml.pre`), so the
//! pre-tokenizer that name stands for is spelled out here, as Hugging Face ships it.
//!
//! The reverse direction (tokenizer → GGUF metadata) is `GgufTokenizerMetadata`.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::model::gguf::Meta;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// The `tokenizer.ggml.pre` values Finch can rebuild, for error messages.
pub const SUPPORTED_PRE: &str =
    "default, gpt2, smollm, starcoder, refact, llama-bpe, llama3, llama-v3, smaug-bpe, dbrx, qwen2, deepseek-r1-qwen";

/// Llama 3's split pattern (its tokenizer.json; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern: Llama 3's with single digits.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text is split into words before BPE, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizerKind {
    /// GPT-2's byte-level regex.
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    Llama3,
    Qwen2,
}

impl PreTokenizerKind {
    fn from_pre(pre: &str) -> Option<Self> {
        match pre {
            "default" | "gpt2" | "gpt-2" => Some(Self::Gpt2),
            "smollm" | "starcoder" | "refact" => Some(Self::DigitsThenGpt2),
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" => Some(Self::Llama3),
            "qwen2" | "deepseek-r1-qwen" => Some(Self::Qwen2),
            _ => None,
        }
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper> {
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("cannot compile the pre-tokenizer pattern: {e}")))?;
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])))
        };
        Ok(match self {
            Self::Gpt2 => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            Self::DigitsThenGpt2 => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            Self::Llama3 => split(LLAMA3_PATTERN)?,
            Self::Qwen2 => split(QWEN2_PATTERN)?,
        })
    }
}

/// Rebuilds the tokenizer described by GGUF metadata.
pub(crate) fn tokenizer_from_gguf(meta: &Meta<'_>) -> Result<Tokenizer> {
    let path = meta.path;
    let invalid = |reason: String| Error::invalid(path, "GGUF tokenizer", reason);
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
        invalid(
            "the file has no tokenizer (`tokenizer.ggml.model` is missing); put the model's tokenizer.json beside it"
                .into(),
        )
    })?;
    if model != "gpt2" {
        return Err(invalid(format!(
            "`tokenizer.ggml.model` is `{model}`, and Finch rebuilds only byte-level BPE (`gpt2`) tokenizers from \
             GGUF metadata; put the model's tokenizer.json beside the GGUF file"
        )));
    }
    let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let kind = PreTokenizerKind::from_pre(pre).ok_or_else(|| {
        invalid(format!(
            "`tokenizer.ggml.pre` is `{pre}`, which Finch does not know (known: {SUPPORTED_PRE}); put the model's \
             tokenizer.json beside the GGUF file"
        ))
    })?;
    let tokens = meta
        .string_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| invalid("`tokenizer.ggml.tokens` is missing".into()))?;
    let types = meta.int_array("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(invalid(format!(
            "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
            types.len(),
            tokens.len()
        )));
    }
    let type_of = |i: usize| types.get(i).copied().unwrap_or(token_type::NORMAL);

    // Padding entries (`[PAD123]`, type UNUSED) exist only to fill the embedding matrix; the
    // Hugging Face tokenizer has no such tokens, so they stay out of the vocabulary.
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        if type_of(id) != token_type::UNUSED {
            vocab.entry(tok.to_string()).or_insert(id as u32);
        }
    }
    let merges = meta
        .string_array("tokenizer.ggml.merges")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_string(), b.to_string())),
            _ => Err(invalid(format!(
                "merge {i} `{m}` is not two symbols separated by one space"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(kind == PreTokenizerKind::Llama3)
        .build()
        .map_err(|e| invalid(format!("cannot build the BPE model: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    if kind == PreTokenizerKind::Qwen2 {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| invalid(format!("cannot set the normalizer: {e}")))?;
    }
    tokenizer.with_pre_tokenizer(Some(kind.pre_tokenizer()?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.with_post_processor(Some(post_processor(meta, &tokens)?));

    let mut specials = vec![];
    let mut user_defined = vec![];
    for (id, tok) in tokens.iter().enumerate() {
        match type_of(id) {
            token_type::CONTROL => specials.push(AddedToken::from(tok.to_string(), true).normalized(false)),
            // llama.cpp marks added tokens that are not special as user-defined.
            token_type::USER_DEFINED => user_defined.push(AddedToken::from(tok.to_string(), false).normalized(false)),
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| invalid(format!("cannot add the control tokens: {e}")))?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| invalid(format!("cannot add the user-defined tokens: {e}")))?;
    Ok(tokenizer)
}

/// Byte-level offsets, plus BOS/EOS when the GGUF says the tokenizer adds them (Llama 3 does).
fn post_processor(meta: &Meta<'_>, tokens: &[&str]) -> Result<PostProcessorWrapper> {
    let byte_level = PostProcessorWrapper::ByteLevel(ByteLevel::new(true, false, true));
    let token = |key: &str| -> Result<Option<(String, u32)>> {
        Ok(match meta.usize(key)? {
            Some(id) => tokens.get(id).map(|t| (t.to_string(), id as u32)),
            None => None,
        })
    };
    let bos = if meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false) {
        token("tokenizer.ggml.bos_token_id")?
    } else {
        None
    };
    let eos = if meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) {
        token("tokenizer.ggml.eos_token_id")?
    } else {
        None
    };
    if bos.is_none() && eos.is_none() {
        return Ok(byte_level);
    }
    let mut single = vec![];
    let mut pair = vec![];
    let mut special_tokens = vec![];
    if let Some((t, id)) = &bos {
        single.push(t.clone());
        pair.push(t.clone());
        special_tokens.push((t.clone(), *id));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some((t, id)) = &eos {
        single.push(t.clone());
        pair.push(t.clone());
        special_tokens.push((t.clone(), *id));
    }
    if let Some((t, _)) = &bos {
        pair.push(format!("{t}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((t, _)) = &eos {
        pair.push(format!("{t}:1"));
    }
    let bad = |e: String| {
        Error::invalid(
            meta.path,
            "GGUF tokenizer",
            format!("cannot build the BOS/EOS template: {e}"),
        )
    };
    let template = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(bad)?
        .try_pair(pair.join(" "))
        .map_err(bad)?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok(PostProcessorWrapper::Sequence(ProcessorSequence::new(vec![
        byte_level,
        PostProcessorWrapper::Template(template),
    ])))
}

/// The tokenizer part of a GGUF file's metadata, as `convert_hf_to_gguf.py` writes it for a
/// byte-level BPE tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizerMetadata {
    /// `tokenizer.ggml.model`; `gpt2` for byte-level BPE.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `smollm`, `llama-bpe`, `qwen2`.
    pub pre: String,
    /// Token strings by id.
    pub tokens: Vec<String>,
    /// `token_type` values by id (see [`token_type`]).
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in merge priority order.
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
}

impl GgufTokenizerMetadata {
    /// Reads the vocabulary, merges and added tokens of a Hugging Face byte-level BPE
    /// `tokenizer.json` (already parsed); `pre` names its pre-tokenizer for llama.cpp. Ids missing
    /// from both the vocabulary and the added tokens become `[PAD<id>]` entries of type UNUSED, as
    /// llama.cpp writes them. BOS/EOS ids and the chat template are left for the caller to set.
    pub fn from_tokenizer_json(json: &serde_json::Value, pre: &str, path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::invalid(path, "tokenizer", reason);
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(invalid(format!("model type is {}, expected BPE", model["type"])));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| invalid("`model.vocab` is not an object".into()))?;
        let mut entries: Vec<(u32, String, i32)> = vec![];
        for (tok, id) in vocab {
            let id = id
                .as_u64()
                .ok_or_else(|| invalid(format!("vocabulary id of `{tok}` is not a number")))?;
            entries.push((id as u32, tok.clone(), token_type::NORMAL as i32));
        }
        for added in json["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let id = added["id"]
                .as_u64()
                .ok_or_else(|| invalid("an added token has no `id`".into()))? as u32;
            let content = added["content"]
                .as_str()
                .ok_or_else(|| invalid(format!("added token {id} has no `content`")))?;
            let kind = if added["special"].as_bool().unwrap_or(false) {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
            entries.push((id, content.to_string(), kind as i32));
        }
        let size = entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0);
        let mut tokens: Vec<String> = (0..size).map(|i| format!("[PAD{i}]")).collect();
        let mut token_types = vec![token_type::UNUSED as i32; size];
        // Added tokens come last in `entries`, so their type wins over the plain vocabulary entry.
        for (id, tok, kind) in entries {
            tokens[id as usize] = tok;
            token_types[id as usize] = kind;
        }
        let merges = model["merges"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(pair) => match (
                    pair.first().and_then(|x| x.as_str()),
                    pair.get(1).and_then(|x| x.as_str()),
                ) {
                    (Some(a), Some(b)) if pair.len() == 2 => Ok(format!("{a} {b}")),
                    _ => Err(invalid(format!("merge {i} is not a pair of strings"))),
                },
                _ => Err(invalid(format!("merge {i} is neither a string nor a pair"))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GgufTokenizerMetadata {
            model: "gpt2".into(),
            pre: pre.into(),
            tokens,
            token_types,
            merges,
            bos_token_id: None,
            eos_token_id: None,
            padding_token_id: None,
            add_bos_token: false,
            chat_template: None,
        })
    }

    /// The metadata entries for a GGUF file.
    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let mut out = vec![
            ("tokenizer.ggml.model".to_string(), Value::String(self.model.clone())),
            ("tokenizer.ggml.pre".to_string(), Value::String(self.pre.clone())),
            ("tokenizer.ggml.tokens".to_string(), strings(&self.tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(self.token_types.iter().map(|t| Value::I32(*t)).collect()),
            ),
            ("tokenizer.ggml.merges".to_string(), strings(&self.merges)),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Value::Bool(self.add_bos_token),
            ),
        ];
        let ids = [
            ("tokenizer.ggml.bos_token_id", self.bos_token_id),
            ("tokenizer.ggml.eos_token_id", self.eos_token_id),
            ("tokenizer.ggml.padding_token_id", self.padding_token_id),
        ];
        for (key, id) in ids {
            if let Some(id) = id {
                out.push((key.to_string(), Value::U32(id)));
            }
        }
        if let Some(t) = &self.chat_template {
            out.push(("tokenizer.chat_template".to_string(), Value::String(t.clone())));
        }
        out
    }
}
