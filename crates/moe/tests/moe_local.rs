//! `RemoteMixtureOfExperts` over in-process experts (`LocalTransport`, `StaticRouter`): outputs and
//! gradients equal a dense reference computed with candle's autograd through the same experts; failed
//! experts are masked out of the softmax and get no backward; a sample whose experts all failed gets a
//! zero output, never NaN; stragglers are cut off after `timeout_after_k_min`; each expert gets one request
//! per batch.

#![allow(clippy::unwrap_used)]

mod local_common;

use local_common::{GRID, H, Setup, rand, setup, uid};

use std::sync::Arc;
use std::time::{Duration, Instant};

use apiary_moe::MoeError;
use apiary_moe::lm::Rng;
use apiary_moe::moe::{MoeConfig, RemoteMixtureOfExperts, Router, coordinates};
use apiary_moe::transport::Fault;
use candle_core::{D, Device, Tensor, Var};

fn layer(s: &Setup, config: MoeConfig) -> RemoteMixtureOfExperts {
    RemoteMixtureOfExperts::new(
        config,
        Arc::new(s.router.clone()),
        Arc::new(s.transport.clone()),
        s.rt.handle().clone(),
        7,
    )
    .unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The dense reference: the same gating, the same choice of experts, the experts computed in-process
/// through candle's autograd (`forward_reference`), experts in `dead` masked out. Returns the output and
/// the gradients of `Σ out·g` with respect to `x`, the gating weight and bias.
fn reference(
    s: &Setup,
    moe: &RemoteMixtureOfExperts,
    x: &Tensor,
    g: &Tensor,
    dead: &[String],
) -> (Tensor, Tensor, Tensor, Tensor) {
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
    let rows = logits.to_vec2::<f32>().unwrap();
    let scores: Vec<Vec<Vec<f32>>> = rows
        .iter()
        .map(|r| vec![r[..GRID[0]].to_vec(), r[GRID[0]..].to_vec()])
        .collect();
    let chosen =
        s.rt.block_on(s.router.choose(&scores, moe.config().k_best))
            .unwrap();
    let mut outs = Vec::new();
    for (sample, experts) in chosen.iter().enumerate() {
        let xs = xv.as_tensor().narrow(0, sample, 1).unwrap();
        let mut ys = Vec::new();
        let mut ls = Vec::new();
        for e in experts.iter().filter(|e| !dead.contains(&e.uid)) {
            let expert = &s.experts.iter().find(|(a, _)| a == e).unwrap().1;
            ys.push(expert.forward_reference(std::slice::from_ref(&xs)).unwrap()[0].clone());
            let c = coordinates("ffn.", &GRID, &e.uid).unwrap();
            let l = (logits.get(sample).unwrap().get(c[0]).unwrap()
                + logits.get(sample).unwrap().get(GRID[0] + c[1]).unwrap())
            .unwrap();
            ls.push(l);
        }
        if ys.is_empty() {
            outs.push(Tensor::zeros((1, H), candle_core::DType::F32, &Device::Cpu).unwrap());
            continue;
        }
        let l = Tensor::stack(&ls, 0).unwrap();
        let m = l.max_keepdim(D::Minus1).unwrap().detach();
        let e = l.broadcast_sub(&m).unwrap().exp().unwrap();
        let wts = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let y = Tensor::cat(&ys, 0).unwrap(); // (k, H)
        outs.push(wts.unsqueeze(0).unwrap().matmul(&y).unwrap());
    }
    let out = Tensor::cat(&outs, 0).unwrap();
    let loss = (&out * g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    (
        out.detach(),
        grads.get(xv.as_tensor()).unwrap().clone(),
        grads.get(w.as_tensor()).unwrap().clone(),
        grads.get(b.as_tensor()).unwrap().clone(),
    )
}

/// Runs the layer forward and backward on `Σ out·g`: output and gradients of x, gating weight and bias.
fn run(moe: &RemoteMixtureOfExperts, x: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
    let xv = Var::from_tensor(&x.copy().unwrap()).unwrap();
    let out = moe.forward(xv.as_tensor()).unwrap();
    let loss = (&out * g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let p = moe.params();
    (
        out.detach(),
        grads.get(xv.as_tensor()).unwrap().clone(),
        grads.get(p[0].as_tensor()).unwrap().clone(),
        grads.get(p[1].as_tensor()).unwrap().clone(),
    )
}

fn assert_close(what: &str, a: &(Tensor, Tensor, Tensor, Tensor), b: &(Tensor, Tensor, Tensor, Tensor)) {
    for (name, x, y) in [
        ("output", &a.0, &b.0),
        ("input grad", &a.1, &b.1),
        ("gating weight grad", &a.2, &b.2),
        ("gating bias grad", &a.3, &b.3),
    ] {
        let d = max_rel_diff(x, y);
        assert!(d < 1e-5, "{what}: {name} differs by {d}");
    }
}

#[test]
fn outputs_and_gradients_equal_the_dense_reference() {
    let s = setup(&[(2, 2)]); // a hole in the grid, as in a real swarm
    let moe = layer(&s, MoeConfig::new(H, "ffn.", GRID.to_vec()));
    let mut rng = Rng::new(1);
    let x = rand(&mut rng, &[12, H]);
    let g = rand(&mut rng, &[12, H]);
    let want = reference(&s, &moe, &x, &g, &[]);
    let got = run(&moe, &x, &g);
    assert_close("all experts alive", &got, &want);
    // one request per expert per pass, whatever the number of samples routed to it
    let stats = moe.stats();
    let fwd = stats.last_forward.unwrap();
    assert_eq!(fwd.samples, 12);
    assert_eq!(fwd.answered_pairs, 12 * 4);
    assert!(fwd.experts_called <= 8);
    for uid in s.transport.uids() {
        let calls = s.transport.calls(&uid);
        assert!(
            calls.forward <= 1 && calls.backward == calls.forward,
            "{uid}: {calls:?}"
        );
    }
    assert_eq!(stats.last_backward.unwrap().answered_pairs, 12 * 4);
}

#[test]
fn failed_experts_are_masked_out_and_get_no_backward() {
    let s = setup(&[]);
    let moe = layer(&s, MoeConfig::new(H, "ffn.", GRID.to_vec()));
    let mut rng = Rng::new(2);
    let x = rand(&mut rng, &[10, H]);
    let g = rand(&mut rng, &[10, H]);
    let dead = vec![uid(0, 1), uid(1, 1)];
    for d in &dead {
        s.transport.set_fault(d, Some(Fault::fail()));
    }
    let want = reference(&s, &moe, &x, &g, &dead);
    let got = run(&moe, &x, &g);
    assert_close("two experts failing", &got, &want);
    for d in &dead {
        assert_eq!(
            s.transport.calls(d).backward,
            0,
            "{d} failed forward: no backward"
        );
    }
    let failed: Vec<String> = moe
        .stats()
        .last_forward
        .unwrap()
        .failed
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert!(failed.iter().all(|u| dead.contains(u)));
}

#[test]
fn a_sample_whose_experts_all_failed_gets_zeros_not_nan() {
    let s = setup(&[]);
    let mut config = MoeConfig::new(H, "ffn.", GRID.to_vec());
    config.k_best = 1;
    let moe = layer(&s, config);
    let mut rng = Rng::new(3);
    let x = rand(&mut rng, &[16, H]);
    let g = rand(&mut rng, &[16, H]);
    // fail the expert the most samples chose
    let healthy = run(&moe, &x, &g);
    let busiest = s
        .transport
        .uids()
        .into_iter()
        .max_by_key(|u| s.transport.calls(u).forward)
        .unwrap();
    s.transport.set_fault(&busiest, Some(Fault::fail()));
    let got = run(&moe, &x, &g);
    let zero = moe.stats().last_forward.unwrap().zero_samples;
    assert!(zero > 0, "some samples lost their only expert");
    let out = got.0.to_vec2::<f32>().unwrap();
    let zero_rows = out.iter().filter(|r| r.iter().all(|&v| v == 0.0)).count();
    assert_eq!(zero_rows, zero, "exactly those samples are zero");
    for t in [&got.0, &got.1, &got.2, &got.3] {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|v| v.is_finite()), "never NaN");
    }
    // the other samples still get their expert's output
    let before = healthy.0.to_vec2::<f32>().unwrap();
    let kept = out
        .iter()
        .zip(&before)
        .filter(|(a, _)| a.iter().any(|&v| v != 0.0));
    assert_eq!(kept.clone().count(), 16 - zero);
    for (a, b) in kept {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5));
    }
    // every expert failing: a clear error
    for u in s.transport.uids() {
        s.transport.set_fault(&u, Some(Fault::fail()));
    }
    let e = moe.forward(&x).unwrap_err();
    assert!(matches!(e, MoeError::TooFewExperts(_)), "{e}");
}

