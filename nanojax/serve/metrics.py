"""engine.stats() as Prometheus' text exposition format (version 0.0.4):

    # HELP nanojax_queue_length Requests waiting for a decode slot.
    # TYPE nanojax_queue_length gauge
    nanojax_queue_length 0

Known keys get a stable metric name, type and help line; any other numeric key the engine adds is
exported as a gauge `nanojax_<key>`, so new engine stats show up without a change here; a dict of
numbers becomes one metric with a `key` label.
Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (counters end in _total).
"""

from __future__ import annotations

import math
import re
from typing import Any

# stats key -> (metric name, type, help)
KNOWN = {
    "queue_len": ("nanojax_queue_length", "gauge", "Requests waiting for a decode slot."),
    "active_slots": ("nanojax_active_slots", "gauge", "Decode slots holding a request now."),
    "slots": ("nanojax_slots", "gauge", "Decode slots in the engine."),
    "batch_occupancy": ("nanojax_batch_occupancy", "gauge",
                        "Mean fraction of slots active over recent decode chunks (0..1)."),
    "tokens_per_s": ("nanojax_tokens_per_second", "gauge", "Generated tokens per second, recent."),
    "tokens_total": ("nanojax_generated_tokens_total", "counter", "Tokens generated since start."),
    "requests_total": ("nanojax_requests_total", "counter", "Requests submitted since start."),
    "requests_running": ("nanojax_requests_running", "gauge", "Requests admitted and not yet finished."),
    "prefix_hits": ("nanojax_prefix_cache_hits_total", "counter",
                    "Requests whose prompt reused cached prefix KV."),
    "prefix_tokens_reused": ("nanojax_prefix_cache_tokens_reused_total", "counter",
                             "Prompt tokens whose KV came from the prefix cache instead of prefill."),
    "executables": ("nanojax_executables", "gauge", "Compiled device programs so far."),
    "executables_by_fn": ("nanojax_executables_by_fn", "gauge", "Compiled device programs per function."),
    "prefill_tokens": ("nanojax_prefill_tokens_total", "counter", "Prompt tokens prefilled (not reused)."),
    "requests_finished": ("nanojax_requests_finished_total", "counter", "Requests finished, any reason."),
    "errors": ("nanojax_engine_errors_total", "counter", "Device calls that failed (their requests end)."),
    "prefix_cache_blocks": ("nanojax_prefix_cache_blocks", "gauge", "Token blocks held by the prefix cache."),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def prometheus_text(stats: dict[str, Any]) -> str:
    """One HELP, TYPE and sample line per numeric stat; non-numeric stats are skipped."""
    lines = []
    for key, value in stats.items():
        # a dict of numbers is one metric with a label: nanojax_executables_by_fn{key="prefill"} 3
        items = ([(f'{{key="{k}"}}', _number(v)) for k, v in value.items()] if isinstance(value, dict)
                 else [("", _number(value))])
        items = [(label, v) for label, v in items if v is not None]
        if not items:
            continue
        name, kind, doc = KNOWN.get(key, (f"nanojax_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}", "gauge",
                                          f"Engine stat {key!r}."))
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for label, v in items:
            shown = int(v) if v.is_integer() else v  # counters print as integers, not 1.2e+06
            lines.append(f"{name}{label} {shown!r}")
    return "\n".join(lines) + "\n"
