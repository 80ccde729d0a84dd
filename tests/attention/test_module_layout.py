"""Each PowerAttention name lives in one module of ``hsr.attention`` and is exported by the
package; ``hsr.attention.power`` holds ``power_attention`` only (no re-exports)."""

import importlib
import pickle

import pytest

import hsr.attention as attention
import hsr.attention.power as power

# every public pattern name and the module that owns it
HOME = {
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
    "kernel_block_lists": "patterns",
    "to_block_mask": "flex",
    "power_attention": "power",
}


@pytest.mark.parametrize("name,home", sorted(HOME.items()))
def test_pattern_names_live_in_one_module(name, home):
    obj = getattr(importlib.import_module(f"hsr.attention.{home}"), name)
    assert getattr(attention, name) is obj
    assert name in attention.__all__
    assert getattr(obj, "__module__", f"hsr.attention.{home}") == f"hsr.attention.{home}"


def test_power_exports_power_attention_only():
    assert power.__all__ == ["power_attention"]


def test_pattern_pickles_and_block_lists_agree():
    p = attention.power_pattern(block_size=16, window=2, sink=1)
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
