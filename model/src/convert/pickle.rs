//! A minimal, safe pickle interpreter for PyTorch checkpoints (`data.pkl` of a `torch.save` zip).
//!
//! Nothing is ever executed: globals are names. Known ones are given their meaning here
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
//! `torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage`); any other global
//! becomes an opaque value, which is an error wherever a tensor is expected (so a checkpoint's
//! unrelated top-level entries, e.g. optimizer state, do not stop a conversion, but nothing unknown
//! can end up in a state dict). Opcodes outside the list in [`Machine::run`] are rejected.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use vi_weights::WDType;

/// A storage type named by a `torch.*Storage` global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageType {
    pub dtype: WDType,
    pub name: &'static str,
}

fn storage_type(name: &str) -> Option<StorageType> {
    let (dtype, name) = match name {
        "FloatStorage" => (WDType::F32, "FloatStorage"),
        "HalfStorage" => (WDType::F16, "HalfStorage"),
        "BFloat16Storage" => (WDType::BF16, "BFloat16Storage"),
        "DoubleStorage" => (WDType::F64, "DoubleStorage"),
        "LongStorage" => (WDType::I64, "LongStorage"),
        "IntStorage" => (WDType::I32, "IntStorage"),
        "ShortStorage" => (WDType::I16, "ShortStorage"),
        "CharStorage" => (WDType::I8, "CharStorage"),
        "ByteStorage" => (WDType::U8, "ByteStorage"),
        "BoolStorage" => (WDType::Bool, "BoolStorage"),
        _ => return None,
    };
    Some(StorageType { dtype, name })
}

/// A storage record referenced by a persistent id `('storage', type, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub ty: StorageType,
    /// Record name under `<prefix>/data/`.
    pub key: String,
    /// Number of elements of the storage.
    pub numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it (elements, not bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect = expect.saturating_mul(d);
        }
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callable {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
}

/// A pickle value. Lists and dicts are shared (as in Python) so that memo references see later
/// mutations.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion-ordered (dict and OrderedDict alike).
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Callable(Callable),
    StorageClass(StorageType),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// A global we do not interpret, or anything built from one. Never executed.
    Opaque(Rc<str>),
}

/// Move the children of a uniquely owned container out (shared ones are left to their last owner).
fn take_children(v: &mut Value, out: &mut Vec<Value>) {
    match v {
        Value::Tuple(rc) => {
            if let Some(items) = Rc::get_mut(rc) {
                out.append(items);
            }
        }
        Value::List(rc) => {
            if let Some(cell) = Rc::get_mut(rc) {
                out.append(cell.get_mut());
            }
        }
        Value::Dict(rc) => {
            if let Some(cell) = Rc::get_mut(rc) {
                for (k, x) in cell.get_mut().drain(..) {
                    out.push(k);
                    out.push(x);
                }
            }
        }
        _ => {}
    }
}

/// Iterative drop: a hostile pickle may nest containers millions deep; the default recursive
/// drop would overflow the stack. Every value empties itself before it is freed.
impl Drop for Value {
    fn drop(&mut self) {
        let mut pending = Vec::new();
        take_children(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            take_children(&mut v, &mut pending);
        }
    }
}

impl Value {
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Callable(c) => format!("{c:?}"),
            Value::StorageClass(s) => s.name.into(),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Opaque(g) => format!("object of unsupported global `{g}`"),
        }
    }

    /// Entries of a dict with string keys.
    pub fn dict_entries(&self) -> Option<Vec<(String, Value)>> {
        let Value::Dict(d) = self else { return None };
        d.borrow()
            .iter()
            .map(|(k, v)| match k {
                Value::Str(s) => Some((s.to_string(), v.clone())),
                _ => None,
            })
            .collect()
    }

    fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    fn as_usize_tuple(&self) -> Option<Vec<usize>> {
        match self {
            Value::Tuple(v) => v.iter().map(Value::as_usize).collect(),
            _ => None,
        }
    }
}

