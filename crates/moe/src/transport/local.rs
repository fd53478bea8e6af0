//! [`LocalTransport`]: experts in this process, with injectable faults.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apiary_expert::schema::ExpertSchema;
use apiary_expert::{ExpertBackend, ExpertError, RuntimeHandle};
use candle_core::Tensor;
use futures::FutureExt;
use futures::future::BoxFuture;

use super::convert::{self, Expected};
use super::{ExpertAddr, ExpertInfo, ExpertTransport, Rpc, TransportConfig, TransportError};

/// What an injected fault does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The call fails at once with [`TransportError::Injected`].
    Fail,
    /// The call never answers: it fails with [`TransportError::Timeout`] when its time limit runs out.
    Hang,
    /// The call answers after this delay (or times out if the delay is longer than its limit).
    Delay(Duration),
    /// The call fails at once with [`TransportError::Unreachable`].
    Unreachable,
}

/// A fault injected into one expert's calls with [`LocalTransport::set_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What happens to an affected call.
    pub kind: FaultKind,
    /// Whether `info` calls are affected.
    pub info: bool,
    /// Whether `forward` calls are affected.
    pub forward: bool,
    /// Whether `backward` calls are affected.
    pub backward: bool,
    /// How many more calls it affects (`None`: every call until cleared).
    pub remaining: Option<u32>,
}

impl Fault {
    /// `kind` on every call (info, forward and backward), until cleared.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            info: true,
            forward: true,
            backward: true,
            remaining: None,
        }
    }

    /// Every call fails.
    pub fn fail() -> Self {
        Self::new(FaultKind::Fail)
    }

    /// Every call hangs until it times out.
    pub fn hang() -> Self {
        Self::new(FaultKind::Hang)
    }

    /// Every call is delayed by `delay`.
    pub fn delay(delay: Duration) -> Self {
        Self::new(FaultKind::Delay(delay))
    }

    /// Every call finds the expert unreachable.
    pub fn unreachable() -> Self {
        Self::new(FaultKind::Unreachable)
    }

    /// Affects only `rpc` calls.
    #[must_use]
    pub fn only(mut self, rpc: Rpc) -> Self {
        self.info = rpc == Rpc::Info;
        self.forward = rpc == Rpc::Forward;
        self.backward = rpc == Rpc::Backward;
        self
    }

    /// Affects only the next `n` calls it applies to, then clears itself (`0`: none).
    #[must_use]
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }

    fn applies_to(&self, rpc: Rpc) -> bool {
        match rpc {
            Rpc::Info => self.info,
            Rpc::Forward => self.forward,
            Rpc::Backward => self.backward,
        }
    }
}

/// How many calls one expert of a [`LocalTransport`] received (faulted ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// `info` calls.
    pub info: u64,
    /// `forward` calls.
    pub forward: u64,
    /// `backward` calls.
    pub backward: u64,
}

#[derive(Debug, Clone)]
enum Compute {
    /// A batching runtime (shared by several uids).
    Runtime(RuntimeHandle),
    /// One backend, computed on tokio's blocking pool, one call at a time.
    Backend(Arc<Mutex<ExpertBackend>>),
}

#[derive(Debug, Clone)]
struct LocalExpert {
    compute: Compute,
    info: Arc<ExpertInfo>,
}

#[derive(Debug, Default)]
struct State {
    faults: HashMap<String, Fault>,
    counts: HashMap<String, CallCounts>,
}

/// Experts in this process behind the [`ExpertTransport`] seam: no network and no compression, the same
/// checks of inputs against the schema, the same per-call time limits, and injectable [`Fault`]s, so
/// routing over experts (a mixture of experts) can be tested without servers.
///
/// The peer id of an [`ExpertAddr`] is ignored: experts are found by uid.
#[derive(Debug, Clone)]
pub struct LocalTransport {
    experts: Arc<HashMap<String, LocalExpert>>,
    state: Arc<Mutex<State>>,
    config: TransportConfig,
}

impl LocalTransport {
    /// An empty transport with `config`'s time limits; add experts with [`Self::with_backend`] /
    /// [`Self::with_runtime`].
    pub fn new(config: TransportConfig) -> Self {
        Self {
            experts: Arc::new(HashMap::new()),
            state: Arc::new(Mutex::new(State::default())),
            config,
        }
    }

