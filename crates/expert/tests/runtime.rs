//! The batching runtime: merging, splitting, optimizer steps per batch, admission bounds, failures that
//! stay with their task, the gate, and shutdown. Real `ffn` experts of hidden size 8.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use apiary_expert::{
    BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertError, ExpertKind, Gate, Runtime,
    RuntimeConfig, RuntimeHandle,
};
use candle_core::{Device, Tensor};
use tokio::time::timeout;

const H: usize = 8;
const LONG: Duration = Duration::from_secs(20);

type Res<T = ()> = anyhow::Result<T>;

fn backend(seed: u64) -> ExpertBackend {
    let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, H), seed).expect("test setup");
    ExpertBackend::new(expert, BackendConfig::default()).expect("test setup")
}

fn rows(n: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (n, H), &Device::Cpu).expect("test setup")
}

fn spawn(n_experts: u64, config: RuntimeConfig) -> RuntimeHandle {
    let experts = (0..n_experts).map(|i| (format!("e{i}"), backend(i))).collect();
    Runtime::spawn(experts, config).expect("test setup")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .expect("test setup")
        .abs()
        .expect("test setup")
        .flatten_all()
        .expect("test setup")
        .max(0)
        .expect("test setup")
        .to_scalar::<f32>()
        .expect("test setup")
}

/// Polls `fut` once (so a task is queued before we go on) and returns it, still pending.
async fn queued<F: Future>(fut: F) -> Pin<Box<F>> {
    let mut fut = Box::pin(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_pending())).await;
    assert!(first, "the task should be queued, not finished");
    fut
}

