//! The composite path — candle ops only, what CUDA and Metal run — proven on the CPU.
//!
//! `FINCH_FUSED=0` (here: `with_kernel_path(Composite, ..)`) makes the CPU skip every fused
//! kernel. Each op gives the same values and gradients both ways; a tiny model trains along the
//! same loss curve; and every LoRA gradient of the composite path is non-zero and equals a
//! finite-difference estimate, which fails if a composite op silently drops gradients (candle's
//! fast `rms_norm`, `softmax_last_dim`, `rope*`, `sdpa` record no backward).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use finch::data::TokenizedExample;
use finch::kernels::ops::{rms_norm, rope, swiglu};
use finch::kernels::{fused_allowed, kernel_path, with_kernel_path, KernelPath};
use finch::lora::{ForwardCtx, FrozenWeight, LoraConfig, LoraLinear, LoraWeights, Target};
use finch::model::attention::{causal_attention, Heads};
use finch::model::loss::linear_cross_entropy;
use finch::model::tiny::TinySpec;
use finch::model::weights::TensorMap;
use finch::model::{Family, ModelConfig, Transformer};
use finch::rng::Rng;
use finch::testing::max_abs_diff;
use finch::train::batch::make_batch;
use finch::train::config::Precision;
use finch::train::{batch_loss, Duration, TrainConfig, TrainData, TrainEvent, Trainer};

const BOTH: [KernelPath; 2] = [KernelPath::Fused, KernelPath::Composite];

/// `f` run on both paths: returns (fused, composite) outputs and the gradients of
/// `sum(output · weights)` with respect to `inputs`.
fn both_paths(inputs: &[&Var], weights: &Tensor, f: impl Fn() -> Tensor) -> [(Tensor, Vec<Tensor>); 2] {
    BOTH.map(|path| {
        with_kernel_path(path, || {
            let y = f();
            let grads = (&y * weights).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = inputs
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{path:?}: an input got no gradient"))
                        .clone()
                })
                .collect();
            (y, gs)
        })
    })
}

/// Same values within `fwd_tol`, same gradients within `grad_tol`, and every gradient non-zero.
fn assert_same(op: &str, [(yf, gf), (yc, gc)]: [(Tensor, Vec<Tensor>); 2], fwd_tol: f32, grad_tol: f32) {
    let d = max_abs_diff(&yf, &yc);
    assert!(d < fwd_tol, "{op}: forward differs by {d}");
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < grad_tol, "{op}: gradient of input {i} differs by {d}");
        let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{op}: the composite gradient of input {i} is zero");
    }
}

fn tables(t: usize, half: usize) -> (Tensor, Tensor) {
    let ang: Vec<f32> = (0..t * half)
        .map(|i| (i / half) as f32 / 10f32.powf((i % half) as f32 / half as f32))
        .collect();
    let ang = Tensor::from_vec(ang, (t, half), &Device::Cpu).unwrap();
    (ang.cos().unwrap(), ang.sin().unwrap())
}

#[test]
fn the_switch_turns_every_fused_kernel_off_on_this_thread_only() {
    let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    with_kernel_path(KernelPath::Composite, || {
        assert_eq!(kernel_path(), KernelPath::Composite);
        assert!(!fused_allowed(&x));
        // Another thread follows the process setting (FINCH_FUSED), not this scope.
        let other = std::thread::spawn(kernel_path).join().unwrap();
        assert_eq!(other, finch::kernels::kernel_path_from_env().unwrap());
        with_kernel_path(KernelPath::Fused, || assert!(fused_allowed(&x)));
        assert!(!fused_allowed(&x));
    });
    with_kernel_path(KernelPath::Fused, || {
        assert!(fused_allowed(&x));
        assert!(
            !fused_allowed(&x.to_dtype(DType::BF16).unwrap()),
            "bf16 never takes a fused kernel"
        );
    });
}

