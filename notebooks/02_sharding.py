# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sharding on 8 simulated devices
#
# XLA can pretend the CPU is 8 devices. That must be set before JAX starts, so it is the first
# thing this notebook does. Then: the same training step on several meshes (data, fsdp, tensor),
# where each parameter lives, and how much of the model each device holds.

# %%
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.sharding import put_batch  # noqa: E402
from nanojax.train import build, default_config, model_config_from  # noqa: E402

print(jax.device_count(), "devices:", jax.devices()[:2], "...")
assert jax.device_count() == 8

# %% [markdown]
# ## The same step on several meshes
# A training config names the mesh (`mesh.data`, `mesh.fsdp`, `mesh.tensor`); `build` makes the
# jitted step with shardings from the one rules table (logical axis -> mesh axis). Whatever the
# mesh, the step computes the same numbers.

# %%
config = default_config("shakespeare-char-cpu", vocab_size=65)
config.batch_size = 8
cfg = model_config_from(config)
rng = np.random.default_rng(0)
x = rng.integers(0, cfg.vocab_size, (1, 8, cfg.max_seq_len)).astype(np.int32)  # (A, B, T)
y = np.roll(x, -1, axis=-1)
meshes = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4)]
runs, losses = {}, {}
for data_, fsdp, tensor in meshes:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data_, fsdp, tensor
    run = build(config, cfg)
    params, opt_state = run.init_fn(jax.random.key(0))
    seq = []
    for step in range(3):
        params, opt_state, m = run.step_fn(params, opt_state, put_batch(x, run.batch_sharding),
                                           put_batch(y, run.batch_sharding), np.int32(step))
        seq.append(float(m["loss"]))
    runs[(data_, fsdp, tensor)] = (run, params, opt_state)
    losses[(data_, fsdp, tensor)] = seq
    # (the first two agree: warmup starts the learning rate at 0, so the first update is a no-op)
    print(f"data={data_} fsdp={fsdp} tensor={tensor}: losses {np.round(seq, 6)}")
base = np.array(losses[meshes[0]])
for k, v in losses.items():
    assert np.allclose(v, base, rtol=1e-5, atol=1e-5), (k, v)

# %% [markdown]
# ## Where each parameter lives
# Each array carries its `NamedSharding`: a `PartitionSpec` over the mesh axes. On the
# (data=2, fsdp=2, tensor=2) mesh: embeddings split over vocab, attention over heads, the MLP over
# its hidden width (tensor), and every weight's other dim over fsdp.

# %%
run, params, _ = runs[(2, 2, 2)]
axes = nj.param_axes(cfg)
for (path, leaf), ax in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(axes, is_leaf=lambda t: isinstance(t, tuple)), strict=True):
    name = jax.tree_util.keystr(path)
    if name.startswith("['layers']") and not name.startswith("['layers'][0]"):
        continue  # every layer is sharded alike
    shard = leaf.addressable_shards[0].data.shape
    print(f"{name:30s} {str(leaf.shape):14s} axes={ax} spec={leaf.sharding.spec} per device={shard}")
wq = params["layers"][0]["attn"]["wq"]
print("\nlayers[0].attn.wq, device -> slice held:")
for s in wq.addressable_shards:
    print(f"  {s.device}: {s.index}")

# %% [markdown]
# ## Per-device memory
# Bytes of params + Adam state each device holds, per mesh. Pure data parallelism replicates
# everything; fsdp and tensor divide it.

# %%
def bytes_per_device(tree) -> dict:
    out = {d: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "addressable_shards"):
            for s in leaf.addressable_shards:
                out[s.device] += s.data.nbytes
    return out


fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.2
for i, (mesh, (_, params, opt_state)) in enumerate(runs.items()):
    per = bytes_per_device((params, opt_state))
    ax.bar(np.arange(8) + i * width, [per[d] / 1e6 for d in jax.devices()], width, label=f"{mesh}")
    print(mesh, f"{max(per.values()) / 1e6:.2f} MB on the fullest device")
ax.set_xlabel("device")
ax.set_ylabel("params + optimizer state (MB)")
ax.legend(title="(data, fsdp, tensor)", fontsize=7)
plt.show()