/// The pickle virtual machine (no code execution; see module docs).
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated at byte {} (need {n} more bytes)", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> PResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(format!("pop across a MARK at byte {}", self.pos));
        }
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }
    fn top(&mut self) -> PResult<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("no MARK at byte {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }
    fn string(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(Rc::from(
            std::str::from_utf8(b).map_err(|_| "string is not UTF-8")?,
        )))
    }

    fn global(module: &str, name: &str) -> Value {
        match (module, name) {
            ("collections", "OrderedDict") => Value::Callable(Callable::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Value::Callable(Callable::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Value::Callable(Callable::RebuildParameter),
            ("torch", n) => match storage_type(n) {
                Some(t) => Value::StorageClass(t),
                None => Value::Opaque(Rc::from(format!("{module}.{name}"))),
            },
            _ => Value::Opaque(Rc::from(format!("{module}.{name}"))),
        }
    }

    fn reduce(f: &Value, args: &Value) -> PResult<Value> {
        let Value::Tuple(args) = args else {
            return Err(format!("REDUCE arguments are a {}", args.describe()));
        };
        match f {
            Value::Callable(Callable::OrderedDict) => {
                let mut items = Vec::new();
                if let Some(a) = args.first() {
                    // OrderedDict([(k, v), ...])
                    let pairs: Vec<Value> = match a {
                        Value::List(l) => l.borrow().clone(),
                        Value::Tuple(t) => t.to_vec(),
                        other => return Err(format!("OrderedDict({})", other.describe())),
                    };
                    for p in pairs {
                        match &p {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                items.push((kv[0].clone(), kv[1].clone()))
                            }
                            _ => return Err("OrderedDict item is not a pair".into()),
                        }
                    }
                }
                Ok(Value::Dict(Rc::new(RefCell::new(items))))
            }
            Value::Callable(Callable::RebuildTensorV2) => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                if args.len() < 4 {
                    return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
                }
                let storage = match &args[0] {
                    Value::Storage(s) => s.clone(),
                    Value::Opaque(g) => return Ok(Value::Opaque(g.clone())),
                    other => return Err(format!("tensor storage is a {}", other.describe())),
                };
                let offset = args[1].as_usize().ok_or("bad storage offset")?;
                let shape = args[2].as_usize_tuple().ok_or("bad tensor size")?;
                let stride = args[3].as_usize_tuple().ok_or("bad tensor stride")?;
                if shape.len() != stride.len() {
                    return Err(format!(
                        "size {shape:?} and stride {stride:?} differ in rank"
                    ));
                }
                Ok(Value::Tensor(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                }))
            }
            Value::Callable(Callable::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter without a tensor".into()),
            },
            Value::Opaque(g) => Ok(Value::Opaque(g.clone())),
            other => Err(format!("REDUCE on a {}", other.describe())),
        }
    }

    fn persistent_load(pid: &Value) -> PResult<Value> {
        let Value::Tuple(t) = pid else {
            return Err(format!("persistent id is a {}", pid.describe()));
        };
        match t.as_slice() {
            [Value::Str(tag), ty, Value::Str(key), Value::Str(_location), numel]
                if &**tag == "storage" =>
            {
                let numel = numel.as_usize().ok_or("bad storage numel")?;
                match ty {
                    Value::StorageClass(ty) => Ok(Value::Storage(StorageRef {
                        ty: *ty,
                        key: key.to_string(),
                        numel,
                    })),
                    Value::Opaque(g) => Ok(Value::Opaque(g.clone())),
                    other => Err(format!("storage type is a {}", other.describe())),
                }
            }
            _ => Err("persistent id is not ('storage', type, key, location, numel)".into()),
        }
    }

    fn run(&mut self) -> PResult<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: length hint only
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Default::default())),
                b']' => self.stack.push(Value::List(Default::default())),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {at}"));
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("DICT with an odd number of items".into());
                    }
                    let pairs = items
                        .chunks_exact(2)
                        .map(|c| (c[0].clone(), c[1].clone()))
                        .collect();
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => return Err(format!("APPEND to a {}", other.describe())),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => return Err(format!("APPENDS to a {}", other.describe())),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of items".into());
                    }
                    match self.top()? {
                        Value::Dict(d) => {
                            let mut d = d.borrow_mut();
                            for c in items.chunks_exact(2) {
                                d.push((c[0].clone(), c[1].clone()));
                            }
                        }
                        Value::Opaque(_) => {}
                        other => return Err(format!("SETITEM on a {}", other.describe())),
                    }
                }
                b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'h' | b'j' => {
                    let idx = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v = self
                        .memo
                        .get(&idx)
                        .cloned()
                        .ok_or_else(|| format!("memo {idx} undefined at byte {at}"))?;
                    self.stack.push(v);
                }
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
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("LONG1 of {n} bytes does not fit i64"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'G' => {
                    let b = self.take(8)?;
                    self.stack
                        .push(Value::Float(f64::from_be_bytes(b.try_into().expect("8"))));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'B' | b'C' | b'T' | b'U' => {
                    let n = match op {
                        b'B' | b'T' => self.u32()? as usize,
                        _ => self.u8()? as usize,
                    };
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Self::global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Self::global(m, n)),
                        _ => return Err("STACK_GLOBAL without two strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = Self::reduce(&f, &args).map_err(|e| format!("{e} (byte {at})"))?;
                    self.stack.push(v);
                }
                b'b' => {
                    let _state = self.pop()?;
                    // OrderedDict `_metadata`, tensor state, opaque objects: state ignored.
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) | Value::Opaque(_) => {}
                        other => return Err(format!("BUILD on a {}", other.describe())),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = Self::persistent_load(&pid).map_err(|e| format!("{e} (byte {at})"))?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} ({:?}) at byte {at}",
                        other as char
                    ))
                }
            }
        }
    }
}

