//! Apiary's experts against hivemind's own expert classes (hivemind.moe.server.layers) run in the interop
//! venv: same weights, same inputs → same outputs, input and parameter gradients, and weights after
//! optimizer steps taken through hivemind's `ModuleBackend` (optimizer, scheduler, `ClippingWrapper`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use apiary_expert::{
    BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind, OptimizerConfig, ScheduleConfig,
};
use apiary_testkit::{hivemind_python, interop_dir};
use candle_core::{DType, Device, Tensor};

/// `max |a - b| <= tol · max |b|` (relative to the reference tensor's scale).
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
    ensure!(
        a.dims() == b.dims(),
        "{what}: shape {:?} vs reference {:?}",
        a.dims(),
        b.dims()
    );
    let a = a.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    ensure!(
        diff <= tol * scale.max(1e-20),
        "{what}: max abs diff {diff:e}, reference scale {scale:e}"
    );
    Ok(())
}

/// Deterministic pseudo-random values in [-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn rand(seed: u64, shape: &[usize], scale: f32) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        values(seed, shape.iter().product(), scale),
        shape,
        &Device::Cpu,
    )?)
}

struct Case {
    kind: ExpertKind,
    hid_dim: usize,
    batch: usize,
    steps: u64,
    backend: BackendConfig,
    /// Extra arguments for expert_reference.py describing `backend`.
    py_args: Vec<String>,
}

fn run_case(case: &Case) -> Result<()> {
    let kind = case.kind;
    let (b, h) = (case.batch, case.hid_dim);
    let config = ExpertConfig::new(kind, h);
    // seeded init, then random LayerNorm weights too so every gradient path is exercised
    let fresh = Expert::new(config, 11)?;
    let mut map = HashMap::new();
    for (i, (name, t)) in fresh.state_dict().into_iter().enumerate() {
        let t = if name.contains("norm") {
            let base = if name.ends_with("weight") { 1.0 } else { 0.0 };
            (rand(100 + i as u64, t.dims(), 0.5)? + base)?
        } else {
            t
        };
        map.insert(name, t);
    }
    let expert = Expert::from_tensors(config, map)?;
    let initial: HashMap<String, Tensor> = expert
        .state_dict()
        .into_iter()
        .map(|(n, t)| Ok((n, t.copy()?)))
        .collect::<Result<_>>()?;

    let mut inputs = Vec::new();
    match kind {
        ExpertKind::Ffn | ExpertKind::Nop => inputs.push(rand(1, &[b, h], 2.0)?),
        ExpertKind::DetDropout => {
            inputs.push(rand(1, &[b, h], 2.0)?);
            inputs.push(rand(2, &[b, h], 1.0)?.ge(-0.4f32)?.to_dtype(DType::F32)?);
        }
        ExpertKind::Transformer => {
            let s = 6;
            inputs.push(rand(1, &[b, s, h], 2.0)?);
            let mut m = vec![0f32; b * s];
            m[s - 1] = 1.0; // row 0: last position is padding
            m[2 * s - 1] = 1.0; // row 1: last two
            m[2 * s - 2] = 1.0;
            // as a bool-like u8 mask, the way hivemind clients send it
            inputs.push(Tensor::from_vec(m, (b, s), &Device::Cpu)?.to_dtype(DType::U8)?);
        }
    }
    let grad = rand(3, inputs[0].dims(), 1.0)?;

    let dir = tempfile::tempdir()?;
    expert.save(&dir.path().join("weights.safetensors"))?;
    let mut io: HashMap<String, Tensor> = HashMap::new();
    for (i, t) in inputs.iter().enumerate() {
        io.insert(format!("input{i}"), t.clone());
    }
    io.insert("grad0".into(), grad.clone());
    candle_core::safetensors::save(&io, dir.path().join("inputs.safetensors"))?;
    run_reference(dir.path(), case)?;
    let reference = candle_core::safetensors::load(dir.path().join("reference.safetensors"), &Device::Cpu)?;
    let get = |k: &str| reference.get(k).with_context(|| format!("reference lacks {k}"));
    let tag = kind.name();

    // forward (fast path for ffn) and the reference path
    let out = expert.forward(&inputs)?;
    assert_close(&format!("{tag} forward"), &out[0], get("output0")?, 1e-4)?;
    let out = expert.forward_reference(&inputs)?;
    assert_close(
        &format!("{tag} forward (reference path)"),
        &out[0],
        get("output0")?,
        1e-4,
    )?;

    // gradients of the first backward
    let grads = expert.backward(&inputs, std::slice::from_ref(&grad))?;
    for (i, g) in grads.inputs.iter().enumerate() {
        assert_close(
            &format!("{tag} grad_input{i}"),
            g,
            get(&format!("grad_input{i}"))?,
            1e-4,
        )?;
    }
    for (name, g) in expert.param_names().iter().zip(&grads.params) {
        assert_close(
            &format!("{tag} grad of {name}"),
            g,
            get(&format!("param_grad.{name}"))?,
            1e-4,
        )?;
    }

    // optimizer steps through the backend, compared after each one
    let names: Vec<String> = expert.param_names().to_vec();
    let mut backend = ExpertBackend::new(expert, case.backend)?;
    for k in 1..=case.steps {
        let dx = backend.backward(&inputs, std::slice::from_ref(&grad))?;
        assert_close(
            &format!("{tag} step {k} grad_input0"),
            &dx[0],
            get("grad_input0")?,
            1e-3,
        )
        .or_else(|e| if k == 1 { Err(e) } else { Ok(()) })?;
        for (name, t) in backend.expert().state_dict() {
            let want = get(&format!("step{k}.{name}"))?;
            // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys):
            // both sides hold rounding noise there, which Adam's g/(|g|+eps) amplifies to full-size, unequal
            // steps. Compare the query and value biases only.
            let (t, want, init) = if name == "self_attn.in_proj_bias" {
                let qv = |x: &Tensor| -> Result<Tensor> {
                    Ok(Tensor::cat(&[x.narrow(0, 0, h)?, x.narrow(0, 2 * h, h)?], 0)?)
                };
                (qv(&t)?, qv(want)?, qv(&initial[&name])?)
            } else {
                (t, want.clone(), initial[&name].clone())
            };
            let want = &want;
            assert_close(&format!("{tag} step {k} {name}"), &t, want, 1e-4)?;
            // the update itself, at a looser tolerance relative to its own (small) scale
            if t.elem_count() > 0 {
                let delta = (&t - &init)?;
                let want_delta = (want - &init)?;
                let max_delta = want_delta
                    .abs()?
                    .max_keepdim(0)?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                if max_delta > 0.0 {
                    assert_close(
                        &format!("{tag} step {k} update of {name}"),
                        &delta,
                        &want_delta,
                        1e-3,
                    )?;
                }
            }
        }
    }
    assert_eq!(backend.steps(), case.steps);
    assert_eq!(names.len(), backend.expert().param_names().len());
    Ok(())
}

