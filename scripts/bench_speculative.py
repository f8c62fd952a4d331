"""Speculative decoding on CPU: a small draft model against a larger target, and prompt lookup.

    python scripts/bench_speculative.py --target_workdir=/tmp/spec_models/target \\
        --draft_workdir=/tmp/spec_models/draft --ks=2,3,4,6 --max_new_tokens=200

Both workdirs are training workdirs (scripts/train.py) over the same character vocabulary.
For every k in --ks, greedy `nj.generate` at batch --batch runs plain and speculative side by
side in one process (alternating, --repeats times); the speculative tokens must equal the plain
ones (the script fails otherwise). Columns: tok/s (new tokens / median wall time, prefill
included), speedup over plain (of the medians; and fastest call over fastest call, which a
loaded machine disturbs less), acceptance rate (accepted / proposed draft tokens), tokens per
target call (new tokens / (verify forwards + 1 prefill)). Then prompt lookup (no draft model)
on a repetitive prompt (--lookup_prompt, by default a passage given twice and begun a third
time); its new tokens are capped so that prompt + new tokens fit the target's context.

Profile (--profile): ms per call of the pieces of one iteration, each timed as 64 calls inside
one jitted fori_loop at the bench's cache window: a target step of 1 token (plain decode), a
target verify of k+1 tokens, a draft step of 1 token. The ideal speedup is then
tokens_per_call x t_target1 / (k x t_draft1 + t_verify(k+1)).
"""

import json
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
from _bench_speculative import step_runner  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.infer import engine  # noqa: E402
from nanojax.metrics import cpu_description  # noqa: E402

flags.DEFINE_string("target_workdir", None, "The target model's training workdir.", required=True)
flags.DEFINE_string("draft_workdir", None, "The draft model's training workdir (same vocabulary).")
flags.DEFINE_list("ks", ["2", "3", "4", "6"], "num_speculative_tokens values to time.")
flags.DEFINE_integer("max_new_tokens", 200, "New tokens per call.")
flags.DEFINE_integer("batch", 1, "Rows per call (copies of the prompt).")
flags.DEFINE_integer("repeats", 5, "Timed calls per cell (median).")
flags.DEFINE_string("prompt", "ROMEO:\nWhat say you, my lord? ", "Prompt for the draft-model rows.")
flags.DEFINE_string("lookup_prompt", None, "Prompt for prompt lookup (default: a repeated passage).")
flags.DEFINE_integer("lookup_ngram", 3, "prompt_lookup_ngram.")
flags.DEFINE_boolean("profile", True, "Also time the pieces of one iteration.")
flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")
FLAGS = flags.FLAGS

_PASSAGE = "First Citizen:\nLet us kill him.\n\nAll:\nWe know't, we know't.\n\n"