#[test]
fn rms_norm_rotary_and_swiglu_agree_on_both_paths() {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (2, 3, 16), &dev).unwrap();
    let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
    let c = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev).unwrap();
    let r = both_paths(&[&x], &c, || rms_norm(x.as_tensor(), &w, 1e-5).unwrap());
    assert_same("rms_norm", r, 1e-5, 1e-4);

    let q = Var::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
    let (cos, sin) = tables(5, 4);
    let c = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
    let r = both_paths(&[&q], &c, || rope(q.as_tensor(), &cos, &sin).unwrap());
    assert_same("rope", r, 1e-5, 1e-4);

    let g = Var::randn(0f32, 2.0, (3, 7), &dev).unwrap();
    let u = Var::randn(0f32, 1.0, (3, 7), &dev).unwrap();
    let c = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
    let r = both_paths(&[&g, &u], &c, || swiglu(g.as_tensor(), u.as_tensor()).unwrap());
    assert_same("swiglu", r, 1e-5, 1e-4);
}

#[test]
fn attention_agrees_on_both_paths() {
    for window in [None, Some(3)] {
        attention_agrees_on_both_paths_with(window);
    }
}

fn attention_agrees_on_both_paths_with(window: Option<usize>) {
    let dev = Device::Cpu;
    let (b, t, nh, nkv, hd) = (2, 7, 6, 2, 8);
    let heads = Heads {
        q_heads: nh,
        kv_heads: nkv,
        head_dim: hd,
        window,
        bf16_probabilities: false,
    };
    let q = Var::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
    let k = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
    let v = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
    let (cos, sin) = tables(t, hd / 2);
    let c = Tensor::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
    let scale = 1.0 / (hd as f64).sqrt();
    let r = both_paths(&[&q, &k, &v], &c, || {
        causal_attention(&q, &k, &v, &cos, &sin, heads, scale).unwrap()
    });
    assert_same("attention", r, 1e-5, 1e-5);
}

#[test]
fn linear_cross_entropy_agrees_on_both_paths() {
    let dev = Device::Cpu;
    let (n, d, vocab) = (9, 16, 50);
    let h = Var::randn(0f32, 1.0, (n, d), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.5, (vocab, d), &dev).unwrap();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % vocab as u32).collect();
    let one = Tensor::new(1f32, &dev).unwrap();
    for for_backward in [true, false] {
        let r = both_paths(&[&h], &one, || {
            linear_cross_entropy(h.as_tensor(), &w, &targets, for_backward).unwrap()
        });
        assert_same("linear_cross_entropy", r, 1e-5, 1e-5);
    }
}

#[test]
fn lora_linear_agrees_on_both_paths() {
    let dev = Device::Cpu;
    let (m, inp, out, r) = (5, 12, 10, 4);
    let x = Var::randn(0f32, 1.0, (2, m, inp), &dev).unwrap();
    let a = Var::randn(0f32, 0.3, (r, inp), &dev).unwrap();
    let b = Var::randn(0f32, 0.3, (out, r), &dev).unwrap();
    let mut lin = LoraLinear::new(Tensor::randn(0f32, 0.3, (out, inp), &dev).unwrap(), None);
    lin.lora = Some(LoraWeights {
        a: a.clone(),
        b: b.clone(),
        scale: 2.0,
        dropout: 0.0,
    });
    let c = Tensor::randn(0f32, 1.0, (2, m, out), &dev).unwrap();
    let r = both_paths(&[&x, &a, &b], &c, || {
        lin.forward(x.as_tensor(), &mut ForwardCtx::eval()).unwrap()
    });
    assert_same("lora_linear", r, 1e-5, 1e-4);
}

/// Random token sequences for the tiny model (every position trained).
fn random_examples(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<TokenizedExample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| TokenizedExample {
            input_ids: (0..len).map(|_| rng.below(vocab) as u32).collect(),
            loss_mask: vec![true; len],
            truncated: false,
        })
        .collect()
}

fn tiny_model(dtype: DType) -> Transformer {
    let spec = TinySpec::new(Family::Llama);
    let cfg = ModelConfig::from_json(&spec.config_json(), "tiny".as_ref()).unwrap();
    let src = TensorMap {
        tensors: spec.weights().unwrap(),
        origin: "tiny".into(),
    };
    Transformer::load(&cfg, &src, dtype, &Device::Cpu).unwrap()
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    }
}

