"""pack_weights (nanojax/infer/arena.py): the same tree and values, on one 2 MiB-aligned mapping
advised for huge pages, and generate gives the same tokens from it."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanojax as nj
from nanojax.infer.arena import HUGE_PAGE, pack_weights

TINY_LLAMA = nj.ModelConfig.preset("llama-tiny", vocab_size=97, max_seq_len=64, init_std=0.2)


def _mapping_of(address: int) -> tuple[int, int, set[str]]:
    """(start, end, VmFlags) of this process's mapping that holds address (/proc/self/smaps)."""
    span = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            span = (int(m[1], 16), int(m[2], 16))
        elif line.startswith("VmFlags:") and span and span[0] <= address < span[1]:
            return span[0], span[1], set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture(scope="module")
def tiny():
    params = nj.init_params(TINY_LLAMA, jax.random.key(0))
    q = nj.quantize(params, TINY_LLAMA, "int8")
    return params, q


def test_every_leaf_keeps_its_value_and_lives_in_one_advised_arena(tiny):
    if not Path("/sys/kernel/mm/transparent_hugepage").exists():
        pytest.skip("this kernel has no transparent huge pages")
    params, q = tiny
    tree = {"float": params, "int8": q, "none": None, "host": np.arange(3), "key": jax.random.key(1),
            "bf16": params["wte"].astype(jnp.bfloat16)}
    packed = pack_weights(tree)
    assert jax.tree_util.tree_structure(packed) == jax.tree_util.tree_structure(tree)
    assert packed["host"] is tree["host"]  # not a jax array: left as it was
    assert packed["key"] is tree["key"]  # a PRNG key: left as it was
    before = jax.tree_util.tree_leaves([tree["float"], q, tree["bf16"]])
    after = jax.tree_util.tree_leaves([packed["float"], packed["int8"], packed["bf16"]])
    ptrs = []
    for a, b in zip(before, after, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        ptrs.append(b.unsafe_buffer_pointer())
        assert ptrs[-1] != a.unsafe_buffer_pointer()
        assert ptrs[-1] % 4096 == 0
    start, end, flags = _mapping_of(min(ptrs))
    assert "hg" in flags  # MADV_HUGEPAGE
    assert start % HUGE_PAGE == 0 and all(start <= p < end for p in ptrs)


def test_generate_reads_the_packed_weights_to_the_same_tokens(tiny):
    params, q = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    for p in (params, q):
        want = nj.generate(p, TINY_LLAMA, prompts, max_new_tokens=12)
        assert nj.generate(pack_weights(p), TINY_LLAMA, prompts, max_new_tokens=12) == want


def test_a_tree_with_nothing_to_pack_comes_back_as_is():
    tree = {"a": np.ones(4), "b": None, "c": jnp.zeros((0,))}
    assert pack_weights(tree) is tree
