"""HTTP serving: the worker API, the OpenAI-compatible API and /metrics (FastAPI + uvicorn).

Imported only by `worker-orcd serve` and tests, so `import worker_orcd` stays free of web dependencies.
"""

from worker_orcd.server.app import create_app
from worker_orcd.server.run import serve
from worker_orcd.server.worker import ServeConfig, Worker

__all__ = ["ServeConfig", "Worker", "create_app", "serve"]
