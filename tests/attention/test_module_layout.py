"""Old import paths keep working after the split of ``hsr.attention.power``."""

import importlib
import pickle

import pytest

import hsr.attention as attention
import hsr.attention.power as power

# every public name the single ``power`` module had, and the module that owns it now
MOVED = {
    "Pattern": "patterns",
    "PowerPattern": "patterns",
    "SlidingWindowPattern": "patterns",
    "StrideSlashPattern": "patterns",
    "DilatedPattern": "patterns",
    "LongNetPattern": "patterns",
    "FullPattern": "patterns",
    "power_pattern": "patterns",
    "sliding_window_pattern": "patterns",
    "stride_slash_pattern": "patterns",
    "dilated_pattern": "patterns",
    "longnet_pattern": "patterns",
    "full_pattern": "patterns",
    "matched_baselines": "baselines",
    "BlockLists": "blocks",
    "kernel_block_lists": "blocks",
    "to_block_mask": "flex",
    "power_attention": "power",
}


@pytest.mark.parametrize("name,home", sorted(MOVED.items()))
def test_power_names_still_importable(name, home):
    new = getattr(importlib.import_module(f"hsr.attention.{home}"), name)
    assert getattr(power, name) is new
    assert getattr(attention, name) is new
    assert name in power.__all__


def test_power_all_unchanged():
    assert sorted(power.__all__) == sorted(MOVED)


def test_private_helpers_still_reachable_from_power():
    # not public, but they were module globals of ``power``; keep them resolvable
    for name in ("_is_pow2", "_check_pos_int", "_window_sink_candidates", "_mean_kept",
                 "_device_block_lists", "_as_tensor", "_power_attention_cpu"):
        assert callable(getattr(power, name))


def test_pattern_pickles_and_block_lists_agree():
    p = power.power_pattern(block_size=16, window=2, sink=1)
    q = pickle.loads(pickle.dumps(p))
    assert q == p
    a, b = p.block_lists(200, 37), q.block_lists(200, 37)
    assert (a.kv_indices == b.kv_indices).all() and (a.kv_num_blocks == b.kv_num_blocks).all()


def test_importing_hsr_does_not_import_torch():
    """torch takes ~1 s to import: hsr imports it only when a torch path runs."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, hsr; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
