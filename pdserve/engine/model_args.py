"""Model shape read from a Hugging Face config.json (Llama, Qwen2, Mistral, Qwen3, Qwen3-MoE,
Mixtral); worker process. A config whose features the engine does not implement is rejected
here, naming the field, so a server fails at start instead of producing wrong tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.rope import rope_params_from_hf

DENSE_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
SUPPORTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")
# Families whose q/k/v/o projections have biases where config.json sets attention_bias;
# Qwen2 always has q/k/v biases and no o bias; Mistral and Mixtral never have any.
ATTENTION_BIAS_MODEL_TYPES = ("llama", "qwen3", "qwen3_moe")
# transformers' ACT2FN maps "swish" to SiLU too.
SUPPORTED_ACTIVATIONS = ("silu", "swish")
# Families whose MLP projections have biases where config.json sets mlp_bias (transformers
# builds the others' without any, whatever the config says).
MLP_BIAS_MODEL_TYPES = ("llama",)

# What transformers' config class for each family assumes for a field config.json omits
# (a field present as null keeps its null: transformers then derives it, as we do).
_DEFAULTS: dict[str, Any] = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    "mistral": {
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
    "mixtral": {
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen3_moe": {
        "max_position_embeddings": 32768,
        "num_key_value_heads": 4,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
}


@dataclass(frozen=True)
class MoeArgs:
    """Sparse MLP blocks: a softmax router picks `top_k` of `num_experts` SwiGLU experts."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    dense_layers: tuple[int, ...]  # layers with a plain MLP instead (Qwen3-MoE options)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    model_type: str = "llama"
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (Qwen3)
    moe: MoeArgs | None = None
    # a sliding window no sequence of max_position_embeddings outgrows (longer are refused)
    sliding_window: int | None = None
    # Which projections have biases, as transformers builds the family's layers: a bias the
    # checkpoint holds beyond these is ignored (transformers drops it), one missing refused.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # gate/up/down biases of the dense MLP (Llama's mlp_bias)

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any]) -> ModelArgs:
        model_type = _model_type(raw)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        cfg = {**_DEFAULTS, **_FAMILY_DEFAULTS[model_type], **_expert_count_named_once(raw)}
        _reject_unsupported(cfg, model_type)
        num_heads = cfg["num_attention_heads"]
        num_kv_heads = cfg.get("num_key_value_heads") or num_heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        _check_heads(num_heads, num_kv_heads, head_dim)
        theta, scaling = rope_params_from_hf(cfg)
        attention_bias = model_type in ATTENTION_BIAS_MODEL_TYPES and bool(
            cfg.get("attention_bias", False)
        )
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            qk_norm=model_type in QK_NORM_MODEL_TYPES,
            moe=_moe_args(cfg, model_type),
            sliding_window=_window_no_sequence_outgrows(cfg, model_type),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=model_type in MLP_BIAS_MODEL_TYPES and bool(cfg.get("mlp_bias", False)),
        )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers


# The transformers class each family's architectures entry names.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


def _model_type(raw: dict[str, Any]) -> str:
    """model_type, else the family its architectures name (a Qwen2 config without model_type
    read as Llama would lose its q/k/v biases), else llama where neither is given."""
    if raw.get("model_type"):
        return raw["model_type"]
    architectures = raw.get("architectures") or []
    families = {_ARCHITECTURES.get(name) for name in architectures}
    if len(families) == 1 and None not in families:
        return families.pop()
    if architectures:
        raise ValueError(
            f"config.json has no model_type and its architectures {architectures} name no "
            f"supported family; supported: {list(_ARCHITECTURES)}"
        )
    return "llama"


def _expert_count_named_once(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with its expert count as num_experts: transformers reads num_local_experts and
    num_experts as one field (and writes the former for Qwen3-MoE too), so a count under
    either name must override the family default under the other."""
    if raw.get("num_experts") or not raw.get("num_local_experts"):
        return raw
    return {**raw, "num_experts": raw["num_local_experts"]}


def _check_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
            f"({num_kv_heads})"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")


def _moe_args(cfg: dict[str, Any], model_type: str) -> MoeArgs | None:
    if model_type not in MOE_MODEL_TYPES:
        return None
    num_experts = cfg.get("num_experts") or 0
    top_k = cfg.get("num_experts_per_tok") or 0
    if not 0 < top_k <= num_experts:
        raise ValueError(
            f"num_experts_per_tok must be in 1..num_experts ({num_experts}), got {top_k}"
        )
    num_layers = cfg["num_hidden_layers"]
    if model_type == "mixtral":  # every layer sparse; top-k probabilities renormalised
        return MoeArgs(num_experts, top_k, cfg["intermediate_size"], True, ())
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"decoder_sparse_step must be an int >= 1, got {step!r}")
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step != 0)
    return MoeArgs(
        num_experts,
        top_k,
        cfg["moe_intermediate_size"],
        bool(cfg.get("norm_topk_prob", False)),
        dense,
    )


def _reject_unsupported(cfg: dict[str, Any], model_type: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {SUPPORTED_ACTIVATIONS}")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts (shared_expert_intermediate_size) are not supported")


def _sliding_window(cfg: dict[str, Any], model_type: str) -> tuple[int, str] | None:
    """The window some layer applies and the config fields that say so, or None."""
    window = cfg.get("sliding_window")
    if not window or model_type == "llama":
        return None
    if model_type in ("mistral", "mixtral"):  # always on in these families
        return window, f"sliding_window={window}"
    if not cfg.get("use_sliding_window"):  # Qwen: the window applies only with this flag
        return None
    if model_type == "qwen3_moe":  # every layer
        return window, f"use_sliding_window=true, sliding_window={window}"
    # Qwen2/Qwen3: layers from max_window_layers on, unless layer_types says otherwise
    first = cfg.get("max_window_layers", 28)
    num_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
    ]
    if "sliding_attention" not in layer_types:
        return None
    return window, f"use_sliding_window=true, sliding_window={window}, max_window_layers={first}"


def _window_no_sequence_outgrows(cfg: dict[str, Any], model_type: str) -> int | None:
    """The sliding window, refused where a sequence of max_position_embeddings outgrows it:
    attention here is always full. The engine refuses a longer --context-length."""
    windowed = _sliding_window(cfg, model_type)
    if windowed is None:
        return None
    window, fields = windowed
    max_positions = cfg["max_position_embeddings"]
    if window < max_positions:
        raise ValueError(
            f"sliding-window attention ({fields} < max_position_embeddings={max_positions}) "
            "is not supported"
        )
    return window
