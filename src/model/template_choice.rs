//! Which chat template renders a dataset for a model when the model may have none: an explicit
//! built-in (with the model's own special tokens), else the model's own template, else ChatML
//! with a note saying why. `finch data inspect` and the studio's Data page both choose here, so
//! they show the same rendering for the same model.

use crate::template::{special_tokens_from_config, BuiltinTemplate, ChatTemplate};

use super::load::{ModelFiles, TemplateSource};

/// The template chosen, and why it is not the model's own when it is not.
#[derive(Debug, Clone)]
pub struct TemplateChoice {
    pub template: ChatTemplate,
    /// Set when the model's own template was wanted but is missing or broken.
    pub note: Option<String>,
}

/// Chooses the template for rendering data: `explicit` when given (with the model's bos/eos),
/// else the model's own, else ChatML with the model's special tokens and a note. A template that
/// does not parse is reported in the note, never as an error: inspecting data should not need a
/// working template.
pub fn choose_template(model: Option<&ModelFiles>, explicit: Option<BuiltinTemplate>) -> TemplateChoice {
    let own = model.map(ModelFiles::chat_template);
    let (bos, eos) = match (&own, model.map(|m| &m.template)) {
        (Some(Ok(Some(t))), _) => (t.bos_token().map(str::to_owned), t.eos_token().map(str::to_owned)),
        (_, Some(TemplateSource::TokenizerConfig(p))) => special_tokens_from_config(p).unwrap_or((None, None)),
        (_, Some(TemplateSource::Embedded { bos, eos, .. })) => (bos.clone(), eos.clone()),
        _ => (None, None),
    };
    if let Some(kind) = explicit {
        return TemplateChoice {
            template: ChatTemplate::builtin(kind).with_special_tokens(bos, eos),
            note: None,
        };
    }
    let note = match (own, model) {
        (Some(Ok(Some(template))), _) => return TemplateChoice { template, note: None },
        (Some(Err(e)), Some(m)) => Some(format!(
            "the chat template of {} does not parse ({e:#}); using ChatML",
            m.path.display()
        )),
        (_, Some(m)) => Some(format!("{} has no chat template; using ChatML", m.path.display())),
        (_, None) => None,
    };
    TemplateChoice {
        template: ChatTemplate::builtin(BuiltinTemplate::ChatMl).with_special_tokens(bos, eos),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::TinySpec;
    use crate::model::Family;

    fn tiny_model(dir: &std::path::Path, template: Option<&str>) -> ModelFiles {
        TinySpec::new(Family::Llama).write(dir).unwrap();
        let config_path = dir.join("tokenizer_config.json");
        let mut config: serde_json::Value = if config_path.is_file() {
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap()
        } else {
            serde_json::json!({})
        };
        config["eos_token"] = serde_json::json!("</s>");
        match template {
            Some(t) => config["chat_template"] = serde_json::json!(t),
            None => {
                config.as_object_mut().unwrap().remove("chat_template");
            }
        }
        std::fs::write(&config_path, config.to_string()).unwrap();
        ModelFiles::open(&dir.display().to_string()).unwrap()
    }

    #[test]
    fn the_models_own_template_wins_unless_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = tiny_model(dir.path(), Some("{% for m in messages %}{{ m.content }}{% endfor %}"));
        let own = choose_template(Some(&files), None);
        assert!(own.note.is_none());
        assert_eq!(own.template.builtin_kind(), None);
        let named = choose_template(Some(&files), Some(BuiltinTemplate::Alpaca));
        assert_eq!(named.template.builtin_kind(), Some(BuiltinTemplate::Alpaca));
        assert_eq!(named.template.eos_token(), Some("</s>"), "the model's special tokens");
    }

    #[test]
    fn a_missing_or_broken_template_falls_back_to_chatml_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let files = tiny_model(&dir.path().join("none"), None);
        let none = choose_template(Some(&files), None);
        assert_eq!(none.template.builtin_kind(), Some(BuiltinTemplate::ChatMl));
        assert!(none.note.as_deref().unwrap().contains("has no chat template"));
        assert_eq!(none.template.eos_token(), Some("</s>"));

        let files = tiny_model(&dir.path().join("broken"), Some("{% for m in messages %}"));
        let broken = choose_template(Some(&files), None);
        assert_eq!(broken.template.builtin_kind(), Some(BuiltinTemplate::ChatMl));
        assert!(
            broken.note.as_deref().unwrap().contains("does not parse"),
            "{:?}",
            broken.note
        );

        let no_model = choose_template(None, None);
        assert_eq!(no_model.template.builtin_kind(), Some(BuiltinTemplate::ChatMl));
        assert!(no_model.note.is_none());
    }
}