    fn insert(&mut self, uid: String, compute: Compute, schema: &ExpertSchema) -> Result<(), TransportError> {
        let info =
            ExpertInfo::from_msgpack(&schema.rpc_info()).map_err(|reason| TransportError::BadInfo {
                uid: uid.clone(),
                reason,
            })?;
        Arc::make_mut(&mut self.experts).insert(
            uid,
            LocalExpert {
                compute,
                info: Arc::new(info),
            },
        );
        Ok(())
    }

    /// Serves `backend` as `uid`, described by `schema` (e.g. [`ExpertSchema::server_create`]). Calls run
    /// one at a time on tokio's blocking pool; every backward takes one optimizer step.
    pub fn with_backend(
        mut self,
        uid: impl Into<String>,
        backend: ExpertBackend,
        schema: &ExpertSchema,
    ) -> Result<Self, TransportError> {
        self.insert(
            uid.into(),
            Compute::Backend(Arc::new(Mutex::new(backend))),
            schema,
        )?;
        Ok(self)
    }

    /// Serves every expert of `runtime` that `schemas` describes (batched as on a server).
    pub fn with_runtime(
        mut self,
        runtime: &RuntimeHandle,
        schemas: &HashMap<String, ExpertSchema>,
    ) -> Result<Self, TransportError> {
        for uid in runtime.uids() {
            if let Some(schema) = schemas.get(&uid) {
                self.insert(uid, Compute::Runtime(runtime.clone()), schema)?;
            }
        }
        Ok(self)
    }

    /// The served uids, sorted.
    pub fn uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.experts.keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Injects `fault` into `uid`'s calls (`None` clears it). Applies to calls that start afterwards.
    pub fn set_fault(&self, uid: &str, fault: Option<Fault>) {
        let mut state = self.lock();
        match fault {
            Some(f) => {
                state.faults.insert(uid.to_owned(), f);
            }
            None => {
                state.faults.remove(uid);
            }
        }
    }

    /// Clears every fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// How many calls `uid` received.
    pub fn calls(&self, uid: &str) -> CallCounts {
        self.lock().counts.get(uid).copied().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call and takes the fault that applies to it, if any.
    fn begin(&self, uid: &str, rpc: Rpc) -> Option<FaultKind> {
        let mut state = self.lock();
        if self.experts.contains_key(uid) {
            let counts = state.counts.entry(uid.to_owned()).or_default();
            match rpc {
                Rpc::Info => counts.info += 1,
                Rpc::Forward => counts.forward += 1,
                Rpc::Backward => counts.backward += 1,
            }
        }
        let fault = state.faults.get_mut(uid)?;
        if !fault.applies_to(rpc) {
            return None;
        }
        let kind = fault.kind;
        match fault.remaining.as_mut() {
            Some(0) => {
                state.faults.remove(uid);
                return None;
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    state.faults.remove(uid);
                }
            }
            None => {}
        }
        Some(kind)
    }

    fn timeout_of(&self, rpc: Rpc) -> Duration {
        match rpc {
            Rpc::Info => self.config.info_timeout,
            Rpc::Forward => self.config.forward_timeout,
            Rpc::Backward => self.config.backward_timeout,
        }
    }

