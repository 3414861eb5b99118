"""The linear merge of LoRA adapters into the base, streamed tensor by tensor."""
