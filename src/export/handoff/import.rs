//! Bringing a remote run back: a PEFT adapter folder (`adapter_config.json` +
//! `adapter_model.safetensors`, as LLaMA-Factory, axolotl and TRL save it) becomes a Finch run
//! folder, so the Chat, Compare and Export pages list it. The adapter is checked before anything
//! is written: every PEFT feature Finch does not implement is an error naming its field, the base
//! model it names must open here, and every tensor must fit that model at the rank the config
//! states. The remote trainer's `trainer_state.json` loss log, when it is in the folder, a
//! `checkpoint-N` folder inside it, or the folder above, becomes the run's `metrics.jsonl`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::lora::Target;
use crate::train::{Duration, TrainConfig, METRICS_FILE};

/// One import to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportRequest {
    /// The PEFT adapter folder.
    pub dir: PathBuf,
    /// The new run's name; default: the adapter folder's name.
    pub name: Option<String>,
    /// Where runs live (the new run is `runs_dir/name`).
    pub runs_dir: PathBuf,
    /// The base model, when `base_model_name_or_path` does not open here (a path on the GPU
    /// machine, a Hub id not downloaded).
    pub model: Option<String>,
    /// The base model to use only when `model` is unset and `base_model_name_or_path` is missing
    /// or does not open here (the studio passes the model open on its Models page).
    pub fallback_model: Option<String>,
}

/// A finished import.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub run: PathBuf,
    pub model: String,
    pub rank: usize,
    pub targets: Vec<Target>,
    /// Training steps read from `trainer_state.json` (0 when none was found).
    pub logged_steps: usize,
    pub trainer_state: Option<PathBuf>,
}

fn field_error(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::invalid(path, format!("field `{field}`"), reason)
}

/// Checks the fields of a PEFT `adapter_config.json` that change what the adapter computes and
/// that Finch does not implement. `Ok` leaves the rest to [`crate::lora::load_adapter`].
pub fn check_peft_config(path: &Path, v: &Value) -> Result<()> {
    let is_set = |k: &str| match v.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(field_error(
            path,
            "peft_type",
            format!("`{peft_type}` is not LORA; Finch imports LoRA adapters only"),
        ));
    }
    let unsupported: [(&str, &str); 9] = [
        ("use_dora", "DoRA adapters (weight-decomposed LoRA) are not supported; retrain with use_dora: false"),
        ("rank_pattern", "per-module ranks are not supported; retrain with one rank for every module"),
        ("alpha_pattern", "per-module alphas are not supported; retrain with one lora_alpha"),
        ("modules_to_save", "fully trained extra modules (e.g. embed_tokens, lm_head) are not supported; retrain without modules_to_save"),
        ("layers_to_transform", "adapters on a subset of layers are not supported; retrain on every layer"),
        ("trainable_token_indices", "trainable token embeddings are not supported"),
        ("lora_bias", "LoRA bias terms are not supported"),
        ("fan_in_fan_out", "Conv1D-style (fan_in_fan_out) weights are not supported"),
        ("exclude_modules", "excluded modules are not supported; list target_modules explicitly"),
    ];
    for (field, why) in unsupported {
        if is_set(field) {
            return Err(field_error(path, field, why));
        }
    }
    match v.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => {
            return Err(field_error(
                path,
                "bias",
                format!("`{other}`: trained biases are not supported (only `none`)"),
            ))
        }
    }
    match v.get("target_modules") {
        Some(Value::Array(items)) => {
            for m in items {
                let name = m.as_str().unwrap_or_default();
                if Target::parse(name).is_none() {
                    return Err(field_error(
                        path,
                        "target_modules",
                        format!(
                            "module `{name}` is not one Finch adapts (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, \
                             down_proj, qkv_proj, gate_up_proj)"
                        ),
                    ));
                }
            }
        }
        Some(Value::String(s)) => {
            return Err(field_error(
                path,
                "target_modules",
                format!("`{s}` is a pattern; Finch needs the list of module names (e.g. [\"q_proj\", \"v_proj\"])"),
            ))
        }
        _ => {
            return Err(field_error(
                path,
                "target_modules",
                "missing: the adapted modules must be listed",
            ))
        }
    }
    match v.get("r").and_then(Value::as_u64) {
        Some(r) if r > 0 => Ok(()),
        _ => Err(field_error(path, "r", "missing or not a positive integer")),
    }
}

/// `trainer_state.json` in `dir`, in its newest `checkpoint-N` folder, or the same in the folder
/// above `dir`.
pub fn find_trainer_state(dir: &Path) -> Option<PathBuf> {
    let look = |d: &Path| -> Option<PathBuf> {
        let here = d.join("trainer_state.json");
        if here.is_file() {
            return Some(here);
        }
        let mut best: Option<(usize, PathBuf)> = None;
        for e in std::fs::read_dir(d).ok()?.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("checkpoint-").and_then(|n| n.parse::<usize>().ok()) else {
                continue;
            };
            let p = e.path().join("trainer_state.json");
            if p.is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, p));
            }
        }
        best.map(|(_, p)| p)
    };
    look(dir).or_else(|| dir.parent().and_then(look))
}

