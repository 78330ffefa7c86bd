//! Shapes, element types and the backend-owned buffer that together make a tensor.

use crate::error::{shape_err, Result};

/// What a tensor needs of the device it lives on: the type of its buffers. Backends
/// implement it (and `crate::backend::Backend` on top), so this module depends on none.
pub trait Device {
    /// The device buffer behind a [`Tensor`].
    type Storage: Send + Sync;
}

/// Element type of a tensor. Floats are f32 (reference, master weights, statistics) or bf16
/// (GPU activations and compute weights); u32 holds token ids and target columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16: f32's exponent with a 7-bit mantissa.
    BF16,
    /// Unsigned 32-bit integers (ids, indices).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
        }
    }

    /// Whether the type holds real numbers (and so can carry a gradient).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        })
    }
}

/// Host data handed to `Backend::upload`.
#[derive(Debug, Clone, Copy)]
pub enum HostData<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    BF16(&'a [half::bf16]),
    /// u32 values.
    U32(&'a [u32]),
}

impl HostData<'_> {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::U32(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::U32(_) => DType::U32,
        }
    }
}

/// A dense row-major tensor living on backend `B`.
pub struct Tensor<B: Device> {
    shape: Vec<usize>,
    dtype: DType,
    storage: B::Storage,
}

impl<B: Device> Tensor<B> {
    /// Wraps a backend buffer; only backends call this, after sizing the buffer.
    pub fn from_parts(shape: Vec<usize>, dtype: DType, storage: B::Storage) -> Self {
        Tensor {
            shape,
            dtype,
            storage,
        }
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The backend buffer.
    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }

    /// The backend buffer, consuming the tensor (a backend hands it over without a copy).
    pub fn into_storage(self) -> B::Storage {
        self.storage
    }

    /// The backend buffer, mutably.
    pub fn storage_mut(&mut self) -> &mut B::Storage {
        &mut self.storage
    }

    /// Views the tensor as a matrix: all leading dimensions folded into rows, the last one
    /// the columns. A 1-D tensor is one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.split_last() {
            None => (1, 1),
            Some((&c, lead)) => (lead.iter().product(), c),
        }
    }

    /// Same data under another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return shape_err(
                "reshape",
                format!("cannot view {:?} as {:?}", self.shape, shape),
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self
        })
    }
}

impl<B: Device> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype, self.shape)
    }
}
