//! `m3 serve`: an HTTP embedding server over one loaded model, shared by all requests
//! (tokio + axum). Routes and shapes are in [`api`], batching across requests in
//! [`batcher`], counters in [`metrics`]. Flags are TEI's where TEI has them.

mod api;
mod batcher;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use m3::backend::Backend;
use m3::index::ModelFingerprint;
use m3::model::embedder::Embedder;
use m3::DType;
use tokio::sync::{mpsc, Semaphore};

use super::device::{on_device, Job};
use super::DeviceArg;
use api::{App, Info};
use metrics::Metrics;

/// `m3 serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory in BAAI's bge-m3 layout.
    #[arg(long, alias = "model-id")]
    model: PathBuf,
    /// Where to run: CUDA when built with it and a GPU is present, else CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", alias = "hostname")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Token budget of one packed round of the model (TEI's flag): requests queued while
    /// the model works are packed together up to this many tokens.
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Requests in flight before new ones get 429.
    #[arg(long, default_value_t = 512)]
    max_concurrent_requests: usize,
    /// Texts per request.
    #[arg(long, default_value_t = 32)]
    max_client_batch_size: usize,
    /// Longest input in tokens, special tokens included (default: the model's limit).
    #[arg(long)]
    max_input_length: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2_000_000)]
    payload_limit: usize,
    /// A search index (from `m3 search index`, same model) for `POST /search`.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Or a collection on a Qdrant server or cluster (from `m3 search index --qdrant-url`).
    #[command(flatten)]
    server: super::search::QdrantServerArgs,
}

/// Counts every request by route and status, with its latency.
async fn count(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    m.request(&route, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing requests in flight");
}

fn router(app: Arc<App>, payload_limit: usize) -> Router {
    let m = app.metrics.clone();
    Router::new()
        .route("/health", get(api::health))
        .route("/info", get(api::info))
        .route("/metrics", get(api::metrics))
        .route("/", post(api::embed))
        .route("/embed", post(api::embed))
        .route("/embed_sparse", post(api::embed_sparse))
        .route("/tokenize", post(api::tokenize))
        .route("/rerank", post(api::rerank))
        .route("/v1/embeddings", post(api::openai_embeddings))
        .route("/embeddings", post(api::openai_embeddings))
        .route("/encode", post(api::encode))
        .route("/score", post(api::score))
        .route("/search", post(api::search))
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(m, count))
        .layer(DefaultBodyLimit::max(payload_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                let body = serde_json::json!({"error": "internal error (a handler panicked)", "error_type": "backend"});
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
            },
        ))
}

impl Job for ServeArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let model = Embedder::load(be, &self.model, dtype)?;
        let index = if self.index.is_some() || self.server.qdrant_url.is_some() {
            let index = self.server.open(self.index.as_deref(), "--index")?;
            index.check_model(&self.model, &ModelFingerprint::of_model(&model)?)?;
            Some(index)
        } else {
            None
        };
        let max_input = self
            .max_input_length
            .unwrap_or(usize::MAX)
            .min(model.max_tokens());
        if max_input < 3 {
            anyhow::bail!("--max-input-length {max_input} leaves no room for text: at least 3");
        }
        if self.max_client_batch_size == 0 || self.max_concurrent_requests == 0 {
            anyhow::bail!(
                "--max-client-batch-size and --max-concurrent-requests must be at least 1"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let (queue, work) = mpsc::unbounded_channel();
        let app = Arc::new(App {
            tokenizer: model.tokenizer.clone(),
            queue,
            permits: Arc::new(Semaphore::new(self.max_concurrent_requests)),
            metrics: metrics.clone(),
            info: Info {
                model_id: self.model.display().to_string(),
                model_dtype: dtype.to_string(),
                device: be.name(),
                max_input_length: max_input,
                max_batch_tokens: self.max_batch_tokens,
                max_concurrent_requests: self.max_concurrent_requests,
                max_client_batch_size: self.max_client_batch_size,
                dense_dim: model.config.hidden_size,
                colbert_dim: model.colbert_dim().unwrap_or(0),
                sparse: model.has_sparse(),
                vocab_size: model.config.vocab_size,
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            index,
        });
        let addr: SocketAddr = format!("{}:{}", self.host, self.port)
            .parse()
            .with_context(|| {
                format!("--host {} --port {}: not an address", self.host, self.port)
            })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("{addr}: cannot listen"))?;
        let local = listener.local_addr()?;
        let max_tokens = self.max_batch_tokens.max(1);
        std::thread::scope(|s| -> anyhow::Result<()> {
            let batcher = s.spawn(|| batcher::run(be, &model, work, max_tokens, &metrics));
            eprintln!("m3 serve: listening on http://{local} ({})", be.name());
            let served = rt.block_on(async {
                axum::serve(listener, router(app, self.payload_limit))
                    .with_graceful_shutdown(shutdown_signal())
                    .await
            });
            // Every connection is done; dropping the runtime drops whatever task still holds
            // the queue's sender, so the batcher finishes what was queued and stops.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            batcher
                .join()
                .map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
            served.context("serving")
        })?;
        eprintln!("m3 serve: stopped");
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs `m3 serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    on_device(args.device, args)
}
