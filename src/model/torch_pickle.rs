//! The subset of Python's pickle that `torch.save` writes for state dicts, interpreted
//! without executing anything.
//!
//! A checkpoint is untrusted input. This reader knows the opcodes torch uses, accepts only
//! the globals that build ordered dicts and tensors (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the typed
//! storage classes), bounds-checks every read, and answers anything else with an error.

use std::collections::HashMap;

/// A storage referenced by persistent id: `data/<key>` in the archive.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    /// Entry name under the archive's `data/` folder.
    pub key: String,
    /// Element type name from the storage class (`Float`, `Half`, `BFloat16`, ...).
    pub dtype: String,
    /// Elements in the storage.
    pub numel: usize,
}

/// A tensor view of a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The storage.
    pub storage: StorageRef,
    /// Offset in elements.
    pub offset: usize,
    /// Shape.
    pub size: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// Values on the pickle machine's stack.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    // Containers carry their nesting depth, so building one never walks its contents.
    Tuple(Vec<Value>, u16),
    List(Vec<Value>, u16),
    Dict(Vec<(Value, Value)>, u16),
    // Boxed so that a value is 32 bytes: the stack's size per pickle byte.
    Global(Box<(String, String)>),
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
    Mark,
}

/// Why a pickle was rejected.
pub type PickleError = String;

/// Deepest nesting accepted: torch's state dicts nest about five deep; the bound keeps the
/// recursion in cloning, comparing and dropping values off the end of the stack.
const MAX_DEPTH: u16 = 100;

/// Bytes of values the machine may build, per byte of pickle, plus a floor: every opcode
/// creates at most a few values, so only memo copies (`GET` of a big object, again and
/// again: "billion laughs") can exceed this.
const BYTES_PER_INPUT_BYTE: usize = 2 * std::mem::size_of::<Value>();
const BUDGET_FLOOR: usize = 1 << 20;
const _: () = assert!(std::mem::size_of::<Value>() <= 32);

impl Value {
    /// Nesting depth: 0 for scalars.
    fn depth(&self) -> u16 {
        match self {
            Value::Tuple(_, d) | Value::List(_, d) | Value::Dict(_, d) => *d,
            _ => 0,
        }
    }

    /// Bytes this value occupies, contents included (what a clone costs).
    fn weight(&self) -> usize {
        let own = std::mem::size_of::<Value>();
        own + match self {
            Value::Str(s) => s.len(),
            Value::Global(g) => 48 + g.0.len() + g.1.len(),
            Value::Bytes(b) => b.len(),
            Value::Tuple(v, _) | Value::List(v, _) => v.iter().map(Value::weight).sum(),
            Value::Dict(v, _) => v.iter().map(|(k, x)| k.weight() + x.weight()).sum(),
            Value::Storage(r) => std::mem::size_of::<StorageRef>() + r.key.len() + r.dtype.len(),
            Value::Tensor(t) => {
                std::mem::size_of::<TensorRef>()
                    + 8 * (t.size.len() + t.stride.len())
                    + t.storage.key.len()
                    + t.storage.dtype.len()
            }
            _ => 0,
        }
    }

    /// A short description for messages (never the whole value: it may be huge).
    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) if s.len() <= 64 => format!("string {s:?}"),
            Value::Str(s) => format!("string of {} bytes", s.len()),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Tuple(v, _) => format!("tuple of {}", v.len()),
            Value::List(v, _) => format!("list of {}", v.len()),
            Value::Dict(v, _) => format!("dict of {}", v.len()),
            Value::Global(g) => format!("global {}.{}", g.0, g.1),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Mark => "mark".into(),
        }
    }
}

/// The depth of a container holding `items`, or an error past [`MAX_DEPTH`].
fn depth_over<'v>(items: impl IntoIterator<Item = &'v Value>) -> Result<u16, PickleError> {
    let d = 1 + items.into_iter().map(Value::depth).max().unwrap_or(0);
    if d > MAX_DEPTH {
        return Err(format!("objects nested deeper than {MAX_DEPTH}"));
    }
    Ok(d)
}

/// Counts the bytes of values built against the file's budget.
struct Budget {
    left: usize,
}

impl Budget {
    fn spend(&mut self, n: usize) -> Result<(), PickleError> {
        self.left = self.left.checked_sub(n).ok_or_else(|| {
            "the pickle builds far more data than its size explains (memo copies?)".to_string()
        })?;
        Ok(())
    }

