//! `RemoteSwitchMixtureOfExperts` over in-process experts (`LocalTransport`, `StaticRouter`): outputs,
//! balancing loss and gradients equal a dense candle-autograd reference of hivemind's Switch formula; the
//! balancing loss and the utilization average match hand-checked values (and hivemind's own code, run
//! once in torch for the numbers below); jitter is seeded, reproducible and off in eval; grid dropout
//! never yields NaN; failed experts contribute zeros, never NaN.

#![allow(clippy::unwrap_used)]

mod local_common;

use local_common::{GRID, H, Setup, rand, setup, uid};

use std::sync::Arc;

use apiary_moe::MoeError;
use apiary_moe::lm::Rng;
use apiary_moe::moe::{Router, coordinates};
use apiary_moe::switch::{BalancingLoss, RemoteSwitchMixtureOfExperts, SwitchConfig, SwitchOutput};
use apiary_moe::transport::{Fault, Rpc};
use candle_core::{D, DType, Device, Tensor, Var};

fn config() -> SwitchConfig {
    SwitchConfig::new(H, "ffn.", GRID.to_vec())
}

fn layer_seeded(s: &Setup, config: SwitchConfig, seed: u64) -> RemoteSwitchMixtureOfExperts {
    RemoteSwitchMixtureOfExperts::new(
        config,
        Arc::new(s.router.clone()),
        Arc::new(s.transport.clone()),
        s.rt.handle().clone(),
        seed,
    )
    .unwrap()
}

