//! The parameter tree, declared once: one struct per Hugging Face submodule (as candle's
//! model files do), generic over what a leaf holds (a tensor on a backend, a tape value, a
//! checkpoint shape), with each field's HF name written in the declaration. Loading,
//! recording on a tape, the optimiser's arenas, checkpoint writing and random models all
//! walk this one declaration, so the parameter list and its order exist in one place.

use std::convert::Infallible;

use super::config::Config;

/// A tree of named parameters with leaves of type `P`.
pub trait Tree<P> {
    /// The same tree with leaves of type `Q`.
    type With<Q>;

    /// Calls `f` on every leaf with its full HF name, in declaration order.
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a P));

    /// [`Tree::visit`] with mutable leaves.
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(String, &'a mut P));

    /// The tree of `f(name, leaf)`, leaves taken in declaration order; the first error
    /// stops the walk.
    fn try_map<'a, Q, E>(
        &'a self,
        prefix: &str,
        f: &mut dyn FnMut(String, &'a P) -> Result<Q, E>,
    ) -> Result<Self::With<Q>, E>;

    /// The tree of `f(name, leaf)`.
    fn map<'a, Q>(&'a self, mut f: impl FnMut(String, &'a P) -> Q) -> Self::With<Q>
    where
        P: 'a,
    {
        match self.try_map::<Q, Infallible>("", &mut |n, p| Ok(f(n, p))) {
            Ok(t) => t,
            Err(e) => match e {},
        }
    }

    /// Every leaf with its HF name, in declaration order.
    fn named(&self) -> Vec<(String, &P)> {
        let mut v = Vec::new();
        self.visit("", &mut |n, p| v.push((n, p)));
        v
    }

    /// Every leaf, mutable, with its HF name, in declaration order.
    fn named_mut(&mut self) -> Vec<(String, &mut P)> {
        let mut v = Vec::new();
        self.visit_mut("", &mut |n, p| v.push((n, p)));
        v
    }
}

/// `prefix.name`, either part possibly empty.
fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}