/// The composite path in f64 (the same ops as in f32; the fused kernels are f32-only): every
/// LoRA variable of every layer and target gets a non-zero gradient equal to central finite
/// differences, along the gradient itself and along a random direction.
#[test]
fn every_composite_lora_gradient_matches_finite_differences() {
    let mut model = tiny_model(DType::F64);
    model.add_lora(&lora(), &mut Rng::new(3)).unwrap();
    // B starts at zero, which would make every A gradient zero: give B values first.
    let mut rng = Rng::new(5);
    for (_, w) in model.lora_weights() {
        let b: Vec<f64> = (0..w.b.elem_count())
            .map(|_| (rng.next_f32() as f64 - 0.5) * 0.2)
            .collect();
        w.b.set(&Tensor::from_vec(b, w.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let vocab = model.cfg.vocab_size;
    let examples = random_examples(2, 12, vocab, 9);
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    let batch = make_batch(&refs, 0, &Device::Cpu).unwrap();
    let loss = |m: &Transformer| -> f64 {
        batch_loss(m, &batch, &mut ForwardCtx::eval())
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = batch_loss(&model, &batch, &mut ForwardCtx::eval())
        .unwrap()
        .backward()
        .unwrap();
    let named: Vec<(String, Var)> = model
        .lora_weights()
        .into_iter()
        .flat_map(|(name, w)| {
            [
                (format!("{name}.lora_A"), w.a.clone()),
                (format!("{name}.lora_B"), w.b.clone()),
            ]
        })
        .collect();
    assert_eq!(named.len(), 2 * 2 * 7, "2 layers × 7 targets × (A, B)");
    let eps = 1e-4;
    for (name, var) in &named {
        assert_eq!(var.dtype(), DType::F64);
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .clone();
        let g_norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
        assert!(g_norm > 1e-8, "{name}: gradient is zero");
        let random = Tensor::randn(0f64, 1.0, var.shape(), &Device::Cpu).unwrap();
        for dir in [(&g / g_norm).unwrap(), random] {
            let dir = (&dir
                / dir
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap())
            .unwrap();
            let analytic = (&g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let orig = var.as_tensor().copy().unwrap();
            var.set(&(&orig + (&dir * eps).unwrap()).unwrap()).unwrap();
            let up = loss(&model);
            var.set(&(&orig - (&dir * eps).unwrap()).unwrap()).unwrap();
            let down = loss(&model);
            var.set(&orig).unwrap();
            let numeric = (up - down) / (2.0 * eps);
            assert!(
                (numeric - analytic).abs() <= 1e-6 * g_norm.max(1.0) + 1e-9,
                "{name}: finite differences {numeric}, backward {analytic} (|g| = {g_norm})"
            );
        }
    }
}

fn train_curve(path: KernelPath, precision: Precision, steps: usize) -> (Vec<f32>, Transformer) {
    // Loaded under the path too: bf16 on the CPU's fused path keeps an f32 model over bf16 weights.
    let mut model = with_kernel_path(path, || tiny_model(precision.dtype()));
    let vocab = model.cfg.vocab_size;
    let cfg = TrainConfig {
        model: "tiny".into(),
        data: "random".into(),
        lora: lora(),
        duration: Duration::Steps(steps),
        batch_size: 4,
        seq_len: 24,
        lr: 1e-2,
        warmup_steps: 2,
        eval_split: 0.0,
        precision,
        ..TrainConfig::default()
    };
    model
        .add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))
        .unwrap();
    let data = TrainData {
        train: random_examples(8, 24, vocab, 11),
        eval: vec![],
        pad_id: 0,
    };
    let mut trainer = Trainer::new(cfg, model.clone(), data, None).unwrap();
    let mut losses = vec![];
    with_kernel_path(path, || {
        trainer
            .run(&AtomicBool::new(false), &mut |e| {
                if let TrainEvent::Step(m) = e {
                    losses.push(m.loss);
                }
            })
            .unwrap()
    });
    (losses, model)
}

#[test]
fn a_tiny_model_trains_along_the_same_curve_on_both_paths() {
    let (fused, _) = train_curve(KernelPath::Fused, Precision::F32, 20);
    let (composite, _) = train_curve(KernelPath::Composite, Precision::F32, 20);
    assert_eq!(fused.len(), 20);
    assert_eq!(composite.len(), 20);
    for (step, (a, b)) in fused.iter().zip(&composite).enumerate() {
        assert!((a - b).abs() < 1e-3, "step {}: fused {a}, composite {b}", step + 1);
    }
    assert!(fused[19] < fused[0] - 0.5, "the run did not learn: {fused:?}");
    // The switch took effect: different kernels round differently.
    assert_ne!(fused, composite, "both runs took the same kernels");
}

/// Each step's bf16 loss within 5% of the f32 one.
fn assert_close_curves(f32_curve: &[f32], bf16_curve: &[f32]) {
    for (step, (a, b)) in f32_curve.iter().zip(bf16_curve).enumerate() {
        assert!(
            (a - b).abs() < 0.05 * a.abs().max(1.0),
            "step {}: f32 {a}, bf16 {b}",
            step + 1
        );
    }
}

/// Mixed precision as on a GPU: a bf16 base with f32 adapters and optimizer, on the composite
/// path, follows the f32 curve closely and learns.
#[test]
fn a_bf16_base_trains_f32_adapters_close_to_the_f32_curve() {
    let (f32_curve, _) = train_curve(KernelPath::Composite, Precision::F32, 12);
    let (bf16_curve, model) = train_curve(KernelPath::Composite, Precision::Bf16, 12);
    assert_eq!(model.dtype(), DType::BF16);
    for (_, w) in model.lora_weights() {
        assert_eq!((w.a.dtype(), w.b.dtype()), (DType::F32, DType::F32));
    }
    assert_close_curves(&f32_curve, &bf16_curve);
    assert!(
        bf16_curve[11] < bf16_curve[0] - 0.3,
        "bf16 did not learn: {bf16_curve:?}"
    );
}

/// bf16 on the CPU's fused path (what `--precision bf16` runs there): an f32 model over bf16
/// projections and output head, multiplied with bf16 products summed in f32. It follows the f32
/// curve as closely as the all-bf16 composite model above does, and learns.
#[test]
fn a_bf16_base_on_the_fused_path_keeps_f32_activations_and_follows_the_f32_curve() {
    let (f32_curve, _) = train_curve(KernelPath::Fused, Precision::F32, 12);
    let (bf16_curve, model) = train_curve(KernelPath::Fused, Precision::Bf16, 12);
    assert_eq!(model.dtype(), DType::F32);
    assert_eq!(model.lm_head_weight().dtype(), DType::BF16);
    let weights = model.merged_weights().unwrap();
    assert_eq!(weights[0].0, "model.embed_tokens.weight");
    assert_eq!(weights[0].1.dtype(), DType::BF16, "the embeddings");
    for t in [Target::Q, Target::V, Target::Down] {
        match model.base_weight(0, t) {
            Some(FrozenWeight::Dense(w)) => assert_eq!(w.dtype(), DType::BF16, "{t:?}"),
            other => panic!("{t:?}: {other:?}"),
        }
    }
    for (_, w) in model.lora_weights() {
        assert_eq!((w.a.dtype(), w.b.dtype()), (DType::F32, DType::F32));
    }
    assert_close_curves(&f32_curve, &bf16_curve);
    assert_ne!(f32_curve, bf16_curve, "the bf16 run took the f32 kernels");
    assert!(
        bf16_curve[11] < bf16_curve[0] - 0.3,
        "bf16 did not learn: {bf16_curve:?}"
    );
}

fn finch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finch"))
}

/// `finch bench train` says which path and device ran; `FINCH_FUSED=0` picks the composite path.
#[test]
fn bench_train_reports_its_path_and_device() {
    let args = [
        "bench",
        "train",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--seq-len",
        "8",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rank",
        "2",
        "--targets",
        "q",
    ];
    for (env, path) in [("1", "fused"), ("0", "composite")] {
        let out = finch().args(args).env("FINCH_FUSED", env).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["path"], path);
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["precision"], "f32");
        assert!(v["tokens_per_sec"].as_f64().unwrap() > 0.0);
    }
    // The fused path's JSON line for `args`, with `FINCH_CPU` set to `cpu` when given.
    let fused = |args: &[&str], cpu: Option<&str>| -> serde_json::Value {
        let mut cmd = finch();
        cmd.args(args).env("FINCH_FUSED", "1");
        if let Some(cpu) = cpu {
            cmd.env("FINCH_CPU", cpu);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // bf16 on the CPU runs the fused kernels over bf16 weights; `FINCH_CPU=portable` widens them.
    let bf16_args = [&args[..], &["--precision", "bf16"]].concat();
    for (cpu, products) in [(None, None), (Some("portable"), Some("widened"))] {
        let v = fused(&bf16_args, cpu);
        assert_eq!(
            (v["path"].as_str(), v["precision"].as_str()),
            (Some("fused"), Some("bf16"))
        );
        let got = v["bf16_products"].as_str().unwrap();
        assert!(["amx-bf16", "avx512-bf16", "widened"].contains(&got), "{got}");
        if let Some(want) = products {
            assert_eq!(got, want);
        }
        assert!(v["loss_last"].as_f64().unwrap().is_finite());
    }
    // `FINCH_AMX=off` keeps bf16 products off Intel AMX tiles: the same loss (the products of
    // the same bf16-rounded values, summed in another order); a value it does not know is an
    // error naming it.
    let amx = |value: &str| {
        finch()
            .args(&bf16_args)
            .env("FINCH_FUSED", "1")
            .env("FINCH_AMX", value)
            .output()
            .unwrap()
    };
    let (on, off) = (fused(&bf16_args, None), amx("off"));
    assert!(off.status.success(), "{}", String::from_utf8_lossy(&off.stderr));
    let off: serde_json::Value = serde_json::from_slice(&off.stdout).unwrap();
    assert_ne!(off["bf16_products"], "amx-bf16");
    let (a, b) = (on["loss_last"].as_f64().unwrap(), off["loss_last"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "AMX {a} against {b}");
    let out = amx("fast");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FINCH_AMX") && err.contains("fast"), "{err}");
    // f32 products of training rows go through AVX-512 tiles where the CPU has them, through
    // the gemm crate under `FINCH_CPU=avx2`/`portable`: the same losses either way. 32 token
    // rows (`--seq-len 32`): products of fewer than 16 stay on gemv and gemm.
    let seq = args.iter().position(|&a| a == "--seq-len").unwrap() + 1;
    let mut rows = args.to_vec();
    rows[seq] = "32";
    let mut losses = vec![];
    for (cpu, products) in [(None, None), (Some("portable"), Some("gemm"))] {
        let v = fused(&rows, cpu);
        let got = v["f32_products"].as_str().unwrap();
        assert!(["avx512-tiles", "gemm"].contains(&got), "{got}");
        if let Some(want) = products {
            assert_eq!(got, want);
        }
        losses.push((got.to_string(), v["loss_last"].as_f64().unwrap()));
    }
    let (a, b) = (losses[0].1, losses[1].1);
    assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{losses:?}");
    let out = finch().args(args).env("FINCH_FUSED", "maybe").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FINCH_FUSED") && err.contains("maybe"), "{err}");
}

/// Every command that runs a model takes `--device`, and a build without CUDA says so.
#[test]
fn every_model_command_takes_a_device() {
    for cmd in [
        &["train", "--help"][..],
        &["chat", "--help"],
        &["compare", "--help"],
        &["eval", "--help"],
        &["export", "--help"],
        &["bench", "train", "--help"],
        &["bench", "generate", "--help"],
    ] {
        let out = finch().args(cmd).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--device"), "{cmd:?} has no --device:\n{help}");
    }
    let out = finch().args(["bench", "train", "--device", "tpu"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpu") && err.contains("cuda:N"), "{err}");
    if !cfg!(feature = "cuda") {
        let out = finch()
            .args(["bench", "train", "--device", "cuda", "--steps", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("built without CUDA"), "{err}");
    }
    let out = finch()
        .args([
            "chat",
            "--model",
            "x.gguf",
            "--quantized",
            "--device",
            "cuda:1",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--quantized runs on the CPU only"), "{err}");
}