#[test]
fn stragglers_are_cut_off_after_k_min() {
    let s = setup(&[]);
    let mut config = MoeConfig::new(H, "ffn.", GRID.to_vec());
    config.k_best = 3;
    config.timeout_after_k_min = Some(Duration::from_millis(300));
    let moe = layer(&s, config);
    let mut rng = Rng::new(4);
    let x = rand(&mut rng, &[6, H]);
    s.transport.set_fault(&uid(0, 0), Some(Fault::hang()));
    let t = Instant::now();
    let out = moe.forward(&x).unwrap();
    let took = t.elapsed();
    assert_eq!(out.dims(), &[6, H]);
    assert!(
        took < Duration::from_secs(5),
        "the hung expert was cut off: {took:?}"
    );
    let report = moe.stats().last_forward.unwrap();
    if report.experts_called > 1 {
        // (the hung expert was among the chosen ones unless the gating never picked it)
        assert!(report.failed.iter().all(|(u, _)| u == &uid(0, 0)), "{report:?}");
    }
}

#[test]
fn backward_failures_count_as_zero_gradients_until_too_few_answer() {
    let s = setup(&[]);
    let moe = layer(&s, MoeConfig::new(H, "ffn.", GRID.to_vec()));
    let mut rng = Rng::new(5);
    let x = rand(&mut rng, &[8, H]);
    let g = rand(&mut rng, &[8, H]);
    s.transport.set_fault(
        &uid(1, 2),
        Some(Fault::fail().only(apiary_moe::transport::Rpc::Backward)),
    );
    let got = run(&moe, &x, &g);
    for t in [&got.1, &got.2] {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|v| v.is_finite()));
    }
    // every backward failing: the step fails with a clear error
    for u in s.transport.uids() {
        s.transport
            .set_fault(&u, Some(Fault::fail().only(apiary_moe::transport::Rpc::Backward)));
    }
    let xv = Var::from_tensor(&x).unwrap();
    let out = moe.forward(xv.as_tensor()).unwrap();
    let e = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap_err();
    assert!(e.to_string().contains("too few experts"), "{e}");
}

