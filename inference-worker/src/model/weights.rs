//! The safetensors files of a model folder, memory-mapped. Owns finding the files (single file,
//! `model.safetensors.index.json` shards, or every `*.safetensors`), reading their headers, and
//! handing out tensors by name with shape checks; does not know what the tensors mean.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::ModelError;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// A tensor's bytes inside its mapped file.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: WeightDtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// The (rows, columns) of parts of one weight (e.g. q, k and v) fused into a single row-major
/// matrix, which is their elements one part after another: 1-D parts (norm gains, biases)
/// concatenate into one row vector; N-D parts stack rows and must agree on every dimension
/// after the first.
pub fn fused_shape(parts: &[TensorView<'_>]) -> Result<(usize, usize), ModelError> {
    let row_vector = parts.iter().all(|p| p.shape.len() == 1);
    let cols: usize = if row_vector {
        parts.iter().map(|p| p.shape[0]).sum()
    } else {
        parts[0].shape[1..].iter().product()
    };
    let mut elements = 0;
    for part in parts {
        if !row_vector
            && (part.shape.len() < 2 || part.shape[1..].iter().product::<usize>() != cols)
        {
            return Err(ModelError::Tensor {
                file: part.file.display().to_string(),
                tensor: part.name.to_owned(),
                reason: format!(
                    "shape {:?} cannot be fused with {:?}",
                    part.shape, parts[0].shape
                ),
            });
        }
        elements += part.shape.iter().product::<usize>();
    }
    Ok((elements / cols.max(1), cols))
}

/// [`fused_shape`]'s matrix in f32, for backends that convert to their own storage.
pub fn fuse_f32(parts: &[TensorView<'_>]) -> Result<(Vec<f32>, usize, usize), ModelError> {
    let (rows, cols) = fused_shape(parts)?;
    let mut data = Vec::with_capacity(rows * cols);
    for part in parts {
        data.extend(part.to_f32());
    }
    Ok((data, rows, cols))
}

impl TensorView<'_> {
    /// The tensor converted to f32 (little-endian storage, as safetensors specifies).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes;
        match self.dtype {
            WeightDtype::F32 => b
                .par_chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WeightDtype::Bf16 => b
                .par_chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WeightDtype::F16 => b
                .par_chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

struct Entry {
    file: usize,
    dtype: WeightDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a model folder, by name.
pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl WeightFiles {
    /// Maps the safetensors files of `dir` and reads their headers.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let index: ShardIndex = super::config::read_json(&index_path)?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| ModelError::Io {
                    path: dir.display().to_string(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if paths.is_empty() {
            return Err(ModelError::Missing {
                path: dir.join("model.safetensors").display().to_string(),
                what: "no *.safetensors weight files in the model folder".to_owned(),
            });
        }

        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for path in paths {
            let shown = path.display().to_string();
            let file = File::open(&path).map_err(|source| ModelError::Io {
                path: shown.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only and the model files are not modified while served;
            // a file truncated underneath us would fault, as it would for any mmap-based loader.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: shown.clone(),
                source,
            })?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| ModelError::Tensor {
                    file: shown.clone(),
                    tensor: "(header)".to_owned(),
                    reason: e.to_string(),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => WeightDtype::F32,
                    Dtype::F16 => WeightDtype::F16,
                    Dtype::BF16 => WeightDtype::Bf16,
                    other => {
                        return Err(ModelError::Tensor {
                            file: shown.clone(),
                            tensor: name,
                            reason: format!("dtype {other:?} is not supported (bf16, f16, f32)"),
                        });
                    }
                };
                let (start, end) = info.data_offsets;
                tensors.insert(
                    name,
                    Entry {
                        file: files.len(),
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + start,
                        end: data_start + end,
                    },
                );
            }
            files.push((path, map));
        }
        Ok(Self { files, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn file_paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get<'a>(&'a self, name: &'a str, shape: &[usize]) -> Result<TensorView<'a>, ModelError> {
        let entry = self.tensors.get(name).ok_or_else(|| ModelError::Tensor {
            file: self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            tensor: name.to_owned(),
            reason: "missing".to_owned(),
        })?;
        let (path, map) = &self.files[entry.file];
        if entry.shape != shape {
            return Err(ModelError::Tensor {
                file: path.display().to_string(),
                tensor: name.to_owned(),
                reason: format!("shape {:?}, expected {:?}", entry.shape, shape),
            });
        }
        Ok(TensorView {
            name,
            file: path,
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: &map[entry.start..entry.end],
        })
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.end - e.start).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(name: &'a str, shape: &'a [usize], bytes: &'a [u8]) -> TensorView<'a> {
        TensorView {
            name,
            file: Path::new("model.safetensors"),
            dtype: WeightDtype::F32,
            shape,
            bytes,
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn parts_stack_rows_or_concatenate_and_mismatched_columns_are_named() {
        let (a, b) = (f32_bytes(&[1.0, 2.0, 3.0, 4.0]), f32_bytes(&[5.0, 6.0]));
        let (data, rows, cols) =
            fuse_f32(&[view("q", &[2, 2], &a), view("k", &[1, 2], &b)]).unwrap();
        assert_eq!(
            (data, rows, cols),
            (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)
        );
        let (data, rows, cols) = fuse_f32(&[view("g", &[4], &a), view("b", &[2], &b)]).unwrap();
        assert_eq!((data.len(), rows, cols), (6, 1, 6));
        let e = fuse_f32(&[view("q", &[1, 4], &a), view("k", &[1, 2], &b)]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains('k') && e.contains("cannot be fused"), "{e}");
    }

    /// The header's check that the data covers the file is what keeps the slicing in
    /// [`WeightFiles::get`] in bounds.
    #[test]
    fn a_truncated_file_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("llmctl-truncated-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        let tensor = safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap();
        let mut bytes = safetensors::serialize([("w", tensor)], None).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        let e = WeightFiles::open(&dir)
            .err()
            .expect("a truncated file")
            .to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
