"""pdserve: LLM serving with prefill-decode disaggregation and data parallelism."""

__version__ = "0.1.0"