/// Interpret a pickle; returns the unpickled top value. Errors describe the first problem.
pub fn load(data: &[u8]) -> std::result::Result<Value, String> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_code_execution_opcodes_and_unknown_globals_stay_inert() {
        // INST / OBJ opcodes are not interpreted at all.
        assert!(load(b"(ios\nsystem\nS'ls'\n.")
            .unwrap_err()
            .contains("unsupported"));
        // GLOBAL os.system + REDUCE: just an opaque value, nothing runs.
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        match &load(p).unwrap() {
            Value::Opaque(g) => assert_eq!(&**g, "os.system"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn deep_nesting_and_dup_bombs_are_cheap() {
        // Two million nested 1-tuples: built and dropped without recursion.
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 2_000_000));
        p.push(b'.');
        assert!(matches!(load(&p).unwrap(), Value::Tuple(_)));
        // Same for lists nested through APPEND.
        let mut p = b"\x80\x02]".to_vec();
        for _ in 0..500_000 {
            p.extend(b"]");
        }
        p.extend(std::iter::repeat_n(b'a', 500_000));
        p.push(b'.');
        assert!(matches!(load(&p).unwrap(), Value::List(_)));
        // A 1 MB string duplicated a million times shares one buffer.
        let mut p = b"\x80\x02X\x00\x00\x10\x00".to_vec();
        p.extend(std::iter::repeat_n(b'x', 1 << 20));
        p.extend(std::iter::repeat_n(b'2', 1_000_000));
        p.push(b'.');
        assert!(matches!(load(&p).unwrap(), Value::Str(_)));
    }

    #[test]
    fn corrupted_torch_pickle_never_panics() {
        let ckpt = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/convert/model.ckpt");
        let bytes = std::fs::read(&ckpt).unwrap();
        let mut z = zip::ZipArchive::new(std::fs::File::open(&ckpt).unwrap()).unwrap();
        let f = z.by_name("model/data.pkl").unwrap();
        let (start, len) = (f.data_start() as usize, f.size() as usize);
        let pkl = &bytes[start..start + len];
        assert!(load(pkl).is_ok());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..100 {
            let mut b = pkl.to_vec();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let _ = load(&b);
            // A truncated (unmodified) pickle never reaches STOP.
            let cut = (next() as usize) % pkl.len();
            assert!(load(&pkl[..cut]).is_err());
        }
    }

    #[test]
    fn truncated_input_is_an_error() {
        assert!(load(b"\x80\x02X\xff\x00\x00\x00ab").is_err());
        assert!(load(b"").is_err());
        assert!(load(b"\x80\x02t.").is_err());
    }
}
