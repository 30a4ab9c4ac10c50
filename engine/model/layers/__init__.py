"""The model's building blocks: Linear (with a LinearMethod), RMSNorm, rotary tables, the attention layer."""