/// `metrics.jsonl` lines from a `trainer_state.json`'s `log_history`: each entry with `loss` a
/// train line (`learning_rate` → `lr`, `grad_norm`), each with `eval_loss` an eval line. Returns
/// the text and the number of train lines.
pub fn metrics_from_trainer_state(path: &Path) -> Result<(String, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read", e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::invalid(path, "trainer state", e.to_string()))?;
    let history = v
        .get("log_history")
        .and_then(Value::as_array)
        .ok_or_else(|| field_error(path, "log_history", "missing or not a list"))?;
    let mut out = String::new();
    let mut steps = 0;
    for entry in history {
        let Some(step) = entry.get("step").and_then(Value::as_u64) else {
            continue;
        };
        let num = |k: &str| entry.get(k).and_then(Value::as_f64);
        if let Some(loss) = num("loss") {
            let mut line = json!({"kind": "train", "step": step, "loss": loss});
            if let Some(lr) = num("learning_rate") {
                line["lr"] = json!(lr);
            }
            if let Some(g) = num("grad_norm") {
                line["grad_norm"] = json!(g);
            }
            out += &format!("{line}\n");
            steps += 1;
        }
        if let Some(loss) = num("eval_loss") {
            out += &format!("{}\n", json!({"kind": "eval", "step": step, "eval_loss": loss}));
        }
    }
    Ok((out, steps))
}

fn run_name(dir: &Path) -> String {
    let raw = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "imported".into());
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("imported-{}", name.trim_matches('-'))
}