/// The demo's model with MoE feed-forward layers over in-process experts learns a text (loss falls) and
/// trains the experts it routes to.
#[test]
fn the_trainer_learns_through_moe_layers() {
    use apiary_moe::lm::{Corpus, LmConfig, Split};
    use apiary_moe::trainer::{Trainer, TrainerConfig};
    let s = setup(&[]);
    let text = "to be, or not to be, that is the question: ".repeat(40);
    let corpus = Corpus::new(&text, 0.2).unwrap();
    let mut lm = LmConfig::new(corpus.vocab.len());
    lm.d_model = H;
    lm.layers = 1;
    lm.context = 16;
    let moes = vec![layer(&s, MoeConfig::new(H, "ffn.", GRID.to_vec()))];
    let config = TrainerConfig {
        batch: 8,
        seq: 16,
        lr: 1e-2,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(lm, moes, corpus, config).unwrap();
    let before = trainer.evaluate(Split::Valid).unwrap();
    for _ in 0..40 {
        let r = trainer.step().unwrap();
        assert!(r.loss.is_finite());
    }
    let after = trainer.evaluate(Split::Valid).unwrap();
    assert!(after < before - 0.5, "validation loss {before} -> {after}");
    let stats = trainer.moes()[0].stats();
    assert!(stats.backward_calls >= 40, "{stats:?}");
    assert_eq!(trainer.sample("to be", 10, 0.0, 1).unwrap().chars().count(), 10);
}
