"""The OpenAI-compatible HTTP server: request schemas (schemas.py), chat templates (chat.py), error
bodies (errors.py), Prometheus metrics (metrics.py), the app (app.py) and model loading shared with
scripts/sample.py (load.py). `python scripts/serve.py --workdir=out/x` runs it; docs/serving.md."""

from nanojax.serve.app import create_app
from nanojax.serve.chat import ChatTemplate

__all__ = ["create_app", "ChatTemplate"]
