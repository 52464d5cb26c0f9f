//! Logging: structured, JSON by default when stderr is not a terminal, filtered by `log.level`
//! or `RUST_LOG`. With `telemetry.otlp_endpoint` set, spans are also exported over OTLP/HTTP
//! (protobuf) by a batch processor on its own thread ([`init_with_export`]); without it there
//! is no OpenTelemetry layer at all, so nothing is exported and nothing is spent on it.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// The span exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP span exporter for {endpoint}: {source}")]
    Exporter {
        /// Where spans were to go.
        endpoint: String,
        /// Why the exporter could not be built.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The span exporter, if any, to flush at shutdown.
#[must_use = "spans still buffered are lost unless it is shut down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    timeout: Duration,
}

impl Telemetry {
    /// Exports the spans still buffered, waiting at most `telemetry.export_timeout`. Blocks:
    /// call it off the async runtime's workers (`spawn_blocking`).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(self.timeout)
        {
            tracing::warn!(error = %e, "could not export the last spans");
        }
    }
}

/// Installs the global subscriber, without exporting spans. Later calls (tests) are ignored.
pub fn init(log: &LogSettings) {
    install(log, None);
}

/// Installs the global subscriber and, when `telemetry.otlp_endpoint` is set, the OTLP span
/// exporter. Later calls (tests) install nothing, and their exporter exports nothing.
pub fn init_with_export(
    log: &LogSettings,
    telemetry: &TelemetrySettings,
) -> Result<Telemetry, TelemetryError> {
    let provider = if telemetry.otlp_endpoint.is_empty() {
        None
    } else {
        Some(provider(telemetry)?)
    };
    install(log, provider.as_ref());
    if provider.is_some() {
        crate::ops::trace_context::set_exporting();
    }
    Ok(Telemetry {
        provider,
        timeout: telemetry.export_timeout,
    })
}

fn provider(telemetry: &TelemetrySettings) -> Result<SdkTracerProvider, TelemetryError> {
    let endpoint = format!(
        "{}/v1/traces",
        telemetry.otlp_endpoint.trim_end_matches('/')
    );
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.as_str())
        .with_timeout(telemetry.export_timeout)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            source,
        })?;
    // The default sampler follows the caller's `sampled` flag and records every new trace.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(telemetry.service_name.clone())
                .build(),
        )
        .build())
}

/// Directives appended to `log.level`.
const QUIET_CLIENT: &str = "lapin::channel=off";

fn install(log: &LogSettings, provider: Option<&SdkTracerProvider>) {
    // The AMQP client logs every channel the broker closes as an error, including the
    // expected NOT_FOUND of looking for an account queue that does not exist; the worker
    // reports the failures that matter itself, from the operation that failed.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},{QUIET_CLIENT}", log.level)))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET_CLIENT}")));
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let Some(provider) = provider else {
        // Without export, the plain formatting subscriber: nothing in a command's path costs
        // more than before there was export.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = if json {
            builder
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .try_init()
        } else {
            builder.try_init()
        };
        return;
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
        .with_location(false);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init();
}
