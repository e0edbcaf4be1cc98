"""``toy_moe``: a made-up mixture-of-experts language model, small enough for tests.

Each layer is a pre-norm residual block routing every token to ``num_experts_per_tok`` of
``num_experts`` experts.  The experts keep their weights fused, the way this family's
checkpoints store them: ``w_in [E, H, 2I]`` input-major with the up half before the gate
half, and ``w_out [E, I, H]``.  Importing this module registers the config and models with
transformers' Auto classes under the model type ``toy_moe``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

__all__ = ["ToyMoeConfig", "ToyMoeExperts", "ToyMoeForCausalLM", "ToyMoeModel"]


class ToyMoeConfig(PretrainedConfig):
    """Sizes of a ``toy_moe`` model (the defaults are already tiny)."""

    model_type = "toy_moe"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 32,
        moe_intermediate_size: int = 16,
        num_hidden_layers: int = 2,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class ToyMoeExperts(nn.Module):
    """All experts of one layer in two fused tensors (no transformers decorator)."""

    def __init__(self, config: ToyMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.w_in = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, 2 * config.moe_intermediate_size))
        self.w_out = nn.Parameter(torch.empty(config.num_experts, config.moe_intermediate_size, config.hidden_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            up, gate = (hidden_states[token] @ self.w_in[expert]).chunk(2, dim=-1)
            result = (self.act_fn(gate) * up) @ self.w_out[expert]
            output.index_add_(0, token, result * top_k_weights[token, slot, None])
        return output


class ToyMoeBlock(nn.Module):
    """Pre-norm residual block: a softmax top-k router and the experts."""

    def __init__(self, config: ToyMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = ToyMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = self.norm(hidden_states).reshape(-1, shape[-1])
        probabilities = self.router(tokens).softmax(dim=-1)
        weights, index = probabilities.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return hidden_states + self.experts(tokens, index, weights).reshape(shape)


class ToyMoePreTrainedModel(PreTrainedModel):
    """Weight initialisation and the config class shared by the toy models."""

    config_class = ToyMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["ToyMoeBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ToyMoeExperts):
            with torch.no_grad():
                module.w_in.normal_(0.0, self.config.initializer_range)
                module.w_out.normal_(0.0, self.config.initializer_range)


class ToyMoeModel(ToyMoePreTrainedModel):
    """Embeddings, ``num_hidden_layers`` MoE blocks, a final norm."""

    def __init__(self, config: ToyMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ToyMoeBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class ToyMoeForCausalLM(ToyMoePreTrainedModel):
    """:class:`ToyMoeModel` with a language-model head."""

    def __init__(self, config: ToyMoeConfig):
        super().__init__(config)
        self.model = ToyMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        hidden_states = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden_states))


AutoConfig.register(ToyMoeConfig.model_type, ToyMoeConfig, exist_ok=True)
AutoModel.register(ToyMoeConfig, ToyMoeModel, exist_ok=True)
AutoModelForCausalLM.register(ToyMoeConfig, ToyMoeForCausalLM, exist_ok=True)