/// A list of submodules is named by index, as `torch.nn.ModuleList` is.
impl<P, T: Tree<P>> Tree<P> for Vec<T> {
    type With<Q> = Vec<T::With<Q>>;

    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a P)) {
        for (i, x) in self.iter().enumerate() {
            x.visit(&join(prefix, &i.to_string()), f);
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(String, &'a mut P)) {
        for (i, x) in self.iter_mut().enumerate() {
            x.visit_mut(&join(prefix, &i.to_string()), f);
        }
    }

    fn try_map<'a, Q, E>(
        &'a self,
        prefix: &str,
        f: &mut dyn FnMut(String, &'a P) -> Result<Q, E>,
    ) -> Result<Self::With<Q>, E> {
        self.iter()
            .enumerate()
            .map(|(i, x)| x.try_map(&join(prefix, &i.to_string()), f))
            .collect()
    }
}

/// Declares a parameter struct generic over its leaf type `P`: each field is a `leaf`
/// (a `P`) or a `node` (a subtree), with its HF name; the [`Tree`] walks follow the
/// declaration order.
macro_rules! tree {
    (
        $(#[$meta:meta])*
        pub struct $name:ident<P> {
            $( $(#[$fmeta:meta])* $kind:ident $field:ident : $ty:ty = $hf:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name<P> {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl<P> Tree<P> for $name<P> {
            type With<Q> = $name<Q>;

            fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a P)) {
                $( tree!(@visit $kind, &self.$field, join(prefix, $hf), f); )*
            }

            fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(String, &'a mut P)) {
                $( tree!(@visit_mut $kind, &mut self.$field, join(prefix, $hf), f); )*
            }

            fn try_map<'a, Q, E>(
                &'a self,
                prefix: &str,
                f: &mut dyn FnMut(String, &'a P) -> Result<Q, E>,
            ) -> Result<$name<Q>, E> {
                Ok($name {
                    $( $field: tree!(@map $kind, &self.$field, join(prefix, $hf), f), )*
                })
            }
        }
    };
    (@visit leaf, $x:expr, $n:expr, $f:ident) => { $f($n, $x) };
    (@visit node, $x:expr, $n:expr, $f:ident) => { Tree::<P>::visit($x, &$n, $f) };
    (@visit_mut leaf, $x:expr, $n:expr, $f:ident) => { $f($n, $x) };
    (@visit_mut node, $x:expr, $n:expr, $f:ident) => { Tree::<P>::visit_mut($x, &$n, $f) };
    (@map leaf, $x:expr, $n:expr, $f:ident) => { $f($n, $x)? };
    (@map node, $x:expr, $n:expr, $f:ident) => { Tree::<P>::try_map($x, &$n, $f)? };
}

tree! {
    /// A linear layer `y = x Wᵀ + b` (`torch.nn.Linear`). m3 holds the weight transposed,
    /// `Wᵀ` `[in, out]`, so the product is a plain `x · Wᵀ`: the CPU GEMM runs the wide FFN
    /// projection about a fifth faster with a row-major right operand than with PyTorch's
    /// `[out, in]` (measured with the `gemm` crate at 2048×4096×1024 on 2 threads: 156 vs
    /// 121 GFLOP/s).
    #[derive(Copy)]
    pub struct Linear<P> {
        /// Transposed weight `[in, out]`.
        leaf wt: P = "weight",
        /// Bias `[out]`.
        leaf b: P = "bias",
    }
}

tree! {
    /// LayerNorm gain and shift.
    #[derive(Copy)]
    pub struct Norm<P> {
        /// Gain `[hidden]`.
        leaf g: P = "weight",
        /// Shift `[hidden]`.
        leaf b: P = "bias",
    }
}

tree! {
    /// One transformer layer (post-LayerNorm, as BERT and XLM-R).
    #[derive(Copy)]
    pub struct Layer<P> {
        /// Query projection.
        node q: Linear<P> = "attention.self.query",
        /// Key projection.
        node k: Linear<P> = "attention.self.key",
        /// Value projection.
        node v: Linear<P> = "attention.self.value",
        /// Attention output projection.
        node attn_out: Linear<P> = "attention.output.dense",
        /// LayerNorm after the attention residual.
        node attn_norm: Norm<P> = "attention.output.LayerNorm",
        /// FFN up projection.
        node ffn_in: Linear<P> = "intermediate.dense",
        /// FFN down projection.
        node ffn_out: Linear<P> = "output.dense",
        /// LayerNorm after the FFN residual.
        node ffn_norm: Norm<P> = "output.LayerNorm",
    }
}

tree! {
    /// The encoder (XLM-R's `embeddings` and `encoder` submodules).
    pub struct Encoder<P> {
        /// Word embeddings `[vocab, hidden]`.
        leaf word: P = "embeddings.word_embeddings.weight",
        /// Position embeddings `[max_positions, hidden]`.
        leaf position: P = "embeddings.position_embeddings.weight",
        /// Token-type row 0 `[1, hidden]` (every token is type 0).
        leaf token_type0: P = "embeddings.token_type_embeddings.weight",
        /// Embedding LayerNorm.
        node emb_norm: Norm<P> = "embeddings.LayerNorm",
        /// Transformer layers.
        node layers: Vec<Layer<P>> = "encoder.layer",
    }
}

tree! {
    /// The two head files of a BGE-M3 directory.
    #[derive(Copy)]
    pub struct Heads<P> {
        /// `sparse_linear` (`[hidden, 1]` transposed).
        node sparse: Linear<P> = "sparse_linear",
        /// `colbert_linear` (`[hidden, d]` transposed).
        node colbert: Linear<P> = "colbert_linear",
    }
}

tree! {
    /// Everything fine-tuning updates: the encoder, then the heads.
    pub struct Trainable<P> {
        /// The encoder.
        node encoder: Encoder<P> = "",
        /// The heads.
        node heads: Heads<P> = "",
    }
}

impl<P: Copy> Trainable<P> {
    /// Every leaf, in declaration order.
    pub fn all(&self) -> Vec<P> {
        self.named().into_iter().map(|(_, p)| *p).collect()
    }
}

/// How m3 holds a checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// As stored.
    AsIs,
    /// Transposed (a linear weight, `[out, in]` stored, `[in, out]` held).
    Transposed,
    /// Only the first row (the token-type table: every token is type 0).
    FirstRow,
}

/// One leaf's checkpoint shape (PyTorch's layout) and how m3 holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Shape in the checkpoint.
    pub stored: Vec<usize>,
    /// How the held tensor is made from the stored one.
    pub held: Held,
}

impl Spec {
    fn new(stored: &[usize], held: Held) -> Self {
        Spec {
            stored: stored.to_vec(),
            held,
        }
    }

    /// The shape m3 holds.
    pub fn shape(&self) -> Vec<usize> {
        match (self.held, self.stored.as_slice()) {
            (Held::Transposed, [r, c]) => vec![*c, *r],
            (Held::FirstRow, [_, c]) => vec![1, *c],
            _ => self.stored.clone(),
        }
    }
}