/// Checks the adapter in `request.dir` and writes it as a run under `request.runs_dir`.
pub fn import_adapter(request: &ImportRequest) -> Result<Imported> {
    let dir = &request.dir;
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.is_file() {
        return Err(Error::MissingFile {
            path: dir.clone(),
            file: "adapter_config.json".into(),
            hint: "pass the folder a trainer saved its PEFT adapter into (adapter_config.json + adapter_model.safetensors)"
                .into(),
        });
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, "cannot read", e))?;
    let raw: Value =
        serde_json::from_str(&text).map_err(|e| Error::invalid(&cfg_path, "adapter config", e.to_string()))?;
    check_peft_config(&cfg_path, &raw)?;
    let adapter = crate::lora::load_adapter(dir, &Device::Cpu)?;
    let st = dir.join("adapter_model.safetensors");
    for (module, (a, b)) in &adapter.weights {
        if a.dims().first() != Some(&adapter.config.r) || b.dims().get(1) != Some(&adapter.config.r) {
            return Err(Error::invalid(
                &cfg_path,
                "field `r`",
                format!(
                    "{} but {module} has lora_A {:?} and lora_B {:?} in {}; the config and the weights disagree",
                    adapter.config.r,
                    a.dims(),
                    b.dims(),
                    st.display()
                ),
            ));
        }
    }
    let named = raw
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string);
    let named = named.filter(|n| !n.is_empty());
    let fallback = match (&request.model, &named, &request.fallback_model) {
        (None, None, Some(f)) => Some(f.clone()),
        (None, Some(n), Some(f)) if crate::hub::open_model(n).is_err() => Some(f.clone()),
        _ => None,
    };
    let spec = match (&request.model, &named, &fallback) {
        (Some(m), _, _) => m.clone(),
        (None, _, Some(f)) => f.clone(),
        (None, Some(n), None) => n.clone(),
        _ => {
            return Err(field_error(
                &cfg_path,
                "base_model_name_or_path",
                "missing: pass the base model with --model",
            ))
        }
    };
    let files = crate::hub::open_model(&spec).map_err(|e| {
        let which = if request.model.is_some() {
            "--model"
        } else if fallback.is_some() {
            "the model open in the studio"
        } else {
            "base_model_name_or_path"
        };
        field_error(
            &cfg_path,
            "base_model_name_or_path",
            format!(
                "`{spec}` (from {which}) does not open here ({e}); pass the same base model as a local folder, GGUF \
                 or downloaded Hub id with --model"
            ),
        )
    })?;
    let mut model = files.load(candle_core::DType::F32, &Device::Cpu)?;
    // Every projection the config names, on every layer, must be in the file, and nothing else.
    let layers = model.cfg.num_hidden_layers;
    let mut expected = vec![];
    for l in 0..layers {
        for t in &adapter.config.targets {
            expected.push(t.module_path(l));
        }
    }
    if let Some(m) = expected.iter().find(|m| !adapter.weights.contains_key(*m)) {
        return Err(Error::MissingTensor {
            path: st.clone(),
            tensor: crate::lora::peft_keys(m).0,
            hint: format!(
                " (target_modules lists it for all {layers} layers of {spec}; was the adapter trained on another base model?)"
            ),
        });
    }
    if let Some(m) = adapter.weights.keys().find(|m| !expected.contains(m)) {
        return Err(Error::invalid(
            &st,
            format!("tensor `{}`", crate::lora::peft_keys(m).0),
            format!("module `{m}` is not a target_modules projection of {spec}'s {layers} layers"),
        ));
    }
    model.set_adapter(&adapter, dir)?;

    let name = request.name.clone().unwrap_or_else(|| run_name(dir));
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(Error::config("name", format!("`{name}` is not a folder name")));
    }
    let run = request.runs_dir.join(&name);
    if run.exists() {
        return Err(Error::config(
            "name",
            format!("{} already exists; choose another --name", run.display()),
        ));
    }
    let state = find_trainer_state(dir);
    let (metrics, logged) = match &state {
        Some(p) => metrics_from_trainer_state(p)?,
        None => (String::new(), 0),
    };
    let max_steps = state
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("max_steps").and_then(Value::as_u64))
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .unwrap_or(logged.max(1));
    let cfg = TrainConfig {
        model: spec.clone(),
        data: dir.to_string_lossy().into_owned(),
        out: run.to_string_lossy().into_owned(),
        lora: adapter.config.clone(),
        duration: Duration::Steps(max_steps),
        eval_split: 0.0,
        ..TrainConfig::default()
    };
    let adapter_out = run.join("adapter");
    std::fs::create_dir_all(&adapter_out).map_err(|e| Error::io(&adapter_out, "cannot create run folder", e))?;
    let result = (|| -> Result<()> {
        crate::export::export_peft(dir, &adapter_out)?;
        crate::fsutil::write_atomic(&run.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        let origin = json!({
            "imported_from": std::fs::canonicalize(dir).unwrap_or(dir.clone()),
            "trainer_state": state,
            "base_model_name_or_path": named,
            "note": "config.toml describes the adapter and its base model; the remote trainer's own settings are not known to Finch",
        });
        crate::fsutil::write_atomic(
            &run.join("imported.json"),
            serde_json::to_string_pretty(&origin).unwrap_or_default().as_bytes(),
        )?;
        crate::fsutil::write_atomic(&run.join(METRICS_FILE), metrics.as_bytes())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&run);
        return Err(e);
    }
    Ok(Imported {
        run,
        model: spec,
        rank: adapter.config.r,
        targets: adapter.config.targets.clone(),
        logged_steps: logged,
        trainer_state: state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_peft_fields_are_named() {
        let p = Path::new("a/adapter_config.json");
        let base = json!({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none",
                          "use_dora": false, "rank_pattern": {}, "modules_to_save": null});
        check_peft_config(p, &base).unwrap();
        for (field, value) in [
            ("use_dora", json!(true)),
            ("rank_pattern", json!({"q_proj": 4})),
            ("modules_to_save", json!(["lm_head"])),
            ("layers_to_transform", json!([0, 1])),
            ("bias", json!("all")),
            ("target_modules", json!("all-linear")),
            ("target_modules", json!(["q_proj", "lm_head"])),
            ("peft_type", json!("IA3")),
            ("r", json!(0)),
        ] {
            let mut v = base.clone();
            v[field] = value;
            let err = check_peft_config(p, &v).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{field}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn trainer_state_log_history_becomes_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("out/checkpoint-4");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::create_dir_all(dir.path().join("out/checkpoint-2")).unwrap();
        std::fs::write(dir.path().join("out/checkpoint-2/trainer_state.json"), "{}").unwrap();
        std::fs::write(
            ck.join("trainer_state.json"),
            json!({"max_steps": 4, "log_history": [
                {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 3.0, "epoch": 0.1},
                {"step": 2, "loss": 2.0, "learning_rate": 2e-4},
                {"step": 2, "eval_loss": 2.2, "eval_runtime": 1.0},
                {"step": 4, "train_runtime": 9.0, "train_loss": 2.1}
            ]})
            .to_string(),
        )
        .unwrap();
        let adapter = dir.path().join("out");
        let found = find_trainer_state(&adapter).unwrap();
        assert_eq!(found, ck.join("trainer_state.json"), "the newest checkpoint's state");
        let (text, steps) = metrics_from_trainer_state(&found).unwrap();
        assert_eq!(steps, 2);
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join(METRICS_FILE), text).unwrap();
        let h = crate::train::history::RunHistory::read(&run).unwrap();
        assert_eq!(h.loss, vec![[1.0, 2.5], [2.0, 2.0]]);
        assert_eq!(h.lr, vec![[1.0, 1e-4], [2.0, 2e-4]]);
        assert_eq!(h.grad_norm, vec![[1.0, 3.0]]);
        assert_eq!(h.eval_loss, vec![[2.0, 2.2]]);
        // From a subfolder of the trainer's output (`output/final`), the parent is searched too.
        let sub = adapter.join("final");
        std::fs::create_dir_all(&sub).unwrap();
        assert_eq!(find_trainer_state(&sub), Some(found));
    }
}
