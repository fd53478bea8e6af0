//! Unit tests: the fast paths against the reference path, checkpoints, and the backend's rules.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::util::SplitMix64;
use crate::*;

fn rand(rng: &mut SplitMix64, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.uniform(scale, n), shape, &Device::Cpu).unwrap()
}

/// An expert whose LayerNorm weights are random too, so every gradient path is exercised.
fn randomized(kind: ExpertKind, h: usize, seed: u64) -> Expert {
    let e = Expert::new(ExpertConfig::new(kind, h), seed).unwrap();
    let mut rng = SplitMix64::new(seed ^ 0xABCD);
    let map: HashMap<String, Tensor> = e
        .state_dict()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.contains("norm") {
                let base = if n.ends_with("weight") { 1.0 } else { 0.0 };
                (rand(&mut rng, t.dims(), 0.5) + base).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    Expert::from_tensors(ExpertConfig::new(kind, h), map).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn inputs_for(kind: ExpertKind, b: usize, h: usize, rng: &mut SplitMix64) -> Vec<Tensor> {
    match kind {
        ExpertKind::Ffn | ExpertKind::Nop => vec![rand(rng, &[b, h], 1.0)],
        ExpertKind::DetDropout => {
            let mask = rand(rng, &[b, h], 1.0)
                .ge(0f32)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            vec![rand(rng, &[b, h], 1.0), mask]
        }
        ExpertKind::Transformer => {
            let s = 5;
            let mut m = vec![0f32; b * s];
            m[s - 1] = 1.0;
            m[2 * s - 2] = 1.0;
            vec![
                rand(rng, &[b, s, h], 1.0),
                Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap(),
            ]
        }
    }
}

#[test]
fn ffn_fast_path_matches_the_autograd_reference() {
    let (b, h) = (7, 32);
    let e = randomized(ExpertKind::Ffn, h, 1);
    let mut rng = SplitMix64::new(2);
    let x = rand(&mut rng, &[b, h], 2.0);
    let g = rand(&mut rng, &[b, h], 1.0);
    let fast = e.forward(std::slice::from_ref(&x)).unwrap();
    let slow = e.forward_reference(std::slice::from_ref(&x)).unwrap();
    assert!(max_rel_diff(&fast[0], &slow[0]) < 1e-5);
    let fast = e
        .backward(std::slice::from_ref(&x), std::slice::from_ref(&g))
        .unwrap();
    let slow = e
        .backward_reference(std::slice::from_ref(&x), std::slice::from_ref(&g))
        .unwrap();
    let d = max_rel_diff(&fast.inputs[0], &slow.inputs[0]);
    assert!(d < 1e-5, "input grad differs by {d}");
    for (i, (f, s)) in fast.params.iter().zip(&slow.params).enumerate() {
        let d = max_rel_diff(f, s);
        assert!(d < 1e-5, "grad of {} differs by {d}", e.param_names()[i]);
    }
}

#[test]
fn reference_gradients_match_finite_differences() {
    // checks the autograd reference itself (in f64 terms, loosely: f32 central differences)
    for kind in [
        ExpertKind::Ffn,
        ExpertKind::Transformer,
        ExpertKind::DetDropout,
        ExpertKind::Nop,
    ] {
        let (b, h) = (2, 16);
        let e = randomized(kind, h, 3);
        let mut rng = SplitMix64::new(4);
        let inputs = inputs_for(kind, b, h, &mut rng);
        let g = rand(&mut rng, inputs[0].dims(), 1.0);
        let grads = e.backward_reference(&inputs, std::slice::from_ref(&g)).unwrap();
        let loss = |x: &Tensor| -> f64 {
            let mut inp = inputs.clone();
            inp[0] = x.clone();
            let out = e.forward_reference(&inp).unwrap();
            (&out[0] * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let x = inputs[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gx = grads.inputs[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in [0, 3, x.len() - 1] {
            let eps = 1e-2f32;
            let mut xp = x.clone();
            xp[i] += eps;
            let mut xm = x.clone();
            xm[i] -= eps;
            let shape = inputs[0].dims();
            let fd = (loss(&Tensor::from_vec(xp, shape, &Device::Cpu).unwrap())
                - loss(&Tensor::from_vec(xm, shape, &Device::Cpu).unwrap()))
                / (2.0 * eps as f64);
            assert!(
                (fd - gx[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                "{kind} x[{i}]: fd {fd} vs {}",
                gx[i]
            );
        }
        // the fast/default path agrees with the reference for every kind
        let fast = e.backward(&inputs, std::slice::from_ref(&g)).unwrap();
        assert!(max_rel_diff(&fast.inputs[0], &grads.inputs[0]) < 1e-5, "{kind}");
    }
}

#[test]
fn checkpoints_round_trip_with_torch_names() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ExpertKind::ALL {
        let e = randomized(kind, 16, 5);
        let path = dir.path().join(format!("{kind}.safetensors"));
        e.save(&path).unwrap();
        let back = Expert::load(ExpertConfig::new(kind, 16), &path).unwrap();
        assert_eq!(back.param_names(), e.param_names());
        for ((_, a), (_, b)) in e.state_dict().iter().zip(back.state_dict().iter()) {
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        // wrong size is a typed error
        assert!(
            matches!(
                Expert::load(ExpertConfig::new(kind, 32), &path),
                Err(ExpertError::Shape { .. })
            ) || kind == ExpertKind::Nop
        );
    }
    assert_eq!(randomized(ExpertKind::Ffn, 16, 5).param_names()[0], "ffn.weight");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let e = Expert::new(ExpertConfig::new(ExpertKind::Ffn, 8), 0).unwrap();
    let x = Tensor::zeros((3, 9), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(e.forward(&[x]), Err(ExpertError::Shape { .. })));
    let x = Tensor::zeros((0, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(e.forward(&[x]), Err(ExpertError::EmptyBatch)));
    assert!(matches!(e.forward(&[]), Err(ExpertError::Arity { .. })));
    assert!(matches!(
        Expert::new(ExpertConfig::new(ExpertKind::Transformer, 24), 0),
        Err(ExpertError::BadHiddenDim { .. })
    ));
    assert!(matches!(
        "moe".parse::<ExpertKind>(),
        Err(ExpertError::UnknownKind { .. })
    ));
    assert_eq!(
        "det_dropout".parse::<ExpertKind>().unwrap(),
        ExpertKind::DetDropout
    );
}

#[test]
fn non_finite_gradients_are_refused_without_a_step() {
    let e = randomized(ExpertKind::Ffn, 8, 6);
    let before: Vec<Vec<f32>> = e
        .state_dict()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let mut backend = ExpertBackend::new(e, BackendConfig::default()).unwrap();
    let x = Tensor::ones((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut g = vec![0.5f32; 16];
    g[3] = f32::NAN;
    let g = Tensor::from_vec(g, (2, 8), &Device::Cpu).unwrap();
    assert!(matches!(
        backend.backward(std::slice::from_ref(&x), &[g]),
        Err(ExpertError::NonFiniteGradient { .. })
    ));
    let big = Tensor::full(f32::MAX, (2, 8), &Device::Cpu).unwrap();
    assert!(matches!(
        backend.backward(&[x], &[big]),
        Err(ExpertError::NonFiniteGradient { .. })
    ));
    assert_eq!(backend.steps(), 0);
    let after: Vec<Vec<f32>> = backend
        .expert()
        .state_dict()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn linear_schedule_is_hiveminds() {
    let s = ScheduleConfig::Linear {
        warmup_steps: 4,
        training_steps: 10,
    };
    let f: Vec<f64> = (0..12).map(|t| s.factor(t)).collect();
    let want = [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        5.0 / 6.0,
        4.0 / 6.0,
        0.5,
        2.0 / 6.0,
        1.0 / 6.0,
        0.0,
        0.0,
    ];
    for (a, b) in f.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{f:?}");
    }
    assert_eq!(ScheduleConfig::None.factor(100), 1.0);
}

#[test]
fn clipping_scales_the_step() {
    let e = randomized(ExpertKind::Ffn, 8, 7);
    let cfg = BackendConfig {
        optimizer: OptimizerConfig::sgd(),
        clip_grad_norm: Some(1e-3),
        ..BackendConfig::default()
    };
    let mut backend = ExpertBackend::new(e, cfg).unwrap();
    let mut rng = SplitMix64::new(8);
    let x = rand(&mut rng, &[4, 8], 1.0);
    let g = rand(&mut rng, &[4, 8], 1.0);
    let (_, report) = backend.backward_with_report(&[x], &[g]).unwrap();
    assert!(report.grad_norm > 1e-3);
    assert!((report.clip_coef - 1e-3 / (report.grad_norm + 1e-6)).abs() < 1e-12);
    assert_eq!(backend.steps(), 1);
}

#[test]
fn ffn_fast_path_matches_across_parallel_chunks() {
    // 150 rows × 256 features spans several of the kernels' parallel chunks
    let (b, h) = (150, 64);
    let e = randomized(ExpertKind::Ffn, h, 9);
    let mut rng = SplitMix64::new(10);
    let x = rand(&mut rng, &[b, h], 3.0);
    let g = rand(&mut rng, &[b, h], 1.0);
    let fast = e
        .backward(std::slice::from_ref(&x), std::slice::from_ref(&g))
        .unwrap();
    let slow = e
        .backward_reference(std::slice::from_ref(&x), std::slice::from_ref(&g))
        .unwrap();
    assert!(max_rel_diff(&fast.inputs[0], &slow.inputs[0]) < 1e-5);
    for (f, s) in fast.params.iter().zip(&slow.params) {
        assert!(max_rel_diff(f, s) < 1e-5);
    }
    let fwd = e.forward(std::slice::from_ref(&x)).unwrap();
    assert!(max_rel_diff(&fwd[0], &e.forward_reference(&[x]).unwrap()[0]) < 1e-5);
}

#[test]
fn backends_move_to_compute_threads() {
    fn send<T: Send + 'static>() {}
    send::<ExpertBackend>();
    send::<Expert>();
}

#[test]
fn masks_may_come_as_integers() {
    let mut rng = SplitMix64::new(12);
    for kind in [ExpertKind::Transformer, ExpertKind::DetDropout] {
        let e = randomized(kind, 16, 13);
        let inputs = inputs_for(kind, 2, 16, &mut rng);
        let g = rand(&mut rng, inputs[0].dims(), 1.0);
        let want = e.forward(&inputs).unwrap();
        let want_grads = e.backward(&inputs, std::slice::from_ref(&g)).unwrap();
        for dtype in [candle_core::DType::U8, candle_core::DType::I64] {
            let as_int = vec![inputs[0].clone(), inputs[1].to_dtype(dtype).unwrap()];
            let got = e.forward(&as_int).unwrap();
            assert_eq!(max_rel_diff(&got[0], &want[0]), 0.0, "{kind} {dtype:?}");
            let grads = e.backward(&as_int, std::slice::from_ref(&g)).unwrap();
            assert_eq!(max_rel_diff(&grads.inputs[0], &want_grads.inputs[0]), 0.0);
            // the mask's gradient is zeros of the mask's own dtype, as hivemind returns
            assert_eq!(grads.inputs[1].dtype(), dtype);
            let mut backend = ExpertBackend::new(randomized(kind, 16, 13), BackendConfig::default()).unwrap();
            let dx = backend.backward(&as_int, std::slice::from_ref(&g)).unwrap();
            assert_eq!(max_rel_diff(&dx[0], &want_grads.inputs[0]), 0.0);
            assert_eq!(backend.steps(), 1);
        }
    }
    let e = randomized(ExpertKind::Ffn, 8, 14);
    let x = Tensor::zeros((2, 8), candle_core::DType::U8, &Device::Cpu).unwrap();
    assert!(matches!(e.forward(&[x]), Err(ExpertError::NotF32Cpu { .. })));
}

#[test]
fn transformer_fast_path_matches_the_autograd_reference() {
    let (b, h) = (3, 32);
    let e = randomized(ExpertKind::Transformer, h, 15);
    let mut rng = SplitMix64::new(16);
    let inputs = inputs_for(ExpertKind::Transformer, b, h, &mut rng);
    let g = rand(&mut rng, inputs[0].dims(), 1.0);
    let fast = e.forward(&inputs).unwrap();
    let slow = e.forward_reference(&inputs).unwrap();
    assert!(max_rel_diff(&fast[0], &slow[0]) < 1e-5);
    let fast = e.backward(&inputs, std::slice::from_ref(&g)).unwrap();
    let slow = e.backward_reference(&inputs, std::slice::from_ref(&g)).unwrap();
    let d = max_rel_diff(&fast.inputs[0], &slow.inputs[0]);
    assert!(d < 1e-5, "input grad differs by {d}");
    assert_eq!(fast.inputs[1].dims(), inputs[1].dims());
    for (i, (f, s)) in fast.params.iter().zip(&slow.params).enumerate() {
        let d = max_rel_diff(f, s);
        assert!(d < 1e-5, "grad of {} differs by {d}", e.param_names()[i]);
    }
}

/// A backend saved after two steps and loaded again takes the same third step as one never interrupted:
/// Adam's moments and the step count (which the schedule follows) come back with the weights.
#[test]
fn checkpoints_carry_the_optimizer_state() {
    let h = 8;
    let config = BackendConfig {
        optimizer: OptimizerConfig::adam(),
        schedule: ScheduleConfig::Linear {
            warmup_steps: 2,
            training_steps: 10,
        },
        clip_grad_norm: None,
    };
    let mut rng = SplitMix64::new(5);
    let batches: Vec<(Tensor, Tensor)> = (0..3)
        .map(|_| (rand(&mut rng, &[4, h], 1.0), rand(&mut rng, &[4, h], 1.0)))
        .collect();
    let mut straight = ExpertBackend::new(randomized(ExpertKind::Ffn, h, 9), config).unwrap();
    let mut resumed = ExpertBackend::new(randomized(ExpertKind::Ffn, h, 9), config).unwrap();
    for (x, g) in &batches[..2] {
        straight
            .backward(std::slice::from_ref(x), std::slice::from_ref(g))
            .unwrap();
        resumed
            .backward(std::slice::from_ref(x), std::slice::from_ref(g))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    resumed.save_checkpoint(dir.path()).unwrap();
    let (mut resumed, why) =
        ExpertBackend::load_checkpoint(ExpertConfig::new(ExpertKind::Ffn, h), config, dir.path()).unwrap();
    assert_eq!(why, None);
    assert_eq!(resumed.steps(), 2);
    let (x, g) = &batches[2];
    straight
        .backward(std::slice::from_ref(x), std::slice::from_ref(g))
        .unwrap();
    resumed
        .backward(std::slice::from_ref(x), std::slice::from_ref(g))
        .unwrap();
    for ((name, a), (_, b)) in straight
        .expert()
        .state_dict()
        .iter()
        .zip(resumed.expert().state_dict())
    {
        assert_eq!(max_rel_diff(a, &b), 0.0, "{name}");
    }

    // another optimizer's state is not loaded; the expert still is
    let sgd = BackendConfig {
        optimizer: OptimizerConfig::sgd(),
        ..config
    };
    let (fresh, why) =
        ExpertBackend::load_checkpoint(ExpertConfig::new(ExpertKind::Ffn, h), sgd, dir.path()).unwrap();
    assert!(why.unwrap().contains("another optimizer"));
    assert_eq!(fresh.steps(), 0);
    // a corrupted optimizer file: same
    std::fs::write(dir.path().join(OPTIMIZER_FILE), b"garbage").unwrap();
    let (_, why) =
        ExpertBackend::load_checkpoint(ExpertConfig::new(ExpertKind::Ffn, h), config, dir.path()).unwrap();
    assert!(why.is_some());
    // a corrupted expert file is an error
    std::fs::write(dir.path().join(CHECKPOINT_FILE), b"garbage").unwrap();
    assert!(
        ExpertBackend::load_checkpoint(ExpertConfig::new(ExpertKind::Ffn, h), config, dir.path()).is_err()
    );
}

/// The device the portable-path tests compute on: the CPU, or `APIARY_TEST_DEVICE=cuda[:N]` in a build
/// with the `cuda` feature (the GPU check runs these same tests there).
fn test_device() -> Device {
    match std::env::var("APIARY_TEST_DEVICE").ok().as_deref() {
        None | Some("") | Some("cpu") => Device::Cpu,
        Some(other) => {
            let ordinal = other
                .strip_prefix("cuda")
                .map(|n| n.trim_start_matches(':').parse().unwrap_or(0))
                .unwrap_or_else(|| panic!("APIARY_TEST_DEVICE={other}: expected cpu or cuda[:N]"));
            Device::new_cuda(ordinal).unwrap()
        }
    }
}

/// What a GPU runs — plain candle ops, candle's autograd and the optimizers in candle ops — trains exactly
/// like the CPU fast paths: same outputs, input gradients and parameters after several steps, for every
/// kind and optimizer (with weight decay, momentum, Nesterov and clipping in play).
#[test]
fn the_portable_path_trains_like_the_fast_path() {
    let device = test_device();
    let optimizers = [
        OptimizerConfig::adam(),
        OptimizerConfig::Adam {
            lr: 1e-2,
            betas: (0.8, 0.99),
            eps: 1e-6,
            weight_decay: 0.1,
        },
        OptimizerConfig::adamw(),
        OptimizerConfig::Sgd {
            lr: 1e-2,
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 1e-3,
            nesterov: false,
        },
        OptimizerConfig::Sgd {
            lr: 1e-2,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: true,
        },
    ];
    for kind in [
        ExpertKind::Ffn,
        ExpertKind::Transformer,
        ExpertKind::DetDropout,
        ExpertKind::Nop,
    ] {
        for (o, optimizer) in optimizers.iter().enumerate() {
            let h = 32;
            let config = BackendConfig {
                optimizer: *optimizer,
                schedule: ScheduleConfig::None,
                clip_grad_norm: (o % 2 == 0).then_some(0.5),
            };
            let mut fast = ExpertBackend::new(randomized(kind, h, 11), config).unwrap();
            let mut portable = ExpertBackend::new(randomized(kind, h, 11), config)
                .unwrap()
                .with_portable_path(true)
                .to_device(&device)
                .unwrap();
            let mut rng = SplitMix64::new(12 + o as u64);
            for step in 0..4 {
                let inputs = inputs_for(kind, 6, h, &mut rng);
                let g = rand(&mut rng, inputs[0].dims(), 1.0);
                let what = format!("{} with {optimizer:?}, step {step}", kind.name());
                let a = fast.forward(&inputs).unwrap();
                let b = portable.forward(&inputs).unwrap();
                assert!(
                    b[0].device().same_device(&device),
                    "{what}: output off the device"
                );
                let d = max_rel_diff(&b[0].to_device(&Device::Cpu).unwrap(), &a[0]);
                assert!(d < 1e-5, "{what}: outputs differ by {d}");
                let a = fast.backward(&inputs, std::slice::from_ref(&g)).unwrap();
                let b = portable.backward(&inputs, std::slice::from_ref(&g)).unwrap();
                let d = max_rel_diff(&b[0].to_device(&Device::Cpu).unwrap(), &a[0]);
                assert!(d < 1e-5, "{what}: input grads differ by {d}");
            }
            assert_eq!(portable.steps(), 4);
            for ((name, a), (_, b)) in fast
                .expert()
                .state_dict()
                .iter()
                .zip(portable.expert().state_dict())
            {
                if a.elem_count() == 0 {
                    continue;
                }
                // Adam divides by the gradients' running scale, so parameters whose gradients hover near
                // zero amplify the paths' ~1e-6 gradient differences; a wrong update rule (bias correction,
                // weight decay, momentum) moves them by ~lr, i.e. 1e-2 of their scale or more
                let b = b.to_device(&Device::Cpu).unwrap();
                let d = if name == "self_attn.in_proj_bias" {
                    // the key bias has a zero true gradient (softmax ignores a shift shared by all keys):
                    // both paths see rounding noise there, which Adam turns into ±lr steps; compare the
                    // query and value biases
                    let part = |t: &Tensor, i: usize| t.narrow(0, i * h, h).unwrap();
                    max_rel_diff(&part(&b, 0), &part(a, 0)).max(max_rel_diff(&part(&b, 2), &part(a, 2)))
                } else {
                    max_rel_diff(&b, a)
                };
                assert!(
                    d < 1e-3,
                    "{} with {optimizer:?}: {name} differs by {d}",
                    kind.name()
                );
            }
        }
    }
}

/// The optimizer's state follows the expert between the paths and through checkpoints: two steps on the
/// portable path, saved, loaded on the CPU fast path and one more step there equals three fast steps.
#[test]
fn optimizer_state_moves_between_the_paths_and_through_checkpoints() {
    let device = test_device();
    let h = 16;
    for optimizer in [
        OptimizerConfig::adam(),
        OptimizerConfig::Sgd {
            lr: 1e-2,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
    ] {
        let config = BackendConfig {
            optimizer,
            schedule: ScheduleConfig::None,
            clip_grad_norm: None,
        };
        let mut rng = SplitMix64::new(21);
        let batches: Vec<(Tensor, Tensor)> = (0..4)
            .map(|_| (rand(&mut rng, &[5, h], 1.0), rand(&mut rng, &[5, h], 1.0)))
            .collect();
        let mut straight = ExpertBackend::new(randomized(ExpertKind::Ffn, h, 22), config).unwrap();
        let mut moved = ExpertBackend::new(randomized(ExpertKind::Ffn, h, 22), config)
            .unwrap()
            .with_portable_path(true)
            .to_device(&device)
            .unwrap();
        let step = |b: &mut ExpertBackend, (x, g): &(Tensor, Tensor)| {
            b.backward(std::slice::from_ref(x), std::slice::from_ref(g))
                .unwrap();
        };
        for batch in &batches[..2] {
            step(&mut straight, batch);
            step(&mut moved, batch);
        }
        let dir = tempfile::tempdir().unwrap();
        moved.save_checkpoint(dir.path()).unwrap();
        // back to the fast path in memory: the state comes off the device
        let mut back = moved.with_portable_path(false).to_device(&Device::Cpu).unwrap();
        let (mut loaded, why) =
            ExpertBackend::load_checkpoint(ExpertConfig::new(ExpertKind::Ffn, h), config, dir.path())
                .unwrap();
        assert_eq!(why, None);
        for batch in &batches[2..] {
            step(&mut straight, batch);
            step(&mut back, batch);
            step(&mut loaded, batch);
        }
        for (((name, a), (_, b)), (_, c)) in straight
            .expert()
            .state_dict()
            .iter()
            .zip(back.expert().state_dict())
            .zip(loaded.expert().state_dict())
        {
            let d = max_rel_diff(&b, a).max(max_rel_diff(&c, a));
            assert!(d < 1e-4, "{optimizer:?}: {name} differs by {d}");
        }
    }
}

/// The runtime serves an expert on the portable path (on a GPU, the same way) and hands results back on
/// the CPU, equal to the fast path's.
#[tokio::test]
async fn the_runtime_serves_portable_experts_on_the_cpu_side() {
    let device = test_device();
    let h = 16;
    let expert = |portable: bool| {
        ExpertBackend::new(randomized(ExpertKind::Ffn, h, 31), BackendConfig::default())
            .unwrap()
            .with_portable_path(portable)
            .to_device(if portable { &device } else { &Device::Cpu })
            .unwrap()
    };
    let runtime = Runtime::spawn(
        vec![("ffn.0".into(), expert(false)), ("ffn.1".into(), expert(true))],
        RuntimeConfig::default(),
    )
    .unwrap();
    let mut rng = SplitMix64::new(32);
    let x = rand(&mut rng, &[3, h], 1.0);
    let g = rand(&mut rng, &[3, h], 1.0);
    let a = runtime.forward("ffn.0", vec![x.clone()]).await.unwrap();
    let b = runtime.forward("ffn.1", vec![x.clone()]).await.unwrap();
    assert!(b[0].device().is_cpu());
    assert!(max_rel_diff(&b[0], &a[0]) < 1e-5);
    let a = runtime
        .backward("ffn.0", vec![x.clone()], vec![g.clone()])
        .await
        .unwrap();
    let b = runtime.backward("ffn.1", vec![x], vec![g]).await.unwrap();
    assert!(b[0].device().is_cpu());
    assert!(max_rel_diff(&b[0], &a[0]) < 1e-5);
    runtime.shutdown().await;
}