    /// A copy of `v`, paid for.
    fn copy(&mut self, v: &Value) -> Result<Value, PickleError> {
        self.spend(v.weight())?;
        Ok(v.clone())
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated: wanted {n} bytes at offset {} of {}",
                self.pos,
                self.data.len()
            ));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "non-UTF-8 text line")?;
        self.pos += n + 1;
        Ok(s.to_string())
    }
    fn utf8(&mut self, n: usize) -> Result<String, PickleError> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 string".into())
    }
}

fn pop(stack: &mut Vec<Value>) -> Result<Value, PickleError> {
    match stack.pop() {
        Some(Value::Mark) | None => Err("stack underflow".into()),
        Some(v) => Ok(v),
    }
}

/// Pops everything above the topmost mark, and the mark.
fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>, PickleError> {
    let at = stack
        .iter()
        .rposition(|v| *v == Value::Mark)
        .ok_or("no mark on the stack")?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Ok(items)
}

fn as_usize(v: &Value, what: &str) -> Result<usize, PickleError> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!(
            "{what} must be a non-negative int, got {}",
            other.kind()
        )),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>, PickleError> {
    match v {
        Value::Tuple(items, _) | Value::List(items, _) => {
            items.iter().map(|x| as_usize(x, what)).collect()
        }
        other => Err(format!(
            "{what} must be a tuple of ints, got {}",
            other.kind()
        )),
    }
}

const STORAGE_TYPES: [&str; 7] = [
    "BoolStorage",
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "DoubleStorage",
    "LongStorage",
    "IntStorage",
];

fn check_global(module: &str, name: &str) -> Result<(), PickleError> {
    let ok = matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
    ) || (module == "torch" && STORAGE_TYPES.contains(&name));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "global {module}.{name} is not allowed in a tensor checkpoint"
        ))
    }
}

/// Applies an allowed callable to its arguments.
fn reduce(func: Value, args: Value) -> Result<Value, PickleError> {
    let Value::Global(g) = func else {
        return Err(format!("REDUCE on a non-global {}", func.kind()));
    };
    let (module, name) = *g;
    let Value::Tuple(args, _) = args else {
        return Err("REDUCE arguments must be a tuple".into());
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Vec::new(), 1)),
        ("torch._utils", "_rebuild_tensor_v2") if args.len() >= 4 => {
            let Value::Storage(storage) = &args[0] else {
                return Err(format!(
                    "_rebuild_tensor_v2 wants a storage, got {}",
                    args[0].kind()
                ));
            };
            Ok(Value::Tensor(Box::new(TensorRef {
                storage: (**storage).clone(),
                offset: as_usize(&args[1], "storage offset")?,
                size: as_usizes(&args[2], "size")?,
                stride: as_usizes(&args[3], "stride")?,
            })))
        }
        ("torch._utils", "_rebuild_parameter") if !args.is_empty() => match &args[0] {
            t @ Value::Tensor(_) => Ok(t.clone()),
            other => Err(format!(
                "_rebuild_parameter wants a tensor, got {}",
                other.kind()
            )),
        },
        _ => Err(format!(
            "unsupported call {module}.{name} with {} arguments",
            args.len()
        )),
    }
}

/// Resolves a persistent id `('storage', StorageClass, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value, PickleError> {
    let Value::Tuple(items, _) = pid else {
        return Err("persistent id must be a tuple".into());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(g), Value::Str(key), _location, numel]
            if tag == "storage" =>
        {
            let class = &g.1;
            let dtype = class
                .strip_suffix("Storage")
                .ok_or_else(|| format!("unknown storage class {class}"))?;
            if key.is_empty() || key.contains('/') || key.contains("..") {
                return Err(format!("bad storage key {key:?}"));
            }
            Ok(Value::Storage(Box::new(StorageRef {
                key: key.clone(),
                dtype: dtype.to_string(),
                numel: as_usize(numel, "storage size")?,
            })))
        }
        _ => Err(format!(
            "unsupported persistent id of {} items",
            items.len()
        )),
    }
}

