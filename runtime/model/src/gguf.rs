//! GGUF v2/v3 reader on a memory map. Parses the header, metadata and tensor table with
//! every length, offset and size bounds-checked against the file, and hands out borrowed
//! views of tensor data (no copy of the weights).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::quant::GgmlType;
use crate::{ModelError, Result};

const GGUF_MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
// Guards against absurd counts in corrupt headers before we allocate for them.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// An array of strings, of arrays, or (as a writer builds it) of any values.
    Array(Vec<Value>),
    /// An array of one numeric or bool type as the file stores it, so that n one-byte
    /// elements cost n bytes of memory rather than n `Value`s (32n).
    Packed(Packed),
}

/// A packed numeric array: the element type id (GGUF's numbering) and the raw
/// little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    ty: u32,
    raw: Vec<u8>,
}

/// Byte width of a numeric or bool GGUF value type (`None` for strings and arrays).
fn scalar_width(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

impl Packed {
    pub fn len(&self) -> usize {
        self.raw.len() / scalar_width(self.ty).unwrap_or(1)
    }
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
    /// Element `i` as a [`Value`].
    pub fn get(&self, i: usize) -> Option<Value> {
        let w = scalar_width(self.ty)?;
        let b = self.raw.get(i * w..(i + 1) * w)?;
        let mut c = Cursor { buf: b, pos: 0 };
        c.value(self.ty, "", 0).ok()
    }
    pub fn iter(&self) -> impl Iterator<Item = Value> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::I8(v) if v >= 0 => v as u64,
            Value::U16(v) => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::U32(v) => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::U64(v) => v,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The elements of an unpacked array (strings, nested arrays).
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The elements of any array, packed or not.
    pub fn items(&self) -> Option<Box<dyn Iterator<Item = Value> + '_>> {
        match self {
            Value::Array(a) => Some(Box::new(a.iter().cloned())),
            Value::Packed(p) => Some(Box::new(p.iter())),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (column) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    mmap: Bytes,
}

/// The file's bytes: mapped from disk, or owned (a file read from memory, as fuzzing and
/// tests do).
enum Bytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            ModelError::Corrupt(format!(
                "GGUF file is truncated: reading {what} needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.buf.len()
            ))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, w: &str) -> Result<u8> {
        Ok(self.take(1, w)?[0])
    }
    fn u16(&mut self, w: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, w)?.try_into().unwrap()))
    }
    fn u32(&mut self, w: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, w)?.try_into().unwrap()))
    }
    fn u64(&mut self, w: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, w)?.try_into().unwrap()))
    }
    fn string(&mut self, w: &str) -> Result<String> {
        let n = self.u64(w)?;
        if n > self.buf.len() as u64 {
            return Err(ModelError::Corrupt(format!("GGUF string length {n} for {w} exceeds the file size")));
        }
        let b = self.take(n as usize, w)?;
        String::from_utf8(b.to_vec()).map_err(|_| ModelError::Corrupt(format!("GGUF {w} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.u8(key)? != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(ModelError::Corrupt(format!("GGUF metadata {key}: arrays nested too deeply")));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                // Each element takes at least one byte: a count beyond the file is corrupt.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(ModelError::Corrupt(format!(
                        "GGUF metadata {key}: array of {n} elements does not fit in the file"
                    )));
                }
                if let Some(w) = scalar_width(ety) {
                    let bytes = (n as usize).checked_mul(w).ok_or_else(|| ModelError::Corrupt(format!("GGUF metadata {key}: array length overflows")))?;
                    return Ok(Value::Packed(Packed { ty: ety, raw: self.take(bytes, key)?.to_vec() }));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => return Err(ModelError::Corrupt(format!("GGUF metadata {key}: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| ModelError::Io(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the map is read-only; the file is not expected to change while loaded
        // (the same assumption every mmap-based model loader makes).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io(format!("cannot map {}: {e}", path.display())))?;
        Self::parse(path.to_path_buf(), Bytes::Map(mmap))
    }

    /// Parses a GGUF file held in memory; `name` stands for its path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, mmap: Bytes) -> Result<Self> {
        let buf: &[u8] = &mmap;
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.u32("magic").map_err(|_| ModelError::Corrupt(format!("{} is too short to be a GGUF file", path.display())))?;
        if magic != GGUF_MAGIC {
            return Err(ModelError::Corrupt(format!("{} is not a GGUF file (bad magic)", path.display())));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Unsupported(format!("GGUF version {version} (supported: 2 and 3)")));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
            return Err(ModelError::Corrupt(format!("GGUF header claims {n_tensors} tensors and {n_kv} metadata entries")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().filter(|a| *a > 0 && a.is_power_of_two()).ok_or_else(|| {
                ModelError::Corrupt("general.alignment is not a power of two".into())
            })?,
            None => DEFAULT_ALIGNMENT,
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32("tensor dims")?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(ModelError::Corrupt(format!("tensor {name} has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64("tensor dim")?);
            }
            let tyid = c.u32("tensor type")?;
            let ty = GgmlType::from_id(tyid)
                .ok_or_else(|| ModelError::Unsupported(format!("tensor {name} has unknown or unsupported ggml type id {tyid}")))?;
            let off = c.u64("tensor offset")?;
            raw.push((name, dims, ty, off));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, off) in raw {
            let mut n: u64 = 1;
            for &d in &dims {
                n = n.checked_mul(d).ok_or_else(|| ModelError::Corrupt(format!("tensor {name}: dims overflow")))?;
            }
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(ModelError::Corrupt(format!(
                    "tensor {name}: row length {} is not a multiple of the {} block size {}",
                    dims[0],
                    ty.name(),
                    ty.block_size()
                )));
            }
            let size = (n / ty.block_size() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| ModelError::Corrupt(format!("tensor {name}: size overflow")))?;
            let offset = data_start
                .checked_add(off)
                .ok_or_else(|| ModelError::Corrupt(format!("tensor {name}: offset overflow")))?;
            let end = offset.checked_add(size).ok_or_else(|| ModelError::Corrupt(format!("tensor {name}: size overflow")))?;
            if end > file_len {
                return Err(ModelError::Corrupt(format!(
                    "{} is truncated or corrupt: tensor {name} ends at byte {end} but the file has {file_len} bytes",
                    path.display()
                )));
            }
            tensors.push(TensorInfo { name, dims, ty, offset, size });
        }
        Ok(GgufFile { path, version, metadata, tensors, mmap })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            // An empty array's element type says nothing (writers often put 0 or 4 there).
            Value::Packed(p) if p.is_empty() => Some(Vec::new()),
            v => v.as_array()?.iter().map(|v| v.as_str()).collect(),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset as usize..(t.offset + t.size) as usize]
    }

    /// See [`crate::ModelFile::release`].
    pub fn release(&self, data: &[u8]) {
        let Bytes::Map(mmap) = &self.mmap else { return };
        let base = mmap.as_ptr() as usize;
        let at = data.as_ptr() as usize;
        if at < base || at + data.len() > base + mmap.len() || data.is_empty() {
            return;
        }
        // SAFETY: the map is private and read-only, so dropping its pages loses nothing: any
        // later access (of these bytes or of neighbours sharing a page) reads the file again.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at - base, data.len()) };
    }

    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }
}

/// Writes a GGUF v3 file; used by tests and tools to make synthetic models.
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { kv: Vec::new(), tensors: Vec::new() }
    }
    pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
        self.kv.push((key.to_string(), v));
        self
    }
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Packed(p) => {
                out.extend_from_slice(&p.ty.to_le_bytes());
                out.extend_from_slice(&(p.len() as u64).to_le_bytes());
                out.extend_from_slice(&p.raw);
            }
            Value::Array(a) => {
                let ety = a.first().map(Self::type_id).unwrap_or(4);
                out.extend_from_slice(&ety.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for e in a {
                    Self::put_value(out, e);
                }
            }
        }
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) | Value::Packed(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Self::put_value(&mut out, &Value::Str(k.clone()));
            out.extend_from_slice(&Self::type_id(v).to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut off = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::put_value(&mut out, &Value::Str(name.clone()));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            offsets.push(off);
            off = (off + data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        out.resize(start as usize, 0);
        for ((_, _, _, data), o) in self.tensors.iter().zip(offsets) {
            out.resize((start + o) as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }

    pub fn write(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}
