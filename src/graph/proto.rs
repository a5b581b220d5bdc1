//! A bounded reader of the protobuf wire format: just what ONNX files need. Every length is
//! checked against the bytes that are really there, so a crafted file can make us read no
//! more than it holds and allocate no more than its own size; nothing here panics.

use crate::error::{EngineError, Result};

/// One field of a message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

impl<'a> Field<'a> {
    pub(crate) fn int(self, what: &str) -> Result<i64> {
        match self {
            Field::Varint(v) => Ok(v as i64),
            _ => Err(malformed(format!("{what}: expected an integer"))),
        }
    }

    pub(crate) fn float(self, what: &str) -> Result<f32> {
        match self {
            Field::Fixed32(b) => Ok(f32::from_le_bytes(b)),
            _ => Err(malformed(format!("{what}: expected a float"))),
        }
    }

    pub(crate) fn bytes(self, what: &str) -> Result<&'a [u8]> {
        match self {
            Field::Bytes(b) => Ok(b),
            _ => Err(malformed(format!("{what}: expected bytes"))),
        }
    }

    pub(crate) fn string(self, what: &str) -> Result<String> {
        let b = self.bytes(what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| malformed(format!("{what}: not UTF-8")))
    }

    /// A repeated int64 field: either one varint or a packed run of them.
    pub(crate) fn ints(self, what: &str, out: &mut Vec<i64>) -> Result<()> {
        match self {
            Field::Varint(v) => out.push(v as i64),
            Field::Bytes(b) => {
                let mut r = Reader::new(b);
                while !r.done() {
                    out.push(r.varint()? as i64);
                }
            }
            _ => return Err(malformed(format!("{what}: expected integers"))),
        }
        Ok(())
    }

    /// A repeated float field: either one fixed32 or a packed run of them.
    pub(crate) fn floats(self, what: &str, out: &mut Vec<f32>) -> Result<()> {
        match self {
            Field::Fixed32(b) => out.push(f32::from_le_bytes(b)),
            Field::Bytes(b) => {
                if b.len() % 4 != 0 {
                    return Err(malformed(format!(
                        "{what}: packed floats of {} bytes",
                        b.len()
                    )));
                }
                out.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            _ => return Err(malformed(format!("{what}: expected floats"))),
        }
        Ok(())
    }
}

pub(crate) fn malformed(msg: impl Into<String>) -> EngineError {
    EngineError::Onnx(msg.into())
}

/// Iterates over the fields of one message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| malformed("truncated varint"))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed(format!("a field of {n} bytes runs past the end")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Result<Option<(u32, Field<'a>)>> {
        if self.done() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| malformed("field number too large"))?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                Field::Fixed64([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| malformed("length does not fit in memory"))?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32([b[0], b[1], b[2], b[3]])
            }
            other => return Err(malformed(format!("unsupported wire type {other}"))),
        };
        Ok(Some((number, field)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_rejects_truncation() {
        // field 1 varint 300; field 2 bytes "ab"; field 3 fixed32 1.5
        let mut msg = vec![0x08, 0xac, 0x02, 0x12, 2, b'a', b'b', 0x1d];
        msg.extend_from_slice(&1.5f32.to_le_bytes());
        let mut r = Reader::new(&msg);
        let (n, f) = r.next_field().unwrap().unwrap();
        assert_eq!((n, f.int("x").unwrap()), (1, 300));
        let (n, f) = r.next_field().unwrap().unwrap();
        assert_eq!((n, f.string("x").unwrap().as_str()), (2, "ab"));
        let (n, f) = r.next_field().unwrap().unwrap();
        assert_eq!((n, f.float("x").unwrap()), (3, 1.5));
        assert!(r.next_field().unwrap().is_none());
        for cut in 1..msg.len() {
            let mut r = Reader::new(&msg[..cut]);
            let mut result = Ok(());
            while let Some(step) = r.next_field().transpose() {
                if let Err(e) = step {
                    result = Err(e);
                    break;
                }
            }
            // Cuts at a field boundary are valid shorter messages; the others must be errors.
            if ![3, 7].contains(&cut) {
                assert!(result.is_err(), "cut at {cut} accepted");
            }
        }
        // A length far beyond the buffer is an error, not an allocation.
        let huge = [0x12, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(Reader::new(&huge).next_field().is_err());
    }

    #[test]
    fn varints_encode_as_protobuf() {
        let mut p = Message::default();
        p.varint(1);
        p.varint(300);
        p.varint(u64::MAX);
        assert_eq!(&p.0[..3], &[0x01, 0xac, 0x02]);
        assert_eq!(p.0.len(), 3 + 10);
        let mut r = Reader::new(&[0xac, 0x02]);
        assert_eq!(r.varint().unwrap(), 300);
    }
}

/// A protobuf message being written (the few wire types ONNX needs): our ONNX exports.
#[derive(Default)]
pub(crate) struct Message(pub(crate) Vec<u8>);

impl Message {
    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    pub(crate) fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }
    pub(crate) fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    pub(crate) fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    pub(crate) fn string(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }
    pub(crate) fn message(&mut self, field: u32, m: &Message) -> &mut Self {
        self.bytes(field, &m.0)
    }
}
