"""worker-orcd: a GPU inference worker serving one GGUF model over HTTP.

Kept light on import: the server's dependencies load only from `worker_orcd.server`.
"""

__version__ = "0.1.0"