fn run_reference(dir: &Path, case: &Case) -> Result<()> {
    let out = Command::new(hivemind_python())
        .arg(interop_dir().join("expert_reference.py"))
        .arg(dir)
        .args(["--kind", case.kind.name(), "--hid-dim", &case.hid_dim.to_string()])
        .args(["--steps", &case.steps.to_string()])
        .args(&case.py_args)
        .output()
        .context("could not start the hivemind venv's python")?;
    ensure!(
        out.status.success(),
        "expert_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn adam_case(kind: ExpertKind, hid_dim: usize, batch: usize) -> Case {
    Case {
        kind,
        hid_dim,
        batch,
        steps: 2,
        backend: BackendConfig::default(),
        py_args: vec![],
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn ffn_matches_hivemind_with_adam() -> Result<()> {
    run_case(&adam_case(ExpertKind::Ffn, 32, 6))
}

#[test]
fn ffn_matches_hivemind_with_adamw_linear_schedule_and_clipping() -> Result<()> {
    run_case(&Case {
        kind: ExpertKind::Ffn,
        hid_dim: 32,
        batch: 5,
        steps: 3,
        backend: BackendConfig {
            optimizer: OptimizerConfig::AdamW {
                lr: 1e-2,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.1,
            },
            schedule: ScheduleConfig::Linear {
                warmup_steps: 1,
                training_steps: 4,
            },
            clip_grad_norm: Some(0.5),
        },
        py_args: args(&[
            "--optimizer",
            "adamw",
            "--lr",
            "1e-2",
            "--weight-decay",
            "0.1",
            "--scheduler",
            "linear",
            "--warmup",
            "1",
            "--training",
            "4",
            "--clip",
            "0.5",
        ]),
    })
}

#[test]
fn ffn_matches_hivemind_with_sgd_momentum() -> Result<()> {
    run_case(&Case {
        kind: ExpertKind::Ffn,
        hid_dim: 16,
        batch: 4,
        steps: 3,
        backend: BackendConfig {
            optimizer: OptimizerConfig::Sgd {
                lr: 0.05,
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 0.01,
                nesterov: false,
            },
            ..BackendConfig::default()
        },
        py_args: args(&[
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--weight-decay",
            "0.01",
        ]),
    })
}

#[test]
fn transformer_matches_hivemind() -> Result<()> {
    run_case(&adam_case(ExpertKind::Transformer, 32, 3))
}

#[test]
fn det_dropout_matches_hivemind() -> Result<()> {
    run_case(&adam_case(ExpertKind::DetDropout, 16, 4))
}

#[test]
fn nop_matches_hivemind() -> Result<()> {
    run_case(&adam_case(ExpertKind::Nop, 8, 3))
}

#[test]
fn wider_ffn_matches_hivemind_across_parallel_chunks() -> Result<()> {
    // 64 rows × 512 features: the fused kernels split the batch into several parallel chunks
    run_case(&Case {
        steps: 1,
        ..adam_case(ExpertKind::Ffn, 128, 64)
    })
}
