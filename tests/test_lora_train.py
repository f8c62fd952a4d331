"""LoRA fine-tuning end to end on Tiny Shakespeare ($NANOJAX_TEST_TEXT).

A tiny GPT-2-style base is trained on the first half of the text; a LoRA adapter is then
fine-tuned on the second half with the base frozen. The adapter must lower the second half's
val loss (measured against the base on the same batches, computed here from the base params), the
printed and logged trainable count must be the closed-form r * (I + O) sum, the checkpoints hold
the adapter only, the base comes back bitwise, an interrupted run resumes to the same losses,
and a changed base is refused on resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from conftest import cpu_config

import nanojax as nj
from nanojax import data
from nanojax.lora import LoraError
from nanojax.metrics import MetricsWriter, read_metrics
from nanojax.tokenizer import CharTokenizer
from nanojax.train import train
from nanojax.train.loop import WorkdirMismatchError
from nanojax.train.lora_run import load_lora_workdir
from nanojax.train.step import loss_fn

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("compile_cache")

MODEL = {"model.n_layer": 2, "model.n_head": 4, "model.d_model": 64, "model.max_seq_len": 32}
BASE = {**MODEL, "batch_size": 8, "max_steps": 300, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
        "eval_every": 300, "eval_iters": 16, "ckpt_every": 300, "seed": 3, "eval_full_at_end": False}
RANK = 8
LORA = {**BASE, "max_steps": 150, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 5, "eval_every": 150,
        "ckpt_every": 50, "weight_decay": 0.0, "lora.rank": RANK, "lora.targets": "c_attn,c_proj,c_fc",
        "lora.alpha": 16.0, "lora.dropout": 0.05}


@pytest.fixture(scope="module")
def halves(shakespeare_text, tmp_path_factory):
    """(first-half data, second-half data, base workdir trained on the first half)."""
    root = tmp_path_factory.mktemp("halves")
    tok = CharTokenizer.from_text(shakespeare_text)  # one vocabulary for both halves
    mid = len(shakespeare_text) // 2
    data.prepare(shakespeare_text[:mid], tok, root / "first")
    data.prepare(shakespeare_text[mid:], tok, root / "second")
    base = root / "base"
    train(cpu_config(root / "first", BASE), base, progress=False)
    return root / "first", root / "second", base


@pytest.fixture(scope="module")
def tuned(halves, tmp_path_factory):
    """The LoRA run on the second half, uninterrupted: (config, workdir, summary, printed output)."""
    import contextlib
    import io

    _, second, base_dir = halves
    config = cpu_config(second, {**LORA, "lora.base": str(base_dir)})
    workdir = tmp_path_factory.mktemp("tuned") / "ft"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(config, workdir, progress=False)
    return config, workdir, summary, out.getvalue()


def _val_loss(params, cfg, data_dir, config, lora=None):
    """The loop's `val_loss`: the mean over eval_iters fixed val batches (seed + 1, steps 0..)."""
    val = data.load_split(data_dir, "val", cfg.max_seq_len, cfg.vocab_size)
    loss = jax.jit(lambda p, x, y, a: loss_fn(p, x, y, cfg, lora=a))
    losses = []
    for i in range(config.eval_iters):
        x, y = data.get_batch(val, cfg.max_seq_len, config.batch_size, config.seed + 1, i, 1)
        losses.append(float(loss(params, x[0], y[0], lora)))
    return float(np.mean(losses))


def _losses(workdir):
    return {r["step"]: r["train_loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")
            if "grad_norm" in r}