    /// Runs one call: counts it, applies its fault, finds the expert, bounds it by its time limit.
    async fn call<T>(
        &self,
        expert: &ExpertAddr,
        rpc: Rpc,
        body: impl AsyncFnOnce(&LocalExpert) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let uid = &expert.uid;
        let fault = self.begin(uid, rpc);
        let timeout = self.timeout_of(rpc);
        let run = async {
            match fault {
                Some(FaultKind::Fail) => {
                    return Err(TransportError::Injected {
                        uid: uid.clone(),
                        rpc,
                    });
                }
                Some(FaultKind::Unreachable) => {
                    return Err(TransportError::Unreachable {
                        uid: uid.clone(),
                        reason: format!("peer {}: injected fault", expert.peer),
                    });
                }
                Some(FaultKind::Hang) => futures::future::pending::<()>().await,
                Some(FaultKind::Delay(d)) => tokio::time::sleep(d).await,
                None => {}
            }
            let local = self
                .experts
                .get(uid)
                .ok_or_else(|| TransportError::UnknownExpert { uid: uid.clone() })?;
            body(local).await
        };
        tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
            Err(TransportError::Timeout {
                uid: uid.clone(),
                rpc,
                after: timeout,
            })
        })
    }

    async fn forward_impl(
        &self,
        expert: &ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, TransportError> {
        let uid = expert.uid.clone();
        let rpc = Rpc::Forward;
        self.call(expert, rpc, async |local: &LocalExpert| {
            let rows = convert::check_against(&inputs, &local.info.inputs, "input")
                .map_err(|reason| bad_input(&uid, rpc, reason))?;
            let expected =
                Expected::outputs(rows, &local.info.outputs).map_err(|reason| TransportError::BadInfo {
                    uid: uid.clone(),
                    reason,
                })?;
            let outputs = match &local.compute {
                Compute::Runtime(runtime) => runtime.forward(&uid, inputs).await,
                Compute::Backend(backend) => {
                    let backend = backend.clone();
                    blocking(move || lock(&backend).forward(&inputs)).await
                }
            }
            .map_err(|source| local_error(&uid, rpc, source))?;
            check_outputs(&uid, rpc, outputs, &expected)
        })
        .await
    }

    async fn backward_impl(
        &self,
        expert: &ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, TransportError> {
        let uid = expert.uid.clone();
        let rpc = Rpc::Backward;
        self.call(expert, rpc, async |local: &LocalExpert| {
            let rows = convert::check_against(&inputs, &local.info.inputs, "input")
                .map_err(|reason| bad_input(&uid, rpc, reason))?;
            let grad_rows = convert::check_against(&grad_outputs, &local.info.outputs, "output gradient")
                .map_err(|reason| bad_input(&uid, rpc, reason))?;
            if rows != grad_rows {
                return Err(bad_input(
                    &uid,
                    rpc,
                    format!("the inputs have {rows} rows, the output gradients {grad_rows}"),
                ));
            }
            let expected = Expected::grads(&inputs);
            let grads = match &local.compute {
                Compute::Runtime(runtime) => runtime.backward(&uid, inputs, grad_outputs).await,
                Compute::Backend(backend) => {
                    let backend = backend.clone();
                    blocking(move || lock(&backend).backward(&inputs, &grad_outputs)).await
                }
            }
            .map_err(|source| local_error(&uid, rpc, source))?;
            check_outputs(&uid, rpc, grads, &expected)
        })
        .await
    }
}

fn lock(backend: &Mutex<ExpertBackend>) -> std::sync::MutexGuard<'_, ExpertBackend> {
    backend.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> apiary_expert::Result<T> + Send + 'static,
) -> apiary_expert::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ExpertError::BadTask(format!(
            "the expert computation panicked: {e}"
        )))
    })
}

fn bad_input(uid: &str, rpc: Rpc, reason: String) -> TransportError {
    TransportError::BadInput {
        uid: uid.to_owned(),
        rpc,
        reason,
    }
}

fn local_error(uid: &str, rpc: Rpc, source: ExpertError) -> TransportError {
    match source {
        ExpertError::UnknownExpert(uid) => TransportError::UnknownExpert { uid },
        source => TransportError::Local {
            uid: uid.to_owned(),
            rpc,
            source: Box::new(source),
        },
    }
}

/// The same count and shape checks as a network reply gets.
fn check_outputs(
    uid: &str,
    rpc: Rpc,
    outputs: Vec<Tensor>,
    expected: &[Expected],
) -> Result<Vec<Tensor>, TransportError> {
    let bad = |reason: String| TransportError::BadReply {
        uid: uid.to_owned(),
        rpc,
        reason,
    };
    if outputs.len() != expected.len() {
        return Err(bad(format!(
            "expected {} tensors, got {}",
            expected.len(),
            outputs.len()
        )));
    }
    for (i, (t, e)) in outputs.iter().zip(expected).enumerate() {
        if t.dims() != e.shape.as_slice() {
            return Err(bad(format!(
                "tensor {i}: expected shape {:?}, got {:?}",
                e.shape,
                t.dims()
            )));
        }
    }
    Ok(outputs)
}

impl ExpertTransport for LocalTransport {
    fn info<'a>(&'a self, expert: &'a ExpertAddr) -> BoxFuture<'a, Result<Arc<ExpertInfo>, TransportError>> {
        async move {
            self.call(expert, Rpc::Info, async |local: &LocalExpert| {
                Ok(local.info.clone())
            })
            .await
        }
        .boxed()
    }