/// Occupies the runtime thread with a `with_backend` call until the returned sender is dropped or used.
async fn hold(
    handle: &RuntimeHandle,
) -> (
    std::sync::mpsc::SyncSender<()>,
    tokio::task::JoinHandle<Result<(), ExpertError>>,
) {
    let (release, released) = std::sync::mpsc::sync_channel::<()>(1);
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let h = handle.clone();
    let join = tokio::spawn(async move {
        h.with_backend("e0", move |_| {
            let _ = entered_tx.send(());
            let _ = released.recv_timeout(LONG);
        })
        .await
    });
    timeout(LONG, entered)
        .await
        .expect("test setup")
        .expect("test setup");
    (release, join)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_are_merged_and_split_exactly() -> Res {
    let sizes = [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let total: usize = sizes.iter().sum();
    // the pool waits until all rows are there: exactly one batch
    let handle = spawn(
        1,
        RuntimeConfig {
            min_batch_size: total,
            batch_timeout: LONG,
            ..RuntimeConfig::default()
        },
    );
    let reference = backend(0);
    let mut joins = Vec::new();
    for &n in &sizes {
        let h = handle.clone();
        let x = rows(n);
        joins.push(tokio::spawn(async move {
            let y = h.forward("e0", vec![x.clone()]).await;
            (x, y)
        }));
    }
    for join in joins {
        let (x, y) = timeout(LONG, join).await??;
        let y = y?;
        assert_eq!(y.len(), 1);
        let want = reference.forward(std::slice::from_ref(&x))?;
        assert_eq!(y[0].dims(), x.dims());
        assert!(max_abs_diff(&y[0], &want[0]) < 1e-5);
    }
    let stats = handle.stats();
    assert_eq!(stats.experts[0].forward_batches, 1, "{stats:?}");
    assert_eq!(stats.experts[0].forward_rows, total as u64);
    assert_eq!(stats.queued_rows, 0);
    assert!(stats.experts[0].busy > Duration::ZERO);
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_task_runs_after_the_batch_timeout() -> Res {
    let handle = spawn(
        1,
        RuntimeConfig {
            min_batch_size: 100,
            batch_timeout: Duration::from_millis(30),
            ..RuntimeConfig::default()
        },
    );
    let started = Instant::now();
    let y = timeout(LONG, handle.forward("e0", vec![rows(3)])).await??;
    assert_eq!(y[0].dims(), &[3, H]);
    assert!(started.elapsed() >= Duration::from_millis(30));
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_steps_the_optimizer_once_per_batch() -> Res {
    let handle = spawn(1, RuntimeConfig::default());
    let mut reference = backend(0);
    let (release, held) = hold(&handle).await;
    let (x1, g1, x2, g2) = (rows(3), rows(3), rows(5), rows(5));
    let t1 = queued(handle.backward("e0", vec![x1.clone()], vec![g1.clone()])).await;
    let t2 = queued(handle.backward("e0", vec![x2.clone()], vec![g2.clone()])).await;
    assert_eq!(handle.stats().experts[0].queued_backward_rows, 8);
    release.send(())?;
    timeout(LONG, held).await???;
    let d1 = timeout(LONG, t1).await??;
    let d2 = timeout(LONG, t2).await??;

    let want = reference.backward(&[Tensor::cat(&[&x1, &x2], 0)?], &[Tensor::cat(&[&g1, &g2], 0)?])?;
    assert!(max_abs_diff(&d1[0], &want[0].narrow(0, 0, 3)?) < 1e-5);
    assert!(max_abs_diff(&d2[0], &want[0].narrow(0, 3, 5)?) < 1e-5);

    let stats = handle.stats();
    assert_eq!(stats.experts[0].backward_batches, 1);
    assert_eq!(stats.experts[0].backward_rows, 8);
    assert_eq!(stats.experts[0].optimizer_steps, 1);
    assert_eq!(timeout(LONG, handle.with_backend("e0", |b| b.steps())).await??, 1);
    // the weights moved exactly as the reference's: forwards agree after the step
    let x = rows(4);
    let y = timeout(LONG, handle.forward("e0", vec![x.clone()])).await??;
    assert!(max_abs_diff(&y[0], &reference.forward(&[x])?[0]) < 1e-5);
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_errors() -> Res {
    let handle = spawn(
        2,
        RuntimeConfig {
            max_batch_size: 8,
            max_queued_rows: 8,
            ..RuntimeConfig::default()
        },
    );
    assert_eq!(handle.uids(), vec!["e0".to_owned(), "e1".to_owned()]);
    let err = handle.forward("nope", vec![rows(1)]).await.unwrap_err();
    assert!(
        matches!(&err, ExpertError::UnknownExpert(uid) if uid == "nope"),
        "{err}"
    );
    let err = handle.forward("e0", vec![rows(9)]).await.unwrap_err();
    assert!(
        matches!(err, ExpertError::BatchTooLarge { rows: 9, max: 8 }),
        "{err}"
    );
    let err = handle
        .backward("e0", vec![rows(4)], vec![rows(3)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ExpertError::BadTask(m) if m.contains("grad_outputs[0]")),
        "{err}"
    );
    let err = handle.forward("e0", vec![]).await.unwrap_err();
    assert!(matches!(err, ExpertError::BadTask(_)), "{err}");
    let err = handle.forward("e0", vec![rows(0)]).await.unwrap_err();
    assert!(matches!(err, ExpertError::EmptyBatch), "{err}");
    // a bad config is refused
    let bad = RuntimeConfig {
        max_queued_rows: 1,
        ..RuntimeConfig::default()
    };
    assert!(matches!(
        Runtime::spawn(vec![("a".into(), backend(0))], bad),
        Err(ExpertError::BadConfig(_))
    ));
    let twice = vec![("a".into(), backend(0)), ("a".into(), backend(1))];
    assert!(matches!(
        Runtime::spawn(twice, RuntimeConfig::default()),
        Err(ExpertError::BadConfig(_))
    ));
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_bounded_and_the_admitted_complete() -> Res {
    let handle = spawn(
        2,
        RuntimeConfig {
            max_batch_size: 4,
            max_queued_rows: 8,
            ..RuntimeConfig::default()
        },
    );
    let (release, held) = hold(&handle).await;
    let a = queued(handle.forward("e0", vec![rows(4)])).await;
    let b = queued(handle.forward("e0", vec![rows(4)])).await;
    let err = handle.forward("e0", vec![rows(1)]).await.unwrap_err();
    assert!(
        matches!(&err, ExpertError::Overloaded { uid, queued_rows: 8, limit: 8 } if uid == "e0"),
        "{err}"
    );
    // other pools are not affected
    let c = queued(handle.forward("e1", vec![rows(2)])).await;
    let d = queued(handle.backward("e0", vec![rows(2)], vec![rows(2)])).await;
    assert_eq!(handle.stats().queued_rows, 12);
    release.send(())?;
    timeout(LONG, held).await???;
    assert_eq!(timeout(LONG, a).await??[0].dims(), &[4, H]);
    assert_eq!(timeout(LONG, b).await??[0].dims(), &[4, H]);
    assert_eq!(timeout(LONG, c).await??[0].dims(), &[2, H]);
    assert_eq!(timeout(LONG, d).await??[0].dims(), &[2, H]);
    let stats = handle.stats();
    assert_eq!(stats.experts[0].forward_batches, 2); // 4 + 4 rows with batches of at most 4
    assert_eq!(stats.experts[1].forward_batches, 1);
    assert_eq!(stats.queued_rows, 0);
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_task_fails_alone() -> Res {
    let handle = spawn(1, RuntimeConfig::default());
    let reference = backend(0);
    let (release, held) = hold(&handle).await;
    let (x1, x2) = (rows(4), rows(2));
    let good1 = queued(handle.forward("e0", vec![x1.clone()])).await;
    let wrong_width = queued(handle.forward(
        "e0",
        vec![Tensor::zeros((4, H - 1), candle_core::DType::F32, &Device::Cpu)?],
    ))
    .await;
    let wrong_dtype = queued(handle.forward(
        "e0",
        vec![Tensor::zeros((3, H), candle_core::DType::F64, &Device::Cpu)?],
    ))
    .await;
    let good2 = queued(handle.forward("e0", vec![x2.clone()])).await;
    release.send(())?;
    timeout(LONG, held).await???;
    let y1 = timeout(LONG, good1).await??;
    let y2 = timeout(LONG, good2).await??;
    assert!(max_abs_diff(&y1[0], &reference.forward(&[x1])?[0]) < 1e-5);
    assert!(max_abs_diff(&y2[0], &reference.forward(&[x2])?[0]) < 1e-5);
    let err = timeout(LONG, wrong_width).await?.unwrap_err();
    assert!(matches!(err, ExpertError::Shape { .. }), "{err}");
    let err = timeout(LONG, wrong_dtype).await?.unwrap_err();
    assert!(matches!(err, ExpertError::NotF32Cpu { .. }), "{err}");
    let stats = handle.stats();
    assert_eq!(
        stats.experts[0].forward_batches, 1,
        "the two good tasks share a batch"
    );
    assert_eq!(stats.experts[0].forward_rows, 6);
    assert_eq!(stats.experts[0].failed_batches, 0);

    // non-finite grad_outputs fail their own task only, before the merge
    let (release, held) = hold(&handle).await;
    let nan = Tensor::full(f32::NAN, (2, H), &Device::Cpu)?;
    let poisoned = queued(handle.backward("e0", vec![rows(2)], vec![nan])).await;
    let fine = queued(handle.backward("e0", vec![rows(3)], vec![rows(3)])).await;
    release.send(())?;
    timeout(LONG, held).await???;
    let err = timeout(LONG, poisoned).await?.unwrap_err();
    assert!(matches!(err, ExpertError::NonFiniteGradient { .. }), "{err}");
    assert_eq!(timeout(LONG, fine).await??[0].dims(), &[3, H]);
    assert_eq!(handle.stats().experts[0].optimizer_steps, 1);
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_its_tasks_and_the_runtime_goes_on() -> Res {
    let handle = spawn(1, RuntimeConfig::default());
    let (release, held) = hold(&handle).await;
    // NaN inputs give NaN parameter gradients: the whole batch is refused, no step taken
    let nan_input = Tensor::full(f32::NAN, (2, H), &Device::Cpu)?;
    let a = queued(handle.backward("e0", vec![nan_input], vec![rows(2)])).await;
    let b = queued(handle.backward("e0", vec![rows(3)], vec![rows(3)])).await;
    release.send(())?;
    timeout(LONG, held).await???;
    let err = timeout(LONG, a).await?.unwrap_err();
    assert!(matches!(err, ExpertError::NonFiniteGradient { .. }), "{err}");
    let err = timeout(LONG, b).await?.unwrap_err();
    assert!(matches!(err, ExpertError::NonFiniteGradient { .. }), "{err}");
    let stats = handle.stats();
    assert_eq!(stats.experts[0].failed_batches, 1);
    assert_eq!(stats.experts[0].optimizer_steps, 0);
    let d = timeout(LONG, handle.backward("e0", vec![rows(3)], vec![rows(3)])).await??;
    assert_eq!(d[0].dims(), &[3, H]);
    assert_eq!(handle.stats().experts[0].optimizer_steps, 1);
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_pauses_and_run_resumes() -> Res {
    let handle = spawn(1, RuntimeConfig::default());
    assert_eq!(handle.stats().last_stop_latency, None);
    // idle: the stop takes no time
    handle.set_gate(Gate::Stop);
    assert_eq!(handle.stats().last_stop_latency, Some(Duration::ZERO));
    assert_eq!(handle.stats().gate, Gate::Stop);
    let err = handle.forward("e0", vec![rows(1)]).await.unwrap_err();
    assert!(matches!(err, ExpertError::Paused), "{err}");
    // checkpoints still work while paused
    assert_eq!(timeout(LONG, handle.with_backend("e0", |b| b.steps())).await??, 0);
    handle.set_gate(Gate::Run);

    // queued tasks fail with Paused at once
    let (release, held) = hold(&handle).await;
    let a = queued(handle.forward("e0", vec![rows(2)])).await;
    let b = queued(handle.backward("e0", vec![rows(2)], vec![rows(2)])).await;
    handle.set_gate(Gate::Stop);
    assert!(matches!(timeout(LONG, a).await?, Err(ExpertError::Paused)));
    assert!(matches!(timeout(LONG, b).await?, Err(ExpertError::Paused)));
    assert_eq!(handle.stats().queued_rows, 0);
    release.send(())?;
    timeout(LONG, held).await???;
    handle.set_gate(Gate::Run);
    let y = timeout(LONG, handle.forward("e0", vec![rows(2)])).await??;
    assert_eq!(y[0].dims(), &[2, H]);

    // a stop while a big batch runs: the batch finishes, the latency is recorded and bounded
    let big_x = rows(4096);
    let big_g = rows(4096);
    let big = queued(handle.backward("e0", vec![big_x], vec![big_g])).await;
    let deadline = Instant::now() + LONG;
    while handle.stats().queued_rows != 0 {
        // spin until the runtime takes the batch
        assert!(Instant::now() < deadline, "the big task was never taken");
        std::hint::spin_loop();
    }
    let asked = Instant::now();
    handle.set_gate(Gate::Stop);
    let result = timeout(LONG, big).await?;
    // either it was still running (and finished) or it had finished before the stop
    assert_eq!(result?[0].dims(), &[4096, H]);
    let latency = handle
        .stats()
        .last_stop_latency
        .expect("recorded once the batch ends");
    assert!(latency <= asked.elapsed() + Duration::from_millis(1));
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    handle.set_gate(Gate::Run);
    assert_eq!(
        timeout(LONG, handle.forward("e0", vec![rows(1)])).await??[0].dims(),
        &[1, H]
    );
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pace_idles_between_batches() -> Res {
    let handle = spawn(1, RuntimeConfig::default());
    handle.set_gate(Gate::Pace { duty: 0.5 });
    let n: u64 = 12;
    let started = Instant::now();
    for _ in 0..n {
        let x = rows(1024);
        timeout(LONG, handle.backward("e0", vec![x.clone()], vec![x])).await??;
    }
    let wall = started.elapsed();
    let stats = handle.stats();
    assert_eq!(stats.experts[0].backward_batches, n);
    let busy = stats.experts[0].busy;
    // every batch but the last is followed by an idle as long as itself
    assert!(
        wall.as_secs_f64() >= 1.7 * busy.as_secs_f64(),
        "wall {wall:?} busy {busy:?}"
    );

    // a long idle ends at once when the gate opens
    handle.set_gate(Gate::Pace { duty: 0.01 });
    let x = rows(4096);
    timeout(LONG, handle.backward("e0", vec![x.clone()], vec![x])).await??;
    let t = handle.stats().experts[0].busy - busy; // that batch's time; now idling ~99 t
    let next = queued(handle.forward("e0", vec![rows(1)])).await;
    let opened = Instant::now();
    handle.set_gate(Gate::Run);
    timeout(LONG, next).await??;
    let waited = opened.elapsed();
    assert!(
        waited < t * 50 + Duration::from_millis(200),
        "waited {waited:?} after a batch of {t:?}"
    );
    handle.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_queued_tasks_and_joins() -> Res {
    let handle = spawn(1, RuntimeConfig::default());
    let (release, held) = hold(&handle).await;
    let a = queued(handle.forward("e0", vec![rows(2)])).await;
    let b = queued(handle.backward("e0", vec![rows(2)], vec![rows(2)])).await;
    let closing = tokio::spawn({
        let h = handle.clone();
        async move { h.shutdown().await }
    });
    assert!(matches!(timeout(LONG, a).await?, Err(ExpertError::Stopped)));
    assert!(matches!(timeout(LONG, b).await?, Err(ExpertError::Stopped)));
    let err = handle.forward("e0", vec![rows(1)]).await.unwrap_err();
    assert!(matches!(err, ExpertError::Stopped), "{err}");
    assert!(!closing.is_finished(), "shutdown waits for the running work");
    release.send(())?;
    timeout(LONG, held).await???; // the running work finished normally
    timeout(LONG, closing).await??;
    assert!(handle.stats().stopped);
    let err = handle.with_backend("e0", |b| b.steps()).await.unwrap_err();
    assert!(matches!(err, ExpertError::Stopped), "{err}");
    // a second shutdown returns at once
    timeout(LONG, handle.shutdown()).await?;
    Ok(())
}

#[test]
fn handles_are_send_sync_and_defaults_are_documented() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<RuntimeHandle>();
    let c = RuntimeConfig::default();
    assert_eq!(c.max_batch_size, 4096);
    assert_eq!(c.min_batch_size, 1);
    assert_eq!(c.batch_timeout, Duration::from_millis(10));
    assert_eq!(c.max_queued_rows, 4 * 4096);
    assert_eq!(Gate::default(), Gate::Run);
}
