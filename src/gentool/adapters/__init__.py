"""LoRA adapters: PEFT's format in and out (peft), fine-tuning with train-lm (finetune), merging (merge: what
combine.py checks and combines by the methods of methods.py), extraction and resizing (extract), llama.cpp's GGUF
adapters (gguf_lora)."""

from gentool.adapters.finetune import adapter_contents, lora_config_from_options, prepare_lora, save_lora
from gentool.adapters.merge import merge_checkpoint, merge_tensors, parse_adapter_arg
from gentool.adapters.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, Adapter, Base, apply_adapter,
                                   attach_adapter, check_adapter, config_from_peft, config_to_peft, read_adapter,
                                   read_base, write_adapter)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "Adapter", "Base", "adapter_contents",
           "apply_adapter", "attach_adapter", "check_adapter", "config_from_peft", "config_to_peft",
           "lora_config_from_options", "merge_checkpoint", "merge_tensors", "parse_adapter_arg", "prepare_lora",
           "read_adapter", "read_base", "save_lora", "write_adapter"]