    fn forward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        self.forward_impl(expert, inputs).boxed()
    }

    fn backward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        self.backward_impl(expert, inputs, grad_outputs).boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use apiary_expert::runtime::{Runtime, RuntimeConfig};
    use apiary_expert::{BackendConfig, Expert, ExpertConfig, ExpertKind};
    use apiary_p2p::PeerId;
    use apiary_wire::proto::runtime::CompressionType;
    use candle_core::Device;

    use super::*;

    const H: usize = 8;

    fn backend(seed: u64) -> ExpertBackend {
        let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, H), seed).unwrap();
        ExpertBackend::new(expert, BackendConfig::default()).unwrap()
    }

    fn schema() -> ExpertSchema {
        ExpertSchema::server_create(ExpertKind::Ffn, H, CompressionType::None, 64)
    }

    fn config(ms: u64) -> TransportConfig {
        let t = Duration::from_millis(ms);
        TransportConfig {
            info_timeout: t,
            forward_timeout: t,
            backward_timeout: t,
        }
    }

    fn transport(ms: u64) -> LocalTransport {
        LocalTransport::new(config(ms))
            .with_backend("ffn.0", backend(1), &schema())
            .unwrap()
            .with_backend("ffn.1", backend(2), &schema())
            .unwrap()
    }

    fn addr(uid: &str) -> ExpertAddr {
        ExpertAddr::new(uid, PeerId::random())
    }

    fn x(rows: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (rows, H), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[tokio::test]
    async fn computes_as_the_backend_does() {
        let t = transport(5_000);
        let mut reference = backend(1);
        let e = addr("ffn.0");
        let info = t.info(&e).await.unwrap();
        assert_eq!(info.inputs[0].instance_size, vec![H as u64]);
        let input = x(3);
        let y = t.forward(&e, vec![input.clone()]).await.unwrap();
        let y_ref = reference.forward(std::slice::from_ref(&input)).unwrap();
        assert_eq!(max_diff(&y[0], &y_ref[0]), 0.0);
        let g = x(3);
        let dx = t
            .backward(&e, vec![input.clone()], vec![g.clone()])
            .await
            .unwrap();
        let dx_ref = reference.backward(std::slice::from_ref(&input), &[g]).unwrap();
        assert_eq!(max_diff(&dx[0], &dx_ref[0]), 0.0);
        // both took the same optimizer step
        let y = t.forward(&e, vec![input.clone()]).await.unwrap();
        let y_ref = reference.forward(&[input]).unwrap();
        assert_eq!(max_diff(&y[0], &y_ref[0]), 0.0);
        assert_eq!(
            t.calls("ffn.0"),
            CallCounts {
                info: 1,
                forward: 2,
                backward: 1
            }
        );
        assert_eq!(t.calls("ffn.1"), CallCounts::default());
    }

    #[tokio::test]
    async fn unknown_experts_and_bad_inputs_are_errors() {
        let t = transport(5_000);
        let err = t.forward(&addr("ffn.9"), vec![x(2)]).await.unwrap_err();
        assert!(
            matches!(&err, TransportError::UnknownExpert { uid } if uid == "ffn.9"),
            "{err}"
        );
        assert!(matches!(
            t.info(&addr("ffn.9")).await,
            Err(TransportError::UnknownExpert { .. })
        ));
        let e = addr("ffn.0");
        let wide = Tensor::zeros((2, H + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = t.forward(&e, vec![wide]).await.unwrap_err();
        assert!(matches!(err, TransportError::BadInput { .. }), "{err}");
        let err = t.forward(&e, vec![x(2), x(2)]).await.unwrap_err();
        assert!(err.to_string().contains("expected 1 input tensors"), "{err}");
        let err = t.backward(&e, vec![x(2)], vec![x(3)]).await.unwrap_err();
        assert!(err.to_string().contains("rows"), "{err}");
        // the expert's own refusal (an empty batch) is a Local error
        let err = t.forward(&e, vec![x(0)]).await.unwrap_err();
        assert!(matches!(err, TransportError::Local { .. }), "{err}");
        assert_eq!(t.forward(&e, vec![x(2)]).await.unwrap()[0].dims(), &[2, H]);
    }

    #[tokio::test]
    async fn injected_failures_hit_only_their_expert() {
        let t = transport(5_000);
        let (e0, e1) = (addr("ffn.0"), addr("ffn.1"));
        t.set_fault("ffn.0", Some(Fault::fail()));
        let err = t.forward(&e0, vec![x(2)]).await.unwrap_err();
        assert!(
            matches!(&err, TransportError::Injected { uid, rpc: Rpc::Forward } if uid == "ffn.0"),
            "{err}"
        );
        assert_eq!(err.uid(), "ffn.0");
        assert!(matches!(t.info(&e0).await, Err(TransportError::Injected { .. })));
        assert!(t.forward(&e1, vec![x(2)]).await.is_ok());
        t.set_fault("ffn.0", Some(Fault::unreachable()));
        assert!(matches!(
            t.forward(&e0, vec![x(2)]).await,
            Err(TransportError::Unreachable { .. })
        ));
        t.set_fault("ffn.0", None);
        assert!(t.forward(&e0, vec![x(2)]).await.is_ok());
        // a clone shares faults and counts
        let other = t.clone();
        other.set_fault("ffn.1", Some(Fault::fail()));
        assert!(t.forward(&e1, vec![x(2)]).await.is_err());
        t.clear_faults();
        assert!(other.forward(&e1, vec![x(2)]).await.is_ok());
        assert_eq!(t.calls("ffn.1").forward, 3);
    }

    #[tokio::test]
    async fn scoped_and_counted_faults() {
        let t = transport(5_000);
        let e = addr("ffn.0");
        t.set_fault("ffn.0", Some(Fault::fail().only(Rpc::Backward).times(2)));
        let input = x(2);
        let y = t.forward(&e, vec![input.clone()]).await.unwrap();
        for _ in 0..2 {
            let err = t
                .backward(&e, vec![input.clone()], vec![y[0].clone()])
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    TransportError::Injected {
                        rpc: Rpc::Backward,
                        ..
                    }
                ),
                "{err}"
            );
        }
        // spent: the third backward goes through
        let dx = t.backward(&e, vec![input], vec![y[0].clone()]).await.unwrap();
        assert_eq!(dx[0].dims(), &[2, H]);
        assert_eq!(t.calls("ffn.0").backward, 3);
    }

    #[tokio::test]
    async fn hangs_and_delays_are_bounded_by_the_timeout() {
        let t = transport(150);
        let e = addr("ffn.0");
        t.set_fault("ffn.0", Some(Fault::hang().only(Rpc::Forward)));
        let start = Instant::now();
        let err = t.forward(&e, vec![x(2)]).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Timeout { rpc: Rpc::Forward, after, .. } if after == Duration::from_millis(150)),
            "{err}"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // info is not affected by a forward-only fault
        assert!(t.info(&e).await.is_ok());

        t.set_fault("ffn.0", Some(Fault::delay(Duration::from_millis(60))));
        let start = Instant::now();
        assert!(t.forward(&e, vec![x(2)]).await.is_ok());
        assert!(start.elapsed() >= Duration::from_millis(60));
        t.set_fault("ffn.0", Some(Fault::delay(Duration::from_secs(5))));
        let start = Instant::now();
        assert!(matches!(
            t.forward(&e, vec![x(2)]).await,
            Err(TransportError::Timeout { .. })
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn serves_a_runtime() {
        let runtime = Runtime::spawn(
            vec![("ffn.0".into(), backend(1)), ("ffn.1".into(), backend(2))],
            RuntimeConfig::default(),
        )
        .unwrap();
        let schemas = HashMap::from([("ffn.0".to_owned(), schema()), ("ffn.1".to_owned(), schema())]);
        let t: Arc<dyn ExpertTransport> = Arc::new(
            LocalTransport::new(config(10_000))
                .with_runtime(&runtime, &schemas)
                .unwrap(),
        );
        let reference = backend(2);
        let input = x(4);
        let y = t.forward(&addr("ffn.1"), vec![input.clone()]).await.unwrap();
        let y_ref = reference.forward(&[input]).unwrap();
        assert!(max_diff(&y[0], &y_ref[0]) < 1e-6);
        runtime.shutdown().await;
        assert!(matches!(
            t.forward(&addr("ffn.1"), vec![x(1)]).await,
            Err(TransportError::Local { .. })
        ));
    }
}
