//! Prometheus metrics: one `Metrics` per process, made by the binary and handed to whatever
//! records (the RPC boundary, the reconcilers) and to the HTTP endpoint that encodes it. No
//! global: tests and embedders get their own registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilesystemLabels {
    pub fs: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: String,
    pub result: String,
}

pub struct Metrics {
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_duration: Family<MethodLabels, Histogram>,
    pub pool_bytes: Family<StateLabels, Gauge>,
    pub volumes: Family<StateLabels, Gauge>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub filesystems: Family<FilesystemLabels, Gauge>,
    registry: Registry,
}

fn duration_histogram() -> Histogram {
    // 1 ms … ~33 s: fast metadata calls up to mkfs of a large volume.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("plinth");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration =
            Family::<MethodLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let pool_bytes = Family::<StateLabels, Gauge>::default();
        let volumes = Family::<StateLabels, Gauge>::default();
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let filesystems = Family::<FilesystemLabels, Gauge>::default();
        registry.register("rpc_requests", "CSI RPCs served, by method and gRPC code", rpc_requests.clone());
        registry.register("rpc_duration_seconds", "CSI RPC latency", rpc_duration.clone());
        registry.register(
            "pool_bytes",
            "Pool capacity: available, provisioned, allocated, filesystem_total",
            pool_bytes.clone(),
        );
        registry.register("volumes", "Volumes on this node by state (created, staged, published)", volumes.clone());
        registry.register("reconciles", "Reconcile runs by controller and result", reconciles.clone());
        registry.register(
            "filesystem_supported",
            "1 when this node can do the operation (format, grow) for the filesystem: its tools are installed",
            filesystems.clone(),
        );
        Metrics { rpc_requests, rpc_duration, pool_bytes, volumes, reconciles, filesystems, registry }
    }

    pub fn record_rpc(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.rpc_requests.get_or_create(&RpcLabels { method: method.to_owned(), code: format!("{code:?}") }).inc();
        self.rpc_duration.get_or_create(&MethodLabels { method: method.to_owned() }).observe(seconds);
    }

    pub fn record_reconcile(&self, controller: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ReconcileLabels { controller: controller.to_owned(), result: result.to_owned() })
            .inc();
    }

    pub fn set_pool(&self, state: &str, bytes: u64) {
        self.pool_bytes.get_or_create(&StateLabels { state: state.to_owned() }).set(bytes.min(i64::MAX as u64) as i64);
    }

    pub fn set_volumes(&self, state: &str, count: usize) {
        self.volumes.get_or_create(&StateLabels { state: state.to_owned() }).set(count as i64);
    }

    pub fn set_filesystem_support(&self, fs: &str, operation: &str, supported: bool) {
        let labels = FilesystemLabels { fs: fs.to_owned(), operation: operation.to_owned() };
        self.filesystems.get_or_create(&labels).set(i64::from(supported));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_registry_counts_only_its_own() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.record_rpc("CreateVolume", tonic::Code::Aborted, 0.5);
        a.record_reconcile("claims", false);
        let text = a.encode();
        assert!(text.contains(r#"plinth_rpc_requests_total{method="CreateVolume",code="Aborted"} 1"#), "{text}");
        assert!(text.contains(r#"plinth_reconciles_total{controller="claims",result="error"} 1"#), "{text}");
        assert!(!b.encode().contains("CreateVolume"), "a second registry is independent");
    }
}
