//! Products through cuBLASLt (`blas.rs`), with the GELU epilogue when asked.

use super::*;

impl Cuda {
    /// `op(a) · op(b) (+ bias)` through cuBLASLt, with its GELU epilogue when `gelu`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_epilogue(
        &self,
        a: &T,
        trans_a: bool,
        b: &T,
        trans_b: bool,
        bias: Option<&T>,
        out: DType,
        gelu: bool,
    ) -> Result<T> {
        let (m, k, n) = matmul_dims(a, trans_a, b, trans_b, bias, out)?;
        if k == 0 {
            if bias.is_some() {
                return shape_err("matmul", "k = 0 with a bias is not supported on CUDA");
            }
            return self.zeros(&[m, n], out);
        }
        let c = self.alloc(&[m, n], out)?;
        if m == 0 || n == 0 {
            return Ok(c);
        }
        let args = blas::MatmulArgs {
            m,
            n,
            k,
            a: self.device_ptr(a),
            trans_a,
            b: self.device_ptr(b),
            trans_b,
            c: self.device_ptr(&c),
            in_type: a.dtype(),
            out_type: out,
            bias: bias.map(|t| self.device_ptr(t)),
            gelu,
        };
        // SAFETY: pointers come from live tensors whose shapes matmul_dims validated.
        unsafe { self.blas.lock().unwrap().matmul(&args)? };
        Ok(c)
    }
}

pub(super) fn linear_gelu(be: &Cuda, x: &T, w: &T, bias: &T) -> Result<T> {
    if x.dtype() == DType::BF16 && be.gelu_epilogue.load(Ordering::Relaxed) {
        be.matmul_epilogue(x, false, w, false, Some(bias), DType::BF16, true)
    } else {
        be.gelu(&be.matmul(x, false, w, false, Some(bias), x.dtype())?)
    }
}
