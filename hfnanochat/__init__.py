"""hfnanochat: nanochat's ChatGPT-style pipeline as a Hugging Face citizen.

Importing the package registers the model with transformers' Auto classes (in-process) and marks the classes for
`register_for_auto_class`, so `save_pretrained` writes `auto_map` plus the code next to the weights and a fresh
process loads the folder with `trust_remote_code=True` without importing hfnanochat.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hfnanochat import HFNanoChatConfig, config_for_depth
from .modeling_hfnanochat import HFNanoChatForCausalLM, HFNanoChatModel, HFNanoChatPreTrainedModel

AutoConfig.register(HFNanoChatConfig.model_type, HFNanoChatConfig, exist_ok=True)
AutoModel.register(HFNanoChatConfig, HFNanoChatModel, exist_ok=True)
AutoModelForCausalLM.register(HFNanoChatConfig, HFNanoChatForCausalLM, exist_ok=True)
HFNanoChatConfig.register_for_auto_class()
HFNanoChatModel.register_for_auto_class("AutoModel")
HFNanoChatForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "HFNanoChatConfig",
    "HFNanoChatForCausalLM",
    "HFNanoChatModel",
    "HFNanoChatPreTrainedModel",
    "config_for_depth",
]
