//! The crate's error type: every failure names what was wrong (tensor, shape, file).

/// Errors raised by m3's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor had the wrong shape for an operation.
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The operation that rejected its input.
        op: &'static str,
        /// What was expected and what was found.
        detail: String,
    },
    /// A tensor had a dtype the operation does not accept.
    #[error("dtype mismatch in {op}: {detail}")]
    DType {
        /// The operation that rejected its input.
        op: &'static str,
        /// What was expected and what was found.
        detail: String,
    },
    /// An index (token id, target column) was out of range.
    #[error("index out of range in {op}: {detail}")]
    Index {
        /// The operation that rejected its input.
        op: &'static str,
        /// Which index and the valid range.
        detail: String,
    },
    /// The CUDA driver, cuBLASLt or a kernel launch failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Misuse of the autograd tape (unknown value, backward from a non-float value, ...).
    #[error("autograd: {0}")]
    Autograd(String),
    /// A collective across training ranks failed: a rank stopped, failed or timed out.
    #[error("collective: {0}")]
    Collective(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a shape error.
pub(crate) fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(Error::Shape {
        op,
        detail: detail.into(),
    })
}

/// Shorthand for a dtype error.
pub(crate) fn dtype_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(Error::DType {
        op,
        detail: detail.into(),
    })
}
