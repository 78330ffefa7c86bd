//! The routes of `m3 serve`, in the request and response shapes of the servers people
//! already call: text-embeddings-inference's (`/embed`, `/embed_sparse`, `/tokenize`,
//! `/rerank`, `/health`, `/info`, `/metrics`), OpenAI's (`/v1/embeddings`), and m3's own
//! (`/encode` with FlagEmbedding's keys, `/score` with `compute_score`'s, `/search`).
//! Every refusal is a 4xx with a JSON body naming the field and, for lists, the index.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use m3::model::embedder::Embedding;
use m3::retrieval::{Found, Retriever};
use m3::score::{self, Weights};
use m3::text::{Encoded, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::batcher::{Outputs, Work};
use super::metrics::Metrics;

/// What the routes share.
pub struct App {
    /// The model's tokenizer (tokenization runs in the handlers, beside the model).
    pub tokenizer: TextTokenizer,
    /// The model's work queue.
    pub queue: mpsc::UnboundedSender<Work>,
    /// One permit per request in flight (`--max-concurrent-requests`).
    pub permits: Arc<Semaphore>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// What `/info` reports and the limits the routes enforce.
    pub info: Info,
    /// The index `/search` queries, if the server was started with one.
    pub index: Option<Box<dyn Retriever>>,
}

/// The model and the server's limits.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// The model directory as given.
    pub model_id: String,
    /// Weights' dtype on the device.
    pub model_dtype: String,
    /// Where the model runs.
    pub device: String,
    /// The longest input in tokens (special tokens included).
    pub max_input_length: usize,
    /// Token budget of one packed round.
    pub max_batch_tokens: usize,
    /// Requests in flight before 429.
    pub max_concurrent_requests: usize,
    /// Texts per request.
    pub max_client_batch_size: usize,
    /// Dense vector size.
    pub dense_dim: usize,
    /// Colbert vector size (0 without the head).
    pub colbert_dim: usize,
    /// Whether lexical weights can be served.
    pub sparse: bool,
    /// Rows of the vocabulary.
    pub vocab_size: usize,
    /// m3's version.
    pub version: String,
}

/// A refusal or failure, rendered as TEI's `{"error", "error_type"}` or, on the OpenAI
/// route, as OpenAI's `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    openai: bool,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            openai: false,
        }
    }

    /// A request that is malformed or asks for something m3 cannot do (422).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
        }
    }

    /// Too much input: too many texts, a text too long (413).
    pub fn too_large(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, "validation", message)
        }
    }

    fn overloaded(max: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "model is overloaded: {max} requests are in flight (--max-concurrent-requests)"
            ),
        )
    }

    fn backend(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", message)
    }

    fn for_openai(mut self) -> Self {
        self.openai = true;
        if self.status == StatusCode::UNPROCESSABLE_ENTITY {
            // OpenAI answers invalid requests with 400.
            self.status = StatusCode::BAD_REQUEST;
        }
        self
    }

    /// A body that did not parse.
    fn body(r: JsonRejection) -> Self {
        let status = r.status();
        let kind = "validation";
        let message = format!("request body: {}", r.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(status, kind, format!("{message} (over --payload-limit)"))
        } else {
            Self::new(StatusCode::UNPROCESSABLE_ENTITY, kind, message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.openai {
            let kind = match self.status {
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                s if s.is_server_error() => "server_error",
                _ => "invalid_request_error",
            };
            json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}})
        } else {
            json!({"error": self.message, "error_type": self.kind})
        };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A string or a list of strings, as TEI's `inputs`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Texts {
    /// One text.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Texts {
    fn into_vec(self) -> Vec<String> {
        match self {
            Texts::One(s) => vec![s],
            Texts::Many(v) => v,
        }
    }
}

/// How a route treats texts over the length limit.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_length: usize,
    truncate: bool,
}

impl App {
    /// Tokenizes `texts` (on the blocking pool) under `limits`, queues them for the model
    /// with `outputs` and waits for their embeddings. Holds a request permit throughout.
    async fn embed(
        self: &Arc<Self>,
        texts: Vec<String>,
        field: &str,
        limits: Limits,
        outputs: Outputs,
    ) -> Result<Vec<Embedding>, ApiError> {
        let encoded = self.tokenize(texts, field, limits).await?;
        self.run(encoded, outputs).await
    }