def test_lora_fine_tune_lowers_val_loss_and_leaves_the_base(halves, tuned):
    _, second, base_dir = halves
    config, workdir, summary, printed = tuned
    cfg, base, _ = nj.load_checkpoint(base_dir)
    before = _val_loss(base, cfg, second, config)

    # the count: GPT-2's c_attn (D -> 3D), both c_proj (D -> D, F -> D) and c_fc (D -> F) per layer
    D, F, L = cfg.d_model, cfg.ff_dim, cfg.n_layer
    want = L * RANK * ((D + 3 * D) + (D + D) + (F + D) + (D + F))
    assert summary["trainable_params"] == want
    assert f"LoRA: {want:,} trainable params" in printed
    logged = [r for r in read_metrics(workdir / "metrics.jsonl") if "trainable_params" in r]
    assert logged == [{"step": 0, "trainable_params": want,
                       "frozen_params": sum(x.size for x in jax.tree.leaves(base))}]

    # the adapter learned the second half; the base comes back bitwise
    cfg2, base2, adapter, _ = load_lora_workdir(workdir)
    assert cfg2 == cfg and adapter.targets == ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
    for x, y in zip(jax.tree.leaves(base2), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    after = _val_loss(base, cfg, second, config, lora=adapter)
    assert after == pytest.approx(summary["val_loss"], abs=1e-4)  # what the loop measured
    assert after < before - 0.01, (before, after)  # measured: 2.420 -> 2.385 nats


def test_lora_run_resumes_exactly_and_refuses_another_base(halves, tuned, tmp_path, monkeypatch):
    first, _, base_dir = halves
    config, workdir, _, _ = tuned
    write = MetricsWriter.write

    def write_then_signal(self, rec):
        write(self, rec)
        if rec.get("step") == 70 and "grad_norm" in rec:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsWriter, "write", write_then_signal)
    assert train(config, tmp_path / "cut", progress=False)["interrupted"] == signal.SIGINT
    monkeypatch.undo()
    resumed = train(config, tmp_path / "cut", progress=False)
    assert 0 < resumed["start_step"] < 150  # saved on the signal, mid-run
    assert _losses(tmp_path / "cut") == _losses(workdir)

    # another base (the same model config, other weights) is refused, naming both fingerprints
    ref = json.loads((workdir / "config.json").read_text())["lora_base"]
    train(cpu_config(first, {**BASE, "seed": 4, "max_steps": 2, "ckpt_every": 2, "eval_every": 2}),
          tmp_path / "other_base", progress=False)
    config = ml_collections.ConfigDict(config.to_dict())
    config.lora.base = str(tmp_path / "other_base")
    with pytest.raises(LoraError, match=f"fingerprint {ref['fingerprint']}.*the base changed"):
        train(config, tmp_path / "cut", progress=False)
    # a full-model run's workdir is not resumed as LoRA
    with pytest.raises(WorkdirMismatchError, match="holds a full-model run"):
        train(config, base_dir, progress=False)


def test_trained_adapter_exports_to_peft_and_samples(halves, tuned, tmp_path, compile_cache):
    """scripts/export_lora.py writes the trained adapter as PEFT; peft loads it over the base
    (exported with save_hf) and gives nanojax's logits; sample.py --lora greedy-decodes what
    nj.generate(lora=) does."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _, _, base_dir = halves
    _, workdir, _, _ = tuned
    env = dict(os.environ, JAX_PLATFORMS="cpu", **compile_cache)
    subprocess.run([sys.executable, str(REPO / "scripts/export_lora.py"), f"--workdir={workdir}",
                    f"--out_dir={tmp_path / 'peft'}"], check=True, env=env, capture_output=True)
    cfg, base, adapter, tok = load_lora_workdir(workdir)
    nj.save_hf(base, cfg, tmp_path / "base_hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf",
                                                              attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    tokens = np.asarray([tok.encode("ROMEO:\nWhat say you, my lord?")], np.int32)
    with torch.no_grad():
        want = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(nj.forward(base, tokens, cfg, lora=adapter))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - np.asarray(nj.forward(base, tokens, cfg))).max() > 1e-2  # a real change

    out = subprocess.run([sys.executable, str(REPO / "scripts/sample.py"), f"--lora={workdir}",
                          "--prompt=ROMEO:", "--max_new_tokens=20", "--temperature=0", "--nostream"],
                         check=True, env=env, capture_output=True, text=True).stdout
    ids = nj.generate(base, cfg, [tok.encode("ROMEO:")], max_new_tokens=20, lora=adapter)[0]
    assert out.rstrip("\n") == "ROMEO:" + tok.decode(ids)


def test_qlora_int4_base_trains_and_tracks_the_fp32_base_run(halves, tuned, tmp_path):
    """--config.lora.quantize=int4: the same fine-tune over the base held in int4 (group 32). Its
    val loss lands near the fp32-base run's and below the base's own; the run's base is records."""
    _, second, base_dir = halves
    config, _, summary, _ = tuned
    qconfig = ml_collections.ConfigDict(config.to_dict())
    qconfig.lora.quantize = "int4"
    q = train(qconfig, tmp_path / "qlora", progress=False)
    cfg, base, _ = nj.load_checkpoint(base_dir)
    before = _val_loss(base, cfg, second, config)
    assert q["val_loss"] < before - 0.01, (before, q["val_loss"])
    assert abs(q["val_loss"] - summary["val_loss"]) < 0.03, (q["val_loss"], summary["val_loss"])
    _, qbase, adapter, _ = load_lora_workdir(tmp_path / "qlora")
    assert isinstance(qbase["layers"][0]["attn"]["wq"], nj.dense.Weight)
    assert q["val_loss"] == pytest.approx(_val_loss(qbase, cfg, second, config, lora=adapter), abs=1e-4)
