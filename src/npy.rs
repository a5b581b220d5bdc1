//! NumPy `.npy` files of f32 (or f64, converted) C-order arrays: the command line's input and
//! output format, and how tests exchange tensors with the Python reference.

use crate::error::{EngineError, Result};
use crate::exec::Tensor;

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::Dataset(format!(".npy: {}", msg.into()))
}

/// The value of `'key':` in the header dict, up to the next top-level comma or brace.
fn header_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .ok_or_else(|| bad(format!("header has no '{key}'")))?;
    let rest = header[at + key.len() + 2..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .ok_or_else(|| bad("malformed header"))?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .ok_or_else(|| bad("malformed header"))?;
    Ok(rest[..end].trim())
}

pub fn read_npy(bytes: &[u8]) -> Result<Tensor> {
    let magic = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != magic {
        return Err(bad("not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (
            usize::from(u16::from_le_bytes([bytes[8], bytes[9]])),
            10usize,
        ),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("version {v} is not supported"))),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let descr = header_value(header, "descr")?.trim_matches(['\'', '"']);
    if header_value(header, "fortran_order")? != "False" {
        return Err(bad("Fortran-order arrays are not supported"));
    }
    let shape = header_value(header, "shape")?;
    let dims = shape
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("shape {shape}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let count = crate::graph::element_count(&dims)?;
    let body = &bytes[start + header_len..];
    let data: Vec<f32> = match descr {
        "<f4" => {
            if body.len() != count.saturating_mul(4) {
                return Err(bad(format!("{} data bytes for shape {dims:?}", body.len())));
            }
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        "<f8" => {
            if body.len() != count.saturating_mul(8) {
                return Err(bad(format!("{} data bytes for shape {dims:?}", body.len())));
            }
            body.chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect()
        }
        other => {
            return Err(bad(format!(
                "dtype {other} (float32 or float64 arrays are read)"
            )));
        }
    };
    Ok(Tensor { dims, data })
}

pub fn write_npy(t: &Tensor) -> Vec<u8> {
    let shape = match t.dims.as_slice() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64 bytes.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &t.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let t = Tensor {
            dims: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5],
        };
        let bytes = write_npy(&t);
        // 64-byte aligned header, then 6 floats.
        assert_eq!(bytes.len() % 64, 24);
        assert_eq!(read_npy(&bytes).unwrap(), t);
        assert!(read_npy(&bytes[..bytes.len() - 1]).is_err());
        assert!(read_npy(b"not numpy at all").is_err());
        let scalar = Tensor {
            dims: vec![4],
            data: vec![0.0; 4],
        };
        assert_eq!(read_npy(&write_npy(&scalar)).unwrap(), scalar);
    }
}