impl Linear<Spec> {
    /// A linear layer from `inp` to `out` features.
    pub fn spec(inp: usize, out: usize) -> Self {
        Linear {
            wt: Spec::new(&[out, inp], Held::Transposed),
            b: Spec::new(&[out], Held::AsIs),
        }
    }
}

impl Norm<Spec> {
    /// A LayerNorm over `n` features.
    pub fn spec(n: usize) -> Self {
        Norm {
            g: Spec::new(&[n], Held::AsIs),
            b: Spec::new(&[n], Held::AsIs),
        }
    }
}

impl Encoder<Spec> {
    /// The encoder `c` describes.
    pub fn spec(c: &Config) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let layer = Layer {
            q: Linear::spec(h, h),
            k: Linear::spec(h, h),
            v: Linear::spec(h, h),
            attn_out: Linear::spec(h, h),
            attn_norm: Norm::spec(h),
            ffn_in: Linear::spec(h, i),
            ffn_out: Linear::spec(i, h),
            ffn_norm: Norm::spec(h),
        };
        Encoder {
            word: Spec::new(&[c.vocab_size, h], Held::AsIs),
            position: Spec::new(&[c.max_position_embeddings, h], Held::AsIs),
            token_type0: Spec::new(&[c.type_vocab_size, h], Held::FirstRow),
            emb_norm: Norm::spec(h),
            layers: vec![layer; c.num_hidden_layers],
        }
    }
}

impl Trainable<Spec> {
    /// Everything fine-tuning updates, for the encoder `c` describes and a colbert head of
    /// `colbert_dim` outputs (the sparse head has one).
    pub fn spec(c: &Config, colbert_dim: usize) -> Self {
        let h = c.hidden_size;
        Trainable {
            encoder: Encoder::spec(c),
            heads: Heads {
                sparse: Linear::spec(h, 1),
                colbert: Linear::spec(h, colbert_dim),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize) -> Config {
        serde_json::from_value(serde_json::json!({
            "model_type": "xlm-roberta", "vocab_size": 10, "hidden_size": 4,
            "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 6,
            "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-5,
            "pad_token_id": 1, "hidden_act": "gelu"
        }))
        .unwrap()
    }

    #[test]
    fn names_are_the_hf_checkpoint_names_in_module_order() {
        let t = Trainable {
            encoder: Encoder::spec(&config(2)),
            heads: Heads {
                sparse: Linear::spec(4, 1),
                colbert: Linear::spec(4, 4),
            },
        };
        let named = t.named();
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 5 + 2 * 16 + 4);
        assert_eq!(
            names[..7],
            [
                "embeddings.word_embeddings.weight",
                "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight",
                "embeddings.LayerNorm.weight",
                "embeddings.LayerNorm.bias",
                "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.0.attention.self.query.bias",
            ]
        );
        assert_eq!(names[5 + 16], "encoder.layer.1.attention.self.query.weight");
        assert_eq!(names[5 + 15], "encoder.layer.0.output.LayerNorm.bias");
        assert_eq!(names[5 + 10], "encoder.layer.0.intermediate.dense.weight");
        assert_eq!(
            names[names.len() - 4..],
            [
                "sparse_linear.weight",
                "sparse_linear.bias",
                "colbert_linear.weight",
                "colbert_linear.bias"
            ]
        );
        let mut uniq = names.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), names.len(), "a name is repeated");
        // FFN up projection: [intermediate, hidden] stored, [hidden, intermediate] held.
        let up = named[5 + 10].1;
        assert_eq!((up.stored.clone(), up.shape()), (vec![6, 4], vec![4, 6]));
        assert_eq!(named[2].1.shape(), vec![1, 4]);
    }

    #[test]
    fn every_walk_takes_the_leaves_in_the_same_order() {
        let spec = Encoder::spec(&config(3));
        let mut k = 0;
        let mut numbered = spec.map(|_, _| {
            k += 1;
            k
        });
        let by_ref: Vec<(String, usize)> =
            numbered.named().into_iter().map(|(n, v)| (n, *v)).collect();
        let want: Vec<(String, usize)> = spec
            .named()
            .into_iter()
            .enumerate()
            .map(|(i, (n, _))| (n, i + 1))
            .collect();
        assert_eq!(by_ref, want);
        for (_, v) in numbered.named_mut() {
            *v *= 10;
        }
        assert_eq!(numbered.layers[2].ffn_norm.b, 10 * want.len());
        let failed: Result<Encoder<()>, String> = spec.try_map("", &mut |n, _| {
            if n.ends_with("value.bias") {
                Err(n)
            } else {
                Ok(())
            }
        });
        assert_eq!(
            failed.unwrap_err(),
            "encoder.layer.0.attention.self.value.bias"
        );
    }
}
