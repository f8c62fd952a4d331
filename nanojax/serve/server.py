"""Running the app under uvicorn with a clean Ctrl-C: drain, then cancel, then exit 0.

    serve(app, engine, host="127.0.0.1", port=8000, drain_timeout=30.0)   # blocks until stopped

On the first SIGINT or SIGTERM, uvicorn closes its listening socket and waits for open responses;
here the engine is told at the same moment to take no new requests and finish the running and
queued ones (engine.shutdown(drain=True)). If they are not done within drain_timeout seconds, the
engine cancels them (drain=False), so their streams end properly with finish_reason "abort" and
`data: [DONE]` instead of a cut connection; uvicorn's own graceful-shutdown limit stays as a
backstop a little later. A second Ctrl-C forces uvicorn to exit at once.

uvicorn re-raises a signal it handled once it is done (so a plain `uvicorn.run` ends with a
KeyboardInterrupt traceback, or SIGTERM's exit status); serve() treats the stop the user asked
for as a normal return.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import uvicorn


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, engine: Any, drain_timeout: float):
        super().__init__(config)
        self.app, self.engine, self.drain_timeout = app, engine, drain_timeout
        self.drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drainer is None:  # the first signal starts the drain; a second one forces the exit
            state = getattr(getattr(self.app, "state", None), "server", None)
            if state is not None:
                state.draining = True  # /health answers 503 on connections still open
            self.drainer = threading.Thread(target=self._drain, name="nanojax-drain", daemon=True)
            self.drainer.start()
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        self.engine.shutdown(drain=True, timeout=self.drain_timeout)  # returns when done or timed out
        self.engine.shutdown(drain=False, timeout=10.0)  # what is left ends as "cancelled"


class _Stopped(Exception):
    """Raised by our SIGTERM handler when uvicorn re-raises the signal after its shutdown."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def serve(app: Any, engine: Any, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
          log_level: str = "warning") -> None:
    """Starts `engine`, serves `app` (made with create_app(..., manage_engine=False)) until SIGINT
    or SIGTERM, drains as the module docstring says, and returns. Call from the main thread."""
    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 15.0)
    server = _DrainingServer(config, app, engine, drain_timeout)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        pass  # the stop the user asked for: uvicorn re-raised it after shutting down
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.shutdown(drain=False, timeout=10.0)  # nothing should be left; make sure
