//! Reader for PyTorch's legacy (pre-1.6, non-zip) checkpoint format.
//!
//! The format is a sequence of pickles: magic number, protocol version, system info, the
//! object itself (tensors refer to storages through persistent ids), the list of storage
//! keys, and then each storage's raw bytes (an i64 element count, then the elements).
//! Only the subset of the pickle machine that state dicts use is implemented; anything
//! else is reported as an error instead of being guessed at.

use std::collections::HashMap;

use crate::error::{EngineError, Result};
use crate::weights::{NamedTensor, TensorStore};

const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

// Payloads of scalar variants are parsed to keep the pickle stream in step; state dicts
// do not need their values.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// A persistent id: in torch checkpoints, a storage reference tuple.
    Persistent(Box<Value>),
    Tensor(TensorRef),
    /// An object we do not model (its constructor and arguments are kept for errors).
    Opaque(String),
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage_key: String,
    storage_type: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

fn err(msg: impl Into<String>) -> EngineError {
    EngineError::TorchFormat(msg.into())
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| err("unexpected end of file"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| err("unterminated line"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| err("pickle stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| err("pickle mark missing"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> Result<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| err("pickle stack empty"))
    }

    fn str_bytes(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| err("invalid utf-8 string"))
    }

    /// Runs one pickle to its STOP opcode and returns the value it built.
    fn load(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 16 {
                        return Err(err("integer too large"));
                    }
                    let mut v: i128 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    self.stack.push(match i64::try_from(v) {
                        Ok(small) => Value::Int(small),
                        Err(_) => Value::Opaque(format!("long {v}")),
                    });
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.str_bytes(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.str_bytes(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]));
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]));
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top_mut()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(err("APPEND on a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top_mut()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(err("APPENDS on a non-list")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err(err("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(err("SETITEMS with an odd number of items"));
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top_mut()? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return Err(err("SETITEMS on a non-dict")),
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.stack.push(Value::Global { module, name })
                        }
                        _ => return Err(err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo.get(&i).cloned().ok_or_else(|| err("bad memo"))?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo.get(&i).cloned().ok_or_else(|| err("bad memo"))?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Value::Persistent(Box::new(pid)));
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = reduce(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: object state (e.g. a state dict's `_metadata`); not needed.
                    self.pop()?;
                }
                other => {
                    return Err(err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    )));
                }
            }
        }
    }
}

fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Global { module, name } = &callable else {
        return Ok(Value::Opaque("call of a non-global".into()));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let Value::Tuple(a) = args else {
                return Err(err("tensor rebuild without an argument tuple"));
            };
            let (storage_key, storage_type) = match a.first() {
                Some(Value::Persistent(pid)) => storage_ref(pid)?,
                _ => return Err(err("tensor without a storage")),
            };
            let offset = as_usize(a.get(1))?;
            let size = as_usizes(a.get(2))?;
            let stride = as_usizes(a.get(3))?;
            Ok(Value::Tensor(TensorRef {
                storage_key,
                storage_type,
                offset,
                size,
                stride,
            }))
        }
        _ => Ok(Value::Opaque(format!("{module}.{name}"))),
    }
}

fn storage_ref(pid: &Value) -> Result<(String, String)> {
    // ('storage', storage_type, key, location, numel[, view_metadata])
    let Value::Tuple(t) = pid else {
        return Err(err("storage id is not a tuple"));
    };
    let ty = match t.get(1) {
        Some(Value::Global { name, .. }) => name.clone(),
        _ => return Err(err("storage id without a type")),
    };
    let key = match t.get(2) {
        Some(Value::Str(s)) => s.clone(),
        _ => return Err(err("storage id without a key")),
    };
    Ok((key, ty))
}

fn as_usize(v: Option<&Value>) -> Result<usize> {
    match v {
        Some(Value::Int(i)) if *i >= 0 => Ok(*i as usize),
        _ => Err(err("expected a non-negative integer")),
    }
}

fn as_usizes(v: Option<&Value>) -> Result<Vec<usize>> {
    match v {
        Some(Value::Tuple(items)) | Some(Value::List(items)) => {
            items.iter().map(|i| as_usize(Some(i))).collect()
        }
        _ => Err(err("expected a tuple of integers")),
    }
}