/// Interprets `data.pkl` and returns the state dict's `(name, tensor)` pairs in file order.
pub fn read_state_dict(data: &[u8]) -> Result<Vec<(String, TensorRef)>, PickleError> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let mut budget = Budget {
        left: data
            .len()
            .saturating_mul(BYTES_PER_INPUT_BYTE)
            .saturating_add(BUDGET_FLOOR),
    };
    loop {
        let op = r.u8()?;
        // Every opcode builds at most one new value of its own (copies are paid apart).
        budget.spend(std::mem::size_of::<Value>())?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME length: a hint only
            }
            b'.' => break,
            b'(' => stack.push(Value::Mark),
            b'}' => stack.push(Value::Dict(Vec::new(), 1)),
            b']' => stack.push(Value::List(Vec::new(), 1)),
            b')' => stack.push(Value::Tuple(Vec::new(), 1)),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes is too large"));
                }
                let mut v: i64 = 0;
                for (i, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(
                r.take(8)?.try_into().unwrap(),
            ))),
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.utf8(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.utf8(n)?));
            }
            0x8d => {
                let n = usize::try_from(r.u64()?).map_err(|_| "string too long")?;
                stack.push(Value::Str(r.utf8(n)?));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                let d = depth_over(&items)?;
                stack.push(Value::Tuple(items, d));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n || stack[stack.len() - n..].contains(&Value::Mark) {
                    return Err("stack underflow in TUPLE".into());
                }
                let items = stack.split_off(stack.len() - n);
                let d = depth_over(&items)?;
                stack.push(Value::Tuple(items, d));
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                check_global(&module, &name)?;
                stack.push(Value::Global(Box::new((module, name))));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL wants two strings".into());
                };
                check_global(&module, &name)?;
                stack.push(Value::Global(Box::new((module, name))));
            }
            b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'q' => r.u8()? as u64,
                    b'r' => r.u32()? as u64,
                    _ => memo.len() as u64,
                };
                let top = stack.last().ok_or("memo put on empty stack")?;
                memo.insert(k, budget.copy(top)?);
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    r.u8()? as u64
                } else {
                    r.u32()? as u64
                };
                let v = memo.get(&k).ok_or_else(|| format!("memo key {k} unset"))?;
                stack.push(budget.copy(v)?);
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(func, args)?);
            }
            b'b' => {
                // BUILD sets an object's state. torch uses it for a state dict's `_metadata`
                // and tensors' empty state; neither carries weights, so the state is dropped.
                let _state = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::Dict(..)) | Some(Value::Tensor(_)) => {}
                    Some(other) => {
                        return Err(format!("BUILD on unsupported object {}", other.kind()))
                    }
                    None => return Err("BUILD on an empty stack".into()),
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d, depth)) => {
                        *depth = (*depth).max(depth_over([&k, &v])?);
                        d.push((k, v));
                    }
                    _ => return Err("SETITEM on a non-dict".into()),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let Some(Value::Dict(d, depth)) = stack.last_mut() else {
                    return Err("SETITEMS on a non-dict".into());
                };
                *depth = (*depth).max(depth_over(&items)?);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l, depth)) => {
                        *depth = (*depth).max(depth_over([&v])?);
                        l.push(v);
                    }
                    _ => return Err("APPEND on a non-list".into()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l, depth)) => {
                        *depth = (*depth).max(depth_over(&items)?);
                        l.extend(items);
                    }
                    _ => return Err("APPENDS on a non-list".into()),
                }
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} at offset {} is not part of torch's checkpoint format",
                    r.pos - 1
                ))
            }
        }
    }
    let Some(Value::Dict(items, _)) = stack.pop() else {
        return Err("the checkpoint's top-level object is not a dict".into());
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => out.push((name, *t)),
            // Non-tensor entries (e.g. BatchNorm's num_batches_tracked ints) carry no weights.
            (Value::Str(_), _) => {}
            (k, _) => return Err(format!("state dict key {} is not a string", k.kind())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pickle equivalent to what torch.save writes for {"w": tensor of 2 floats}.
    fn tiny() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01");
        p.extend(b"X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02");
        p.extend(b"((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ");
        p.extend(b"K\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rtq\x05R");
        p.extend(b"s}X\t\x00\x00\x00_metadata}sb.");
        p
    }

    #[test]
    fn reads_a_state_dict() {
        let sd = read_state_dict(&tiny()).unwrap();
        assert_eq!(sd.len(), 1);
        assert_eq!(sd[0].0, "w");
        assert_eq!(sd[0].1.size, vec![2]);
        assert_eq!(sd[0].1.storage.dtype, "Float");
        assert_eq!(sd[0].1.storage.numel, 2);
    }

    #[test]
    fn refuses_arbitrary_globals() {
        let mut p = vec![0x80, 2];
        p.extend(b"cos\nsystem\nX\x02\x00\x00\x00ls\x85R.");
        let err = read_state_dict(&p).unwrap_err();
        assert!(err.contains("os.system"), "{err}");
    }

    #[test]
    fn never_panics_on_truncation() {
        let p = tiny();
        for n in 0..p.len() {
            assert!(read_state_dict(&p[..n]).is_err(), "prefix {n} accepted");
        }
    }
}