    /// Checks the batch size and tokenizes, refusing a too long text unless truncating.
    async fn tokenize(
        self: &Arc<Self>,
        texts: Vec<String>,
        field: &str,
        limits: Limits,
    ) -> Result<Vec<Encoded>, ApiError> {
        if texts.is_empty() {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` cannot be empty"),
            ));
        }
        let max = self.info.max_client_batch_size;
        if texts.len() > max {
            return Err(ApiError::too_large(
                field,
                format!(
                    "batch size {} > maximum allowed batch size {max} (--max-client-batch-size)",
                    texts.len()
                ),
            ));
        }
        let app = self.clone();
        let field = field.to_string();
        tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let e = app
                        .tokenizer
                        .encode(t, limits.max_length, false)
                        .map_err(|e| ApiError::invalid(&field, format!("{field}[{i}]: {e:#}")))?;
                    if e.truncated && !limits.truncate {
                        return Err(ApiError::too_large(
                            &field,
                            format!(
                                "{field}[{i}] is longer than {} tokens, the maximum input length \
                                 (pass \"truncate\": true to cut it)",
                                limits.max_length
                            ),
                        ));
                    }
                    Ok(e)
                })
                .collect()
        })
        .await
        .map_err(|e| ApiError::backend(format!("tokenizer task failed: {e}")))?
    }

    /// Queues tokenized texts and waits for the model.
    async fn run(
        self: &Arc<Self>,
        texts: Vec<Encoded>,
        outputs: Outputs,
    ) -> Result<Vec<Embedding>, ApiError> {
        let _permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded(self.info.max_concurrent_requests))?;
        let (reply, answer) = oneshot::channel();
        self.metrics.queued(1);
        self.queue
            .send(Work {
                texts,
                outputs,
                reply,
            })
            .map_err(|_| ApiError::backend("the model has stopped".into()))?;
        answer
            .await
            .map_err(|_| ApiError::backend("the model dropped the request".into()))?
            .map_err(ApiError::backend)
    }

    fn limits(&self, max_length: Option<usize>, truncate: bool) -> Result<Limits, ApiError> {
        let max = self.info.max_input_length;
        match max_length {
            Some(n) if n < 3 => Err(ApiError::invalid(
                "max_length",
                format!("max_length {n} leaves no room for text (CLS and EOS count): at least 3"),
            )),
            Some(n) => Ok(Limits {
                max_length: n.min(max),
                truncate,
            }),
            None => Ok(Limits {
                max_length: max,
                truncate,
            }),
        }
    }

    fn need_sparse(&self) -> Result<(), ApiError> {
        if self.info.sparse {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "return_sparse",
                "the model has no sparse head (sparse_linear.pt)",
            ))
        }
    }

    fn need_colbert(&self) -> Result<(), ApiError> {
        if self.info.colbert_dim > 0 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "return_colbert_vecs",
                "the model has no colbert head (colbert_linear.pt)",
            ))
        }
    }
}

fn dense_of(e: Embedding) -> Vec<f32> {
    e.dense.unwrap_or_default()
}

/// `POST /embed` (TEI).
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    inputs: Texts,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    truncate: bool,
    #[serde(default)]
    truncation_direction: Option<String>,
    #[serde(default)]
    prompt_name: Option<String>,
}

fn yes() -> bool {
    true
}

/// Refuses TEI options m3 does not implement, naming them.
fn tei_options(
    normalize: bool,
    direction: &Option<String>,
    prompt: &Option<String>,
) -> Result<(), ApiError> {
    if !normalize {
        return Err(ApiError::invalid(
            "normalize",
            "m3 serves BGE-M3's dense vectors L2-normalised; \"normalize\": false is not supported",
        ));
    }
    if let Some(d) = direction
        .as_deref()
        .filter(|d| !d.eq_ignore_ascii_case("right"))
    {
        return Err(ApiError::invalid(
            "truncation_direction",
            format!("truncation_direction {d:?} is not supported (only \"Right\")"),
        ));
    }
    if prompt.is_some() {
        return Err(ApiError::invalid(
            "prompt_name",
            "prompts are not supported (BGE-M3 uses none)",
        ));
    }
    Ok(())
}

/// `POST /embed`: dense vectors, `[[f32]]`.
pub async fn embed(
    State(app): State<Arc<App>>,
    body: Result<Json<EmbedRequest>, JsonRejection>,
) -> ApiResult<Vec<Vec<f32>>> {
    let Json(r) = body.map_err(ApiError::body)?;
    tei_options(r.normalize, &r.truncation_direction, &r.prompt_name)?;
    let limits = app.limits(None, r.truncate)?;
    let dense = Outputs {
        dense: true,
        ..Outputs::default()
    };
    let out = app
        .embed(r.inputs.into_vec(), "inputs", limits, dense)
        .await?;
    Ok(Json(out.into_iter().map(dense_of).collect()))
}

/// One lexical weight as TEI writes sparse embeddings.
#[derive(Debug, Serialize)]
pub struct SparseValue {
    index: u32,
    value: f32,
}

/// `POST /embed_sparse`: lexical weights, `[[{"index", "value"}]]` sorted by token id.
pub async fn embed_sparse(
    State(app): State<Arc<App>>,
    body: Result<Json<EmbedRequest>, JsonRejection>,
) -> ApiResult<Vec<Vec<SparseValue>>> {
    let Json(r) = body.map_err(ApiError::body)?;
    tei_options(true, &r.truncation_direction, &r.prompt_name)?;
    app.need_sparse()?;
    let limits = app.limits(None, r.truncate)?;
    let sparse = Outputs {
        sparse: true,
        ..Outputs::default()
    };
    let out = app
        .embed(r.inputs.into_vec(), "inputs", limits, sparse)
        .await?;
    Ok(Json(
        out.into_iter()
            .map(|e| {
                e.lexical
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(index, value)| SparseValue { index, value })
                    .collect()
            })
            .collect(),
    ))
}

/// `POST /tokenize` (TEI).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    inputs: Texts,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

/// One token as TEI's `/tokenize` returns it.
#[derive(Debug, Serialize)]
pub struct TokenLine {
    id: u32,
    text: String,
    special: bool,
    start: Option<usize>,
    stop: Option<usize>,
}

/// `POST /tokenize`: each text's tokens with their byte spans.
pub async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> ApiResult<Vec<Vec<TokenLine>>> {
    let Json(r) = body.map_err(ApiError::body)?;
    let texts = r.inputs.into_vec();
    if texts.len() > app.info.max_client_batch_size {
        return Err(ApiError::too_large(
            "inputs",
            format!(
                "batch size {} > maximum allowed batch size {}",
                texts.len(),
                app.info.max_client_batch_size
            ),
        ));
    }
    let max = app.info.max_input_length;
    let app2 = app.clone();
    let out = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let pieces = app2
                    .tokenizer
                    .pieces(t, max)
                    .map_err(|e| ApiError::invalid("inputs", format!("inputs[{i}]: {e:#}")))?;
                let sp = app2.tokenizer.specials;
                let special = |id: u32| TokenLine {
                    id,
                    text: app2.tokenizer.token(id).unwrap_or_default(),
                    special: true,
                    start: None,
                    stop: None,
                };
                let mut line = Vec::with_capacity(pieces.len() + 2);
                if r.add_special_tokens {
                    line.push(special(sp.cls));
                }
                line.extend(pieces.into_iter().map(|p| TokenLine {
                    id: p.id,
                    text: p.text,
                    special: false,
                    start: Some(p.start),
                    stop: Some(p.stop),
                }));
                if r.add_special_tokens {
                    line.push(special(sp.eos));
                }
                Ok(line)
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::backend(format!("tokenizer task failed: {e}")))??;
    Ok(Json(out))
}

/// `POST /v1/embeddings` (OpenAI): `input` as a string, strings, token ids, or lists of ids.
#[derive(Debug, Deserialize)]
pub struct OpenAiRequest {
    input: OpenAiInput,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    // OpenAI's `user` (an end-user id for abuse monitoring) is accepted and not used.
}

/// OpenAI's `input` forms.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OpenAiInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One text as token ids (the model's vocabulary, no special tokens).
    Ids(Vec<u32>),
    /// Several texts as token ids.
    IdLists(Vec<Vec<u32>>),
}

/// An embedding as OpenAI returns it: floats, or base64 of little-endian f32 bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Vector {
    /// f32 values.
    Floats(Vec<f32>),
    /// base64 of little-endian f32 bytes.
    Base64(String),
}

/// `POST /v1/embeddings`.
pub async fn openai_embeddings(
    State(app): State<Arc<App>>,
    body: Result<Json<OpenAiRequest>, JsonRejection>,
) -> ApiResult<OpenAiResponse> {
    openai(app, body).await.map_err(ApiError::for_openai)
}

async fn openai(
    app: Arc<App>,
    body: Result<Json<OpenAiRequest>, JsonRejection>,
) -> ApiResult<OpenAiResponse> {
    let Json(r) = body.map_err(ApiError::body)?;
    let dim = app.info.dense_dim;
    if let Some(d) = r.dimensions.filter(|&d| d != dim) {
        return Err(ApiError::invalid(
            "dimensions",
            format!("dimensions {d} is not supported: BGE-M3's dense vectors have {dim}"),
        ));
    }
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format {other:?}: expected \"float\" or \"base64\""),
            ))
        }
    };
    let limits = app.limits(None, true)?;
    let dense = Outputs {
        dense: true,
        ..Outputs::default()
    };
    let encoded = match r.input {
        OpenAiInput::Text(t) => app.tokenize(vec![t], "input", limits).await?,
        OpenAiInput::Texts(t) => app.tokenize(t, "input", limits).await?,
        OpenAiInput::Ids(ids) => vec![app.text_of_ids(&ids, 0, limits)?],
        OpenAiInput::IdLists(lists) => {
            if lists.is_empty() || lists.len() > app.info.max_client_batch_size {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input must hold 1 to {} texts",
                        app.info.max_client_batch_size
                    ),
                ));
            }
            lists
                .iter()
                .enumerate()
                .map(|(i, ids)| app.text_of_ids(ids, i, limits))
                .collect::<Result<_, _>>()?
        }
    };
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    let out = app.run(encoded, dense).await?;
    let data = out
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            let v = dense_of(e);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Floats(v)
            };
            OpenAiEmbedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    Ok(Json(OpenAiResponse {
        object: "list",
        data,
        model: r.model.unwrap_or_else(|| app.info.model_id.clone()),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

/// OpenAI's embeddings response.
#[derive(Debug, Serialize)]
pub struct OpenAiResponse {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: String,
    usage: Usage,
}

/// One embedding of OpenAI's response.
#[derive(Debug, Serialize)]
pub struct OpenAiEmbedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

/// Tokens counted, as OpenAI reports them (special tokens included).
#[derive(Debug, Serialize)]
pub struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

impl App {
    /// A text given as content token ids: checked against the vocabulary, CLS and EOS
    /// added, cut to the length limit.
    fn text_of_ids(&self, ids: &[u32], i: usize, limits: Limits) -> Result<Encoded, ApiError> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input[{i}]: token id {bad} is outside the vocabulary of {}",
                    self.info.vocab_size
                ),
            ));
        }
        Ok(self.tokenizer.assemble(ids, limits.max_length, false))
    }
}

/// `POST /encode` (m3): any of FlagEmbedding's three outputs from one forward pass.
#[derive(Debug, Deserialize)]
pub struct EncodeRequest {
    inputs: Texts,
    #[serde(default = "yes")]
    return_dense: bool,
    #[serde(default)]
    return_sparse: bool,
    #[serde(default)]
    return_colbert_vecs: bool,
    #[serde(default)]
    max_length: Option<usize>,
    #[serde(default = "yes")]
    truncate: bool,
}

/// `POST /encode`: `{"dense_vecs", "lexical_weights", "colbert_vecs"}` for what was asked.
pub async fn encode(
    State(app): State<Arc<App>>,
    body: Result<Json<EncodeRequest>, JsonRejection>,
) -> ApiResult<EncodeResponse> {
    let Json(r) = body.map_err(ApiError::body)?;
    let outputs = Outputs {
        dense: r.return_dense,
        sparse: r.return_sparse,
        colbert: r.return_colbert_vecs,
    };
    if !(outputs.dense || outputs.sparse || outputs.colbert) {
        return Err(ApiError::invalid(
            "return_dense",
            "ask for at least one of return_dense, return_sparse, return_colbert_vecs",
        ));
    }
    if outputs.sparse {
        app.need_sparse()?;
    }
    if outputs.colbert {
        app.need_colbert()?;
    }
    let limits = app.limits(r.max_length, r.truncate)?;
    let out = app
        .embed(r.inputs.into_vec(), "inputs", limits, outputs)
        .await?;
    let (mut d, mut l, mut c) = (None, None, None);
    if outputs.dense {
        d = Some(
            out.iter()
                .map(|e| e.dense.clone().unwrap_or_default())
                .collect(),
        );
    }
    if outputs.sparse {
        l = Some(
            out.iter()
                .map(|e| {
                    e.lexical
                        .iter()
                        .flatten()
                        .map(|(id, w)| (id.to_string(), *w))
                        .collect()
                })
                .collect(),
        );
    }
    if outputs.colbert {
        c = Some(
            out.iter()
                .map(|e| e.colbert.clone().unwrap_or_default())
                .collect(),
        );
    }
    Ok(Json(EncodeResponse {
        dense_vecs: d,
        lexical_weights: l,
        colbert_vecs: c,
    }))
}

/// FlagEmbedding's `encode` result: the outputs that were asked for.
#[derive(Debug, Serialize)]
pub struct EncodeResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    dense_vecs: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lexical_weights: Option<Vec<BTreeMap<String, f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    colbert_vecs: Option<Vec<Vec<Vec<f32>>>>,
}

/// Hybrid weights `[dense, sparse, colbert]`, checked like `--weights`.
fn weights(w: Option<[f32; 3]>) -> Result<Weights, ApiError> {
    match w {
        None => Ok(Weights::default()),
        Some([d, s, c])
            if [d, s, c].iter().all(|x| x.is_finite() && *x >= 0.0) && d + s + c > 0.0 =>
        {
            Ok(Weights {
                dense: d,
                sparse: s,
                colbert: c,
            })
        }
        Some(w) => Err(ApiError::invalid(
            "weights",
            format!("weights {w:?}: three non-negative numbers with a positive sum"),
        )),
    }
}

fn all_outputs(app: &App) -> Result<Outputs, ApiError> {
    app.need_sparse()?;
    app.need_colbert()?;
    Ok(Outputs {
        dense: true,
        sparse: true,
        colbert: true,
    })
}

fn pair_scores(q: &Embedding, p: &Embedding, w: Weights) -> score::PairScores {
    let (qd, pd) = (
        q.dense.as_deref().unwrap_or(&[]),
        p.dense.as_deref().unwrap_or(&[]),
    );
    let (ql, pl) = (
        q.lexical.as_deref().unwrap_or(&[]),
        p.lexical.as_deref().unwrap_or(&[]),
    );
    let (qc, pc) = (
        q.colbert.as_deref().unwrap_or(&[]),
        p.colbert.as_deref().unwrap_or(&[]),
    );
    score::combine(
        score::dense(qd, pd),
        score::lexical(ql, pl),
        score::colbert(qc, pc),
        w,
    )
}

/// `POST /score` (m3): FlagEmbedding's `compute_score` over `[query, passage]` pairs.
#[derive(Debug, Deserialize)]
pub struct ScoreRequest {
    pairs: Vec<(String, String)>,
    #[serde(default)]
    weights: Option<[f32; 3]>,
    #[serde(default)]
    max_query_length: Option<usize>,
    #[serde(default)]
    max_passage_length: Option<usize>,
}

/// `POST /score`: `{"dense": [..], "sparse": [..], "colbert": [..], "sparse+dense": [..],
/// "colbert+sparse+dense": [..]}`, one value per pair, as `compute_score` returns.
pub async fn score(
    State(app): State<Arc<App>>,
    body: Result<Json<ScoreRequest>, JsonRejection>,
) -> ApiResult<ScoreResponse> {
    let Json(r) = body.map_err(ApiError::body)?;
    let w = weights(r.weights)?;
    let outputs = all_outputs(&app)?;
    let ql = app.limits(Some(r.max_query_length.unwrap_or(512)), true)?;
    let pl = app.limits(r.max_passage_length, true)?;
    let (qs, ps): (Vec<String>, Vec<String>) = r.pairs.into_iter().unzip();
    let q = app.tokenize(qs, "pairs", ql).await?;
    let p = app.tokenize(ps, "pairs", pl).await?;
    let n = q.len();
    let all = app.run(q.into_iter().chain(p).collect(), outputs).await?;
    let (qe, pe) = all.split_at(n);
    let s: Vec<score::PairScores> = qe
        .iter()
        .zip(pe)
        .map(|(q, p)| pair_scores(q, p, w))
        .collect();
    Ok(Json(ScoreResponse {
        dense: s.iter().map(|x| x.dense).collect(),
        sparse: s.iter().map(|x| x.sparse).collect(),
        colbert: s.iter().map(|x| x.colbert).collect(),
        sparse_dense: s.iter().map(|x| x.sparse_dense).collect(),
        all: s.iter().map(|x| x.all).collect(),
    }))
}

/// `compute_score`'s result: one list per mode and hybrid.
#[derive(Debug, Serialize)]
pub struct ScoreResponse {
    dense: Vec<f32>,
    sparse: Vec<f32>,
    colbert: Vec<f32>,
    #[serde(rename = "sparse+dense")]
    sparse_dense: Vec<f32>,
    #[serde(rename = "colbert+sparse+dense")]
    all: Vec<f32>,
}

/// `POST /rerank` (TEI's shape): a query and texts.
#[derive(Debug, Deserialize)]
pub struct RerankRequest {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    return_text: bool,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default = "yes")]
    truncate: bool,
    #[serde(default)]
    weights: Option<[f32; 3]>,
}

/// One reranked text.
#[derive(Debug, Serialize)]
pub struct Rank {
    index: usize,
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

/// `POST /rerank`: texts by the weighted hybrid score against the query, best first.
pub async fn rerank(
    State(app): State<Arc<App>>,
    body: Result<Json<RerankRequest>, JsonRejection>,
) -> ApiResult<Vec<Rank>> {
    let Json(r) = body.map_err(ApiError::body)?;
    let _ = r.raw_scores; // the hybrid is already a similarity, not a logit
    let w = weights(r.weights)?;
    let outputs = all_outputs(&app)?;
    let limits = app.limits(None, r.truncate)?;
    let q = app.tokenize(vec![r.query], "query", limits).await?;
    let p = app.tokenize(r.texts.clone(), "texts", limits).await?;
    let all = app.run(q.into_iter().chain(p).collect(), outputs).await?;
    let (qe, pe) = all.split_at(1);
    let mut ranks: Vec<Rank> = pe
        .iter()
        .enumerate()
        .map(|(index, p)| Rank {
            index,
            score: pair_scores(&qe[0], p, w).all,
            text: r.return_text.then(|| r.texts[index].clone()),
        })
        .collect();
    ranks.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    Ok(Json(ranks))
}

/// `POST /search` (m3, with `--index`): hybrid retrieval per query.
#[derive(Debug, Deserialize)]
pub struct SearchRequest {
    inputs: Texts,
    #[serde(default = "ten")]
    top_k: usize,
    #[serde(default)]
    weights: Option<[f32; 3]>,
    #[serde(default)]
    max_length: Option<usize>,
}

fn ten() -> usize {
    10
}

/// `POST /search`: per input, the ranked passages `[{"id", "score", "dense", "sparse",
/// "colbert"}]` as `m3 search query` writes them.
pub async fn search(
    State(app): State<Arc<App>>,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> ApiResult<Vec<Vec<Found>>> {
    let Json(r) = body.map_err(ApiError::body)?;
    if app.index.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "validation",
            "no index: start m3 serve with --index DIR (made by m3 search index) \
             or --qdrant-url URL --collection NAME",
        ));
    };
    let w = weights(r.weights)?;
    let outputs = all_outputs(&app)?;
    let limits = app.limits(Some(r.max_length.unwrap_or(512)), true)?;
    let out = app
        .embed(r.inputs.into_vec(), "inputs", limits, outputs)
        .await?;
    // Off the async workers: an index search is blocking work (scoring, or a round trip
    // to a Qdrant server on that engine's own runtime).
    let top_k = r.top_k;
    let results = tokio::task::spawn_blocking(move || {
        let index = app.index.as_ref().expect("checked above");
        out.iter()
            .map(|q| index.search(q, top_k, w))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::backend(format!("the search task failed: {e}")))?
    .map_err(|e| ApiError::backend(format!("{e:#}")))?;
    Ok(Json(results))
}

/// `GET /info`.
pub async fn info(State(app): State<Arc<App>>) -> Json<Info> {
    Json(app.info.clone())
}

/// `GET /health`: 200 once the model is loaded (the server listens only then).
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
}
