//! Named f32 tensors in memory, and their safetensors form (what the site serves).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{EngineError, Result};

/// Metadata key holding the tensors' original order, one name per line.
const ORDER_KEY: &str = "compresslab.order";

#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An ordered collection of named tensors.
#[derive(Debug, Clone, Default)]
pub struct TensorStore {
    tensors: Vec<NamedTensor>,
    index: HashMap<String, usize>,
}

impl TensorStore {
    pub fn push(&mut self, tensor: NamedTensor) {
        match self.index.get(&tensor.name) {
            Some(&i) => self.tensors[i] = tensor,
            None => {
                self.index.insert(tensor.name.clone(), self.tensors.len());
                self.tensors.push(tensor);
            }
        }
    }

    pub fn get(&self, name: &str) -> Result<&NamedTensor> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| EngineError::MissingTensor { name: name.into() })
    }

    /// The tensor, checked against the shape the caller expects.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<&NamedTensor> {
        let t = self.get(name)?;
        if t.shape != expected {
            return Err(EngineError::ShapeMismatch {
                name: name.into(),
                found: t.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &NamedTensor> {
        self.tensors.iter()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|t| {
                let raw = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (t.name.clone(), raw, t.shape.clone())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, raw, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), raw)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| EngineError::Weights(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        // safetensors stores tensors sorted for alignment; keep ours in the metadata.
        let order = self
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let metadata = HashMap::from([(ORDER_KEY.to_string(), order)]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| EngineError::Weights(e.to_string()))
    }

    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| EngineError::Weights(e.to_string()))?;
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| EngineError::Weights(e.to_string()))?;
        let rank: HashMap<String, usize> = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(ORDER_KEY))
            .map(|order| {
                order
                    .split('\n')
                    .enumerate()
                    .map(|(i, n)| (n.to_string(), i))
                    .collect()
            })
            .unwrap_or_default();
        // Our own order when recorded, else the file's (by data offset).
        let mut named: Vec<_> = st.tensors();
        named.sort_by_key(|(name, v)| {
            (
                rank.get(name).copied().unwrap_or(usize::MAX),
                v.data().as_ptr() as usize,
            )
        });
        let mut store = TensorStore::default();
        for (name, view) in named {
            if view.dtype() != Dtype::F32 {
                return Err(EngineError::Weights(format!(
                    "tensor {name} is {:?}, only F32 is supported",
                    view.dtype()
                )));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            store.push(NamedTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            });
        }
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_order_and_values() {
        let mut s = TensorStore::default();
        s.push(NamedTensor {
            name: "z.weight".into(),
            shape: vec![2, 2],
            data: vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE],
        });
        s.push(NamedTensor {
            name: "a.bias".into(),
            shape: vec![3],
            data: vec![0.0, 1e-8, -7.0],
        });
        let back = TensorStore::from_safetensors(&s.to_safetensors().unwrap()).unwrap();
        let names: Vec<_> = back.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["z.weight", "a.bias"]);
        assert_eq!(back.get("z.weight").unwrap(), s.get("z.weight").unwrap());
        assert_eq!(back.parameter_count(), 7);
        assert!(TensorStore::from_safetensors(b"garbage").is_err());
    }
}