fn layer(s: &Setup, config: SwitchConfig) -> RemoteSwitchMixtureOfExperts {
    layer_seeded(s, config, 7)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn softmax(l: &Tensor) -> Tensor {
    let m = l.max_keepdim(D::Minus1).unwrap().detach();
    let e = l.broadcast_sub(&m).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
}

/// Output, balancing loss, and the gradients of `Σ out·g + λ·balancing_loss` with respect to `x`, the
/// gating weight and bias; and the utilization after the pass.
struct Pass {
    out: Tensor,
    balancing: Tensor,
    grad_x: Tensor,
    grad_w: Tensor,
    grad_b: Tensor,
    utilization: Vec<Vec<f32>>,
}

/// The dense reference of hivemind's Switch formula (no jitter, no grid dropout): the same gating, the
/// same choice of experts, the experts computed in-process through candle's autograd
/// (`forward_reference`), experts in `dead` contributing nothing; the utilization average computed from
/// `before` by hand; the balancing loss per dimension.
fn reference(
    s: &Setup,
    moe: &RemoteSwitchMixtureOfExperts,
    x: &Tensor,
    g: &Tensor,
    lambda: f64,
    dead: &[String],
    before: &[Vec<f32>],
) -> Pass {
    let params = moe.params();
    let w = Var::from_tensor(&params[0].as_tensor().copy().unwrap()).unwrap();
    let b = Var::from_tensor(&params[1].as_tensor().copy().unwrap()).unwrap();
    let xv = Var::from_tensor(&x.copy().unwrap()).unwrap();
    let logits = xv
        .as_tensor()
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    let l0 = logits.narrow(1, 0, GRID[0]).unwrap();
    let l1 = logits.narrow(1, GRID[0], GRID[1]).unwrap();
    let (p0, p1) = (softmax(&l0), softmax(&l1));
    let rows = logits.to_vec2::<f32>().unwrap();
    let scores: Vec<Vec<Vec<f32>>> = rows
        .iter()
        .map(|r| vec![r[..GRID[0]].to_vec(), r[GRID[0]..].to_vec()])
        .collect();
    let chosen =
        s.rt.block_on(s.router.choose(&scores, moe.config().moe.k_best))
            .unwrap();
    let mut outs = Vec::new();
    let mut counts = vec![vec![0f32; GRID[0]], vec![0f32; GRID[1]]];
    for (sample, experts) in chosen.iter().enumerate() {
        let xs = xv.as_tensor().narrow(0, sample, 1).unwrap();
        let mut out = xs.clone(); // the residual connection
        for e in experts.iter().filter(|e| !dead.contains(&e.uid)) {
            let expert = &s.experts.iter().find(|(a, _)| a == e).unwrap().1;
            let y = expert.forward_reference(std::slice::from_ref(&xs)).unwrap()[0].clone();
            let c = coordinates("ffn.", &GRID, &e.uid).unwrap();
            counts[0][c[0]] += 1.0;
            counts[1][c[1]] += 1.0;
            let prob = (p0.get(sample).unwrap().get(c[0]).unwrap()
                * p1.get(sample).unwrap().get(c[1]).unwrap())
            .unwrap();
            out = (out + y.broadcast_mul(&prob).unwrap()).unwrap();
        }
        outs.push(out);
    }
    let out = Tensor::cat(&outs, 0).unwrap();
    let alpha = moe.config().utilization_alpha;
    let utilization: Vec<Vec<f32>> = before
        .iter()
        .zip(&counts)
        .map(|(u, c)| {
            let total: f32 = c.iter().sum();
            u.iter()
                .zip(c)
                .map(|(u, c)| alpha * u + (1.0 - alpha) * if total > 0.0 { c / total } else { 0.0 })
                .collect()
        })
        .collect();
    let mut balancing = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (p, u) in [&p0, &p1].into_iter().zip(&utilization) {
        let gd = u.len();
        let u = Tensor::from_vec(u.clone(), gd, &Device::Cpu).unwrap();
        let term = (p.mean(0).unwrap() * u).unwrap().mean_all().unwrap();
        balancing = (balancing + (term * (gd * gd) as f64).unwrap()).unwrap();
    }
    let loss = ((&out * g).unwrap().sum_all().unwrap() + (&balancing * lambda).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    Pass {
        out: out.detach(),
        balancing: balancing.detach(),
        grad_x: grads.get(xv.as_tensor()).unwrap().clone(),
        grad_w: grads.get(w.as_tensor()).unwrap().clone(),
        grad_b: grads.get(b.as_tensor()).unwrap().clone(),
        utilization,
    }
}

/// Runs the layer forward and backward on `Σ out·g + λ·balancing_loss`.
fn run(moe: &RemoteSwitchMixtureOfExperts, x: &Tensor, g: &Tensor, lambda: f64) -> Pass {
    let xv = Var::from_tensor(&x.copy().unwrap()).unwrap();
    let SwitchOutput {
        output,
        balancing_loss,
    } = moe.forward(xv.as_tensor()).unwrap();
    let loss = ((&output * g).unwrap().sum_all().unwrap() + (&balancing_loss * lambda).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let p = moe.params();
    Pass {
        out: output.detach(),
        balancing: balancing_loss.detach(),
        grad_x: grads.get(xv.as_tensor()).unwrap().clone(),
        grad_w: grads.get(p[0].as_tensor()).unwrap().clone(),
        grad_b: grads.get(p[1].as_tensor()).unwrap().clone(),
        utilization: moe.grid_utilization(),
    }
}

fn assert_close(what: &str, a: &Pass, b: &Pass) {
    for (name, x, y) in [
        ("output", &a.out, &b.out),
        ("balancing loss", &a.balancing, &b.balancing),
        ("input grad", &a.grad_x, &b.grad_x),
        ("gating weight grad", &a.grad_w, &b.grad_w),
        ("gating bias grad", &a.grad_b, &b.grad_b),
    ] {
        let d = max_rel_diff(x, y);
        assert!(d < 1e-5, "{what}: {name} differs by {d}");
    }
    for (u, v) in a.utilization.iter().flatten().zip(b.utilization.iter().flatten()) {
        assert!(
            (u - v).abs() < 1e-6,
            "{what}: utilization {:?} vs {:?}",
            a.utilization,
            b.utilization
        );
    }
}

fn assert_finite(what: &str, p: &Pass) {
    for t in [&p.out, &p.balancing, &p.grad_x, &p.grad_w, &p.grad_b] {
        assert!(values(t).iter().all(|v| v.is_finite()), "{what}: never NaN");
    }
}

/// Sets the gating projection to `w` (row-major `(Σ grid, H)`) and `b`.
fn set_gating(moe: &RemoteSwitchMixtureOfExperts, w: Vec<f32>, b: Vec<f32>) {
    let p = moe.params();
    let total: usize = GRID.iter().sum();
    p[0].set(&Tensor::from_vec(w, (total, H), &Device::Cpu).unwrap())
        .unwrap();
    p[1].set(&Tensor::from_vec(b, total, &Device::Cpu).unwrap())
        .unwrap();
}

#[test]
fn defaults_are_hiveminds() {
    let c = config();
    assert_eq!(c.moe.k_best, 1);
    assert_eq!(c.moe.k_min, 0);
    assert_eq!(c.moe.backward_k_min, 0);
    assert!(c.moe.allow_zero_outputs);
    assert_eq!(c.utilization_alpha, 0.9);
    assert_eq!(c.grid_dropout, 1.0);
    assert_eq!(c.jitter_eps, 1e-2);
    assert_eq!(c.balancing_loss, BalancingLoss::PerDimension);
    let s = setup(&[]);
    let moe = layer(&s, c);
    assert!(moe.training());
    assert_eq!(moe.grid_utilization(), vec![vec![1.0 / 3.0; 3]; 2]);
    for bad in [
        SwitchConfig {
            utilization_alpha: 1.5,
            ..config()
        },
        SwitchConfig {
            grid_dropout: 0.0,
            ..config()
        },
        SwitchConfig {
            jitter_eps: -0.1,
            ..config()
        },
    ] {
        let e = RemoteSwitchMixtureOfExperts::new(
            bad,
            Arc::new(s.router.clone()),
            Arc::new(s.transport.clone()),
            s.rt.handle().clone(),
            1,
        )
        .unwrap_err();
        assert!(matches!(e, MoeError::BadConfig(_)), "{e}");
    }
    assert!(moe.set_grid_utilization(vec![vec![0.5; 3]]).is_err());
    assert!(
        moe.set_grid_utilization(vec![vec![0.5; 3], vec![f32::NAN; 3]])
            .is_err()
    );
}

#[test]
fn outputs_and_gradients_equal_the_dense_reference() {
    let s = setup(&[(2, 2)]); // a hole in the grid, as in a real swarm
    let mut c = config();
    c.jitter_eps = 0.0;
    let moe = layer(&s, c);
    let mut rng = Rng::new(1);
    let x = rand(&mut rng, &[12, H]);
    let g = rand(&mut rng, &[12, H]);
    let before = moe.grid_utilization();
    let want = reference(&s, &moe, &x, &g, 0.7, &[], &before);
    let got = run(&moe, &x, &g, 0.7);
    assert_close("top-1, all experts alive", &got, &want);
    // the balancing loss has gradients of its own
    let bal_only = reference(
        &s,
        &moe,
        &x,
        &Tensor::zeros((12, H), DType::F32, &Device::Cpu).unwrap(),
        1.0,
        &[],
        &got.utilization,
    );
    assert!(values(&bal_only.grad_b).iter().any(|v| v.abs() > 1e-4));
    // one request per expert per pass, every sample answered once
    let fwd = moe.stats().last_forward.unwrap();
    assert_eq!(fwd.answered_pairs, 12);
    for uid in s.transport.uids() {
        let calls = s.transport.calls(&uid);
        assert!(
            calls.forward <= 1 && calls.backward == calls.forward,
            "{uid}: {calls:?}"
        );
    }
    // a second pass continues the average from where the first left it
    let before = moe.grid_utilization();
    let want = reference(&s, &moe, &g, &x, 0.3, &[], &before);
    let got = run(&moe, &g, &x, 0.3);
    assert_close("second pass", &got, &want);
}

#[test]
fn k_best_two_with_failed_experts_equals_the_reference() {
    let s = setup(&[]);
    let mut c = config();
    c.jitter_eps = 0.0;
    c.moe.k_best = 2;
    let moe = layer(&s, c);
    let mut rng = Rng::new(2);
    let x = rand(&mut rng, &[10, H]);
    let g = rand(&mut rng, &[10, H]);
    let dead = vec![uid(0, 1), uid(1, 1)];
    for d in &dead {
        s.transport.set_fault(d, Some(Fault::fail()));
    }
    let before = moe.grid_utilization();
    let want = reference(&s, &moe, &x, &g, 0.5, &dead, &before);
    let got = run(&moe, &x, &g, 0.5);
    assert_close("k_best 2, two experts failing", &got, &want);
    for d in &dead {
        assert_eq!(
            s.transport.calls(d).backward,
            0,
            "{d} failed forward: no backward"
        );
    }
}

#[test]
fn eval_mode_turns_jitter_off() {
    let s = setup(&[]);
    let mut c = config();
    c.jitter_eps = 0.5;
    let mut moe = layer(&s, c);
    moe.set_training(false);
    assert!(!moe.training());
    let mut rng = Rng::new(3);
    let x = rand(&mut rng, &[8, H]);
    let g = rand(&mut rng, &[8, H]);
    let before = moe.grid_utilization();
    let want = reference(&s, &moe, &x, &g, 1.0, &[], &before);
    let got = run(&moe, &x, &g, 1.0);
    assert_close("eval, no jitter", &got, &want);
    let again = moe.forward(&x).unwrap().output;
    assert_eq!(values(&again), values(&got.out), "eval is deterministic");
    // in training the same input gives another output (the gating sees noise)
    moe.set_training(true);
    let noisy = moe.forward(&x).unwrap().output;
    assert!(
        max_rel_diff(&noisy, &got.out) > 1e-4,
        "jitter changes the gating in training"
    );
}

#[test]
fn jitter_is_seeded_and_reproducible() {
    let s = setup(&[]);
    let mut c = config();
    c.jitter_eps = 0.3;
    c.grid_dropout = 0.7;
    let a = layer_seeded(&s, c.clone(), 11);
    let b = layer_seeded(&s, c.clone(), 11);
    let other = layer_seeded(&s, c, 12);
    // the same projection, another noise generator
    let p = a.params();
    set_gating(&other, values(p[0].as_tensor()), values(p[1].as_tensor()));
    let mut rng = Rng::new(4);
    let x = rand(&mut rng, &[8, H]);
    let mut outs = Vec::new();
    for _ in 0..3 {
        let ya = a.forward(&x).unwrap();
        let yb = b.forward(&x).unwrap();
        assert_eq!(values(&ya.output), values(&yb.output), "same seed, same noise");
        assert_eq!(values(&ya.balancing_loss), values(&yb.balancing_loss));
        assert!(values(&ya.output).iter().all(|v| v.is_finite()));
        outs.push((ya.output, other.forward(&x).unwrap().output));
    }
    assert_eq!(a.grid_utilization(), b.grid_utilization());
    assert!(
        max_rel_diff(&outs[0].0, &outs[1].0) > 1e-4,
        "fresh noise every pass"
    );
    assert!(
        outs.iter().any(|(a, o)| max_rel_diff(o, a) > 1e-4),
        "another seed, other noise"
    );
}

#[test]
fn grid_dropout_never_yields_nan_and_is_off_in_eval() {
    let s = setup(&[]);
    let mut rng = Rng::new(5);
    let x = rand(&mut rng, &[8, H]);
    let g = rand(&mut rng, &[8, H]);
    // dropping (almost) every coordinate: each dimension keeps them all, as without dropout
    let mut c = config();
    c.jitter_eps = 0.0;
    c.grid_dropout = 1e-9;
    let moe = layer(&s, c.clone());
    let before = moe.grid_utilization();
    let want = reference(&s, &moe, &x, &g, 1.0, &[], &before);
    let got = run(&moe, &x, &g, 1.0);
    assert_close("everything dropped: nothing dropped", &got, &want);
    // half the coordinates dropped: finite, and some pass routes or weighs differently
    c.grid_dropout = 0.5;
    let mut moe = layer(&s, c);
    let plain = reference(&s, &moe, &x, &g, 1.0, &[], &moe.grid_utilization());
    let mut differs = false;
    for _ in 0..6 {
        let p = run(&moe, &x, &g, 1.0);
        assert_finite("grid dropout", &p);
        differs |= max_rel_diff(&p.out, &plain.out) > 1e-4;
    }
    assert!(differs, "grid dropout changes the routing in training");
    moe.set_training(false);
    let before = moe.grid_utilization();
    let want = reference(&s, &moe, &x, &g, 1.0, &[], &before);
    let got = run(&moe, &x, &g, 1.0);
    assert_close("eval: no grid dropout", &got, &want);
}

/// Gating `W = 0`, bias `[0, ln 2, 0 | ln 3, 0, 0]`: every sample's softmaxes are `[1/4, 1/2, 1/4]` and
/// `[3/5, 1/5, 1/5]` and every sample goes to expert `1.0`; after one pass (α 0.9) the utilization is
/// `[0.3, 0.4, 0.3 | 0.4, 0.3, 0.3]`. Per dimension: `9·mean([.075, .2, .075]) + 9·mean([.24, .06, .06])`
/// = 1.05 + 1.08 = 2.13, with bias gradient `[-.0375, .075, -.0375, .072, -.036, -.036]`; hivemind's
/// literal code: `9·0.3·mean(p0) + 9·0.4·mean(p1)` = 0.9 + 1.2 = 2.1, gradient zero. (The same numbers
/// come out of hivemind's expressions in torch.)
#[test]
fn balancing_loss_matches_the_hand_checked_case() {
    let s = setup(&[]);
    let mut rng = Rng::new(6);
    let x = rand(&mut rng, &[4, H]);
    let total: usize = GRID.iter().sum();
    let bias = vec![0.0, 2f32.ln(), 0.0, 3f32.ln(), 0.0, 0.0];
    for (mode, want, want_grad) in [
        (
            BalancingLoss::PerDimension,
            2.13f32,
            [-0.0375f32, 0.075, -0.0375, 0.072, -0.036, -0.036],
        ),
        (BalancingLoss::HivemindLiteral, 2.1, [0.0; 6]),
    ] {
        let mut c = config();
        c.balancing_loss = mode;
        let moe = layer(&s, c); // in training, with jitter: W = 0 makes the gating ignore it
        set_gating(&moe, vec![0.0; total * H], bias.clone());
        let y = moe.forward(&x).unwrap();
        let got = y.balancing_loss.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "{mode:?}: {got} vs {want}");
        let u = moe.grid_utilization();
        let want_u = [[0.3f32, 0.4, 0.3], [0.4, 0.3, 0.3]];
        for (a, b) in u.iter().flatten().zip(want_u.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{u:?}");
        }
        let grads = y.balancing_loss.backward().unwrap();
        let gb = values(grads.get(moe.params()[1].as_tensor()).unwrap());
        for (a, b) in gb.iter().zip(want_grad) {
            assert!((a - b).abs() < 1e-5, "{mode:?}: bias gradient {gb:?}");
        }
        // the loss flows through the softmax only: no expert is asked for a backward
        assert!(
            s.transport
                .uids()
                .iter()
                .all(|u| s.transport.calls(u).backward == 0)
        );
    }
}

/// Gating: dimension 0 scores `[10·x₀, 1, 0]`, dimension 1 `[0, 0, 1]`; samples with `x₀ = 1` go to
/// expert `0.2`, those with `x₀ = −1` to `1.2`.
#[test]
fn utilization_follows_hiveminds_moving_average() {
    let s = setup(&[]);
    let mut c = config();
    c.jitter_eps = 0.0;
    let mut moe = layer(&s, c);
    let total: usize = GRID.iter().sum();
    let mut w = vec![0.0; total * H];
    w[0] = 10.0;
    set_gating(&moe, w, vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let mut rng = Rng::new(7);
    let mut xs = rng.uniform(1.0, 4 * H);
    for (s, sign) in [1.0, 1.0, 1.0, -1.0].into_iter().enumerate() {
        xs[s * H] = sign;
    }
    let x = Tensor::from_vec(xs, (4, H), &Device::Cpu).unwrap();
    let close = |u: Vec<Vec<f32>>, want: [[f32; 3]; 2]| {
        for (a, b) in u.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{u:?} vs {want:?}");
        }
    };
    // batch: dimension 0 [3, 1, 0]/4, dimension 1 [0, 0, 4]/4
    moe.forward(&x).unwrap();
    close(moe.grid_utilization(), [[0.375, 0.325, 0.3], [0.3, 0.3, 0.4]]);
    // expert 0.2 fails: only the fourth sample counts; eval mode updates the average too (hivemind's)
    moe.set_training(false);
    s.transport.set_fault(&uid(0, 2), Some(Fault::fail()));
    moe.forward(&x).unwrap();
    close(
        moe.grid_utilization(),
        [[0.3375, 0.3925, 0.27], [0.27, 0.27, 0.46]],
    );
    // nothing answers: the batch utilization is zero and the average decays
    s.transport.set_fault(&uid(1, 2), Some(Fault::fail()));
    moe.forward(&x).unwrap();
    close(
        moe.grid_utilization(),
        [[0.30375, 0.35325, 0.243], [0.243, 0.243, 0.414]],
    );
    // a checkpointed average can be restored
    moe.set_grid_utilization(vec![vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]])
        .unwrap();
    close(moe.grid_utilization(), [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
}

#[test]
fn failed_experts_give_zeros_never_nan() {
    let s = setup(&[]);
    let moe = layer(&s, config()); // hivemind's defaults: training, jitter on
    let mut rng = Rng::new(8);
    let x = rand(&mut rng, &[16, H]);
    let g = rand(&mut rng, &[16, H]);
    let healthy = run(&moe, &x, &g, 1.0);
    assert_finite("healthy", &healthy);
    // fail the expert the most samples chose: their experts' share is zero, their output is the input
    let busiest = s
        .transport
        .uids()
        .into_iter()
        .max_by_key(|u| s.transport.calls(u).forward)
        .unwrap();
    s.transport.set_fault(&busiest, Some(Fault::fail()));
    let got = run(&moe, &x, &g, 1.0);
    assert_finite("one expert failing", &got);
    let zero = moe.stats().last_forward.unwrap().zero_samples;
    assert!(zero > 0, "some samples lost their only expert");
    let (out, xin) = (got.out.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
    let passthrough = out.iter().zip(&xin).filter(|(o, x)| o == x).count();
    assert_eq!(
        passthrough, zero,
        "exactly those samples get the input unchanged (not jittered)"
    );
    // every expert failing: no error (allow_zero_outputs, k_min 0), the output is the input
    for u in s.transport.uids() {
        s.transport.set_fault(&u, Some(Fault::fail()));
    }
    let all = run(&moe, &x, &g, 1.0);
    assert_finite("every expert failing", &all);
    assert_eq!(values(&all.out), values(&x));
    // the input gradient is the residual's plus the gating's (through the balancing loss)
    assert!(values(&all.grad_x).iter().all(|v| v.is_finite()));
    // backward failures count as zero gradients (backward_k_min 0)
    for u in s.transport.uids() {
        s.transport.set_fault(&u, Some(Fault::fail().only(Rpc::Backward)));
    }
    let back = run(&moe, &x, &g, 1.0);
    assert_finite("every backward failing", &back);
}

/// hivemind requires some expert to be found at all, and `allow_zero_outputs = false` with `k_min` is
/// honoured as in the mixture.
#[test]
fn strict_settings_refuse_zero_outputs() {
    let s = setup(&[]);
    let mut c = config();
    c.moe.k_min = 1;
    c.moe.allow_zero_outputs = false;
    let moe = layer(&s, c);
    let mut rng = Rng::new(9);
    let x = rand(&mut rng, &[4, H]);
    for u in s.transport.uids() {
        s.transport.set_fault(&u, Some(Fault::fail()));
    }
    let before = moe.grid_utilization();
    let e = moe.forward(&x).unwrap_err();
    assert!(matches!(e, MoeError::TooFewExperts(_)), "{e}");
    assert_eq!(
        moe.grid_utilization(),
        before,
        "a failed pass leaves the average alone"
    );
    let e = moe
        .forward(&Tensor::zeros((4, H + 1), DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(matches!(e, MoeError::BadConfig(_)), "{e}");
}