fn element_size(storage_type: &str) -> Result<usize> {
    Ok(match storage_type {
        "FloatStorage" | "IntStorage" => 4,
        "DoubleStorage" | "LongStorage" => 8,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
        other => return Err(err(format!("unsupported storage type {other}"))),
    })
}

/// Reads every floating-point tensor of a legacy checkpoint's state dict, in file order.
/// Integer buffers (BatchNorm's `num_batches_tracked`) are skipped: they carry no weights.
pub fn read_legacy_state_dict(bytes: &[u8]) -> Result<TensorStore> {
    let mut u = Unpickler::new(bytes, 0);
    match u.load()? {
        Value::Int(m) if m as u128 == LEGACY_MAGIC => {}
        Value::Opaque(s) if s == format!("long {LEGACY_MAGIC}") => {}
        _ => {
            return Err(err(
                "magic number missing (a zip-format checkpoint needs torch >= 1.6's reader)",
            ));
        }
    }
    for _ in 0..2 {
        // protocol version, system info
        let pos = u.pos;
        u = Unpickler::new(bytes, pos);
        u.load()?;
    }
    let pos = u.pos;
    let mut u = Unpickler::new(bytes, pos);
    let root = u.load()?;
    let pos = u.pos;
    let mut u = Unpickler::new(bytes, pos);
    let keys = match u.load()? {
        Value::List(k) => k
            .into_iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s),
                _ => Err(err("storage key is not a string")),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return Err(err("storage key list missing")),
    };

    let entries = match root {
        Value::Dict(d) => d,
        _ => return Err(err("the checkpoint is not a state dict")),
    };
    let mut types: HashMap<String, String> = HashMap::new();
    for (_, v) in &entries {
        if let Value::Tensor(t) = v {
            types.insert(t.storage_key.clone(), t.storage_type.clone());
        }
    }

    // Storages follow in key order, each as an i64 element count then raw little-endian data.
    let mut storages: HashMap<String, (&[u8], String)> = HashMap::new();
    let mut pos = u.pos;
    for key in keys {
        let ty = types
            .get(&key)
            .cloned()
            .ok_or_else(|| err(format!("storage {key} is not used by any tensor")))?;
        let esize = element_size(&ty)?;
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| err("truncated storage header"))?;
        let mut n = [0u8; 8];
        n.copy_from_slice(head);
        let numel = u64::from_le_bytes(n) as usize;
        let start = pos + 8;
        let end = numel
            .checked_mul(esize)
            .and_then(|b| b.checked_add(start))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| err(format!("storage {key} is truncated")))?;
        storages.insert(key, (&bytes[start..end], ty));
        pos = end;
    }

    let mut store = TensorStore::default();
    for (k, v) in entries {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            continue;
        };
        let (raw, ty) = storages
            .get(&t.storage_key)
            .ok_or_else(|| err(format!("storage {} missing", t.storage_key)))?;
        let values: Vec<f32> = match ty.as_str() {
            "FloatStorage" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "DoubleStorage" => raw
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
            _ => continue,
        };
        let data = gather_strided(&values, t.offset, &t.size, &t.stride)
            .ok_or_else(|| err(format!("tensor {name} reaches outside its storage")))?;
        store.push(NamedTensor {
            name,
            shape: t.size,
            data,
        });
    }
    Ok(store)
}

/// Copies a strided view into a new contiguous row-major buffer.
fn gather_strided(
    storage: &[f32],
    offset: usize,
    size: &[usize],
    stride: &[usize],
) -> Option<Vec<f32>> {
    let numel: usize = size.iter().product();
    let mut out = Vec::with_capacity(numel);
    if numel == 0 {
        return Some(out);
    }
    let mut index = vec![0usize; size.len()];
    for _ in 0..numel {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(*storage.get(at)?);
        for d in (0..size.len()).rev() {
            index[d] += 1;
            if index[d] < size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_transposed_view() {
        // storage [[0,1,2],[3,4,5]] viewed as its transpose (3×2).
        let s: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let t = gather_strided(&s, 0, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5.]);
    }

    #[test]
    fn rejects_non_checkpoint() {
        assert!(read_legacy_state_dict(b"PK\x03\x04zip").is_err());
        assert!(read_legacy_state_dict(b"").is_err());
    }
}
