"""The dtype names ``from_pretrained(dtype=...)`` and ``--dtype`` take, as the torch dtype each names; here,
apart from ``checkpoint`` (which maps them to torch's dtypes), so the CLI lists them without importing torch."""

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
