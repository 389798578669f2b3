#!/usr/bin/env python3
"""Make a real Hugging Face model directory (config.json, model.safetensors, tokenizer files)
from one of the default GGUF models with transformers, to check CoordGen's safetensors path
against its GGUF path on the same weights. Developer tool (needs torch, transformers, gguf).

Usage: scripts/make_hf_dir.py smollm2|qwen-0.5b OUT_DIR [--dtype float32|bfloat16|float16]
"""
import argparse, os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("COORDGEN_MODELS", ROOT / "models"))
FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "qwen-0.5b": "qwen2.5-coder-0.5b-instruct.gguf"}

ap = argparse.ArgumentParser()
ap.add_argument("name", choices=sorted(FILES))
ap.add_argument("out")
ap.add_argument("--dtype", default="float32")
a = ap.parse_args()

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

dtype = getattr(torch, a.dtype)
tok = AutoTokenizer.from_pretrained(str(MODELS), gguf_file=FILES[a.name])
model = AutoModelForCausalLM.from_pretrained(str(MODELS), gguf_file=FILES[a.name], dtype=dtype)
# The weights are already dequantized; drop the GGUF quantizer marker so they save as plain
# tensors.
model.hf_quantizer = None
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(a.out, safe_serialization=True, max_shard_size="200MB")
tok.save_pretrained(a.out)
print("wrote", a.out)