def _side_by_side(plain_fn, spec_fn, repeats):
    """Alternating calls after one warm-up each: (plain times, spec times, plain out, spec out)."""
    p_out, s_out = plain_fn(), spec_fn()
    pt, st = [], []
    for _ in range(repeats):
        for fn, acc in ((plain_fn, pt), (spec_fn, st)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return pt, st, p_out, s_out


def _step_ms(params, cfg, T, window, B, calls=64):
    """ms per `speculative._step` of T tokens at batch B over a `window`-slot cache (best of 3
    calls of `calls` steps)."""
    run, args = step_runner(params, cfg, T, window, calls, batch=B)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / calls


def main(argv):
    del argv
    cfg, params, tok = nj.load_checkpoint(FLAGS.target_workdir)
    draft = None
    if FLAGS.draft_workdir:
        dcfg, dparams, dtok = nj.load_checkpoint(FLAGS.draft_workdir)
        draft = (dparams, dcfg)
        if dtok.encode(_PASSAGE) != tok.encode(_PASSAGE):
            raise app.UsageError("the two workdirs' tokenizers differ; the draft must share the target's")
    n, B, ks = FLAGS.max_new_tokens, FLAGS.batch, [int(k) for k in FLAGS.ks]
    print(f"# CPU: {cpu_description()}; jax {jax.__version__}")
    print(f"# target {FLAGS.target_workdir}: {cfg.n_layer} layers, d_model {cfg.d_model}, "
          f"{cfg.num_params() / 1e6:.2f}M params")
    if draft:
        print(f"# draft {FLAGS.draft_workdir}: {dcfg.n_layer} layers, d_model {dcfg.d_model}, "
              f"{dcfg.num_params() / 1e6:.2f}M params")
    print(f"# greedy, batch {B}, {n} new tokens, median of {FLAGS.repeats}")
    rows = []

    def bench(label, prompt, **kw):
        prompts = [tok.encode(prompt)] * B
        n = min(FLAGS.max_new_tokens, cfg.max_seq_len - len(prompts[0]))  # within the context
        stats: dict = {}

        def plain():
            return nj.generate(params, cfg, prompts, max_new_tokens=n)

        def spec():
            stats.clear()
            return nj.generate(params, cfg, prompts, max_new_tokens=n, stats=stats, **kw)

        pt, st, p_out, s_out = _side_by_side(plain, spec, FLAGS.repeats)
        if p_out != s_out:
            raise SystemExit(f"{label}: speculative greedy tokens differ from plain decoding")
        new = sum(len(o) for o in s_out)
        row = {"label": label, "k": kw["num_speculative_tokens"], "new_tokens": n,
               "plain_tok_s": new / statistics.median(pt),
               "spec_tok_s": new / statistics.median(st), "acceptance_rate": stats["acceptance_rate"],
               "tokens_per_call": new / B / (stats["calls"] + 1), "same_tokens": True}
        row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
        row["speedup_best"] = min(pt) / min(st)  # fastest call vs fastest call: less sensitive to load
        rows.append(row)
        print(f"| {label:<14} | {row['k']} | {n} | {row['plain_tok_s']:7.1f} | {row['spec_tok_s']:7.1f} | "
              f"{row['speedup']:.2f}x | {row['speedup_best']:.2f}x | {row['acceptance_rate']:.2f} | "
              f"{row['tokens_per_call']:.2f} |", flush=True)

    print("| drafter | k | new tokens | plain tok/s | spec tok/s | speedup (median) | speedup (best) | "
          "acceptance | tokens/target call |")
    print("|---|---|---|---|---|---|---|---|---|")
    if draft:
        for k in ks:
            bench("draft model", FLAGS.prompt, draft=draft, num_speculative_tokens=k)
    lookup = FLAGS.lookup_prompt or (_PASSAGE * 2 + _PASSAGE[:20])
    for k in ks:
        bench("prompt lookup", lookup, draft="prompt_lookup", num_speculative_tokens=k,
              prompt_lookup_ngram=FLAGS.lookup_ngram)

    prof = {}
    if FLAGS.profile:
        P = engine._next_pow2(len(tok.encode(FLAGS.prompt)))
        window = engine._next_pow2(P + n + max(ks) + 1)
        prof["target_1"] = _step_ms(params, cfg, 1, window, B)
        print(f"\n# profile, ms per call at a {window}-slot cache, batch {B} (64 calls in one jit):")
        print(f"target step, 1 token: {prof['target_1']:.3f}")
        for k in ks:
            prof[f"target_{k + 1}"] = _step_ms(params, cfg, k + 1, window, B)
            print(f"target verify, {k + 1} tokens: {prof[f'target_{k + 1}']:.3f}")
        if draft:
            prof["draft_1"] = _step_ms(dparams, dcfg, 1, window, B)
            print(f"draft step, 1 token: {prof['draft_1']:.3f}")
            for r in rows:
                if r["label"] == "draft model":
                    k = r["k"]
                    per_iter = k * prof["draft_1"] + prof[f"target_{k + 1}"]
                    ideal = r["tokens_per_call"] * prof["target_1"] / per_iter
                    print(f"k={k}: ideal speedup from these pieces {ideal:.2f}x "
                          f"(measured {r['speedup']:.2f}x)")
    if FLAGS.json_out:
        result = {"cpu": cpu_description(), "rows": rows, "profile_ms": prof}
        Path(FLAGS.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
