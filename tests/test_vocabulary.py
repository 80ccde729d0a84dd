"""docs/design.md's "One vocabulary" table agrees with the code's signatures.

The table is read, not copied: each test takes the names and defaults a row states and checks
them against the public API with ``inspect``, so a rename, a new default or a dropped method
fails here until the table (or the code) follows. A failure names the row and what differs.
"""
import ast
import importlib
import importlib.util
import inspect
import pathlib
import re
import typing

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

pytest.importorskip("torch")
pytest.importorskip("triton")  # the table names the Triton kernels' functions and classes

#: where the table's bare names live (the public namespaces, searched in this order)
NAMESPACES = ["hsr", "hsr.index", "hsr.attention", "hsr.kernels", "hsr.integrations.transformers"]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _table() -> dict[str, tuple[str, str]]:
    """``concept -> (name, notes)`` of the section's table, cells as written (pipes escaped
    as ``\\|`` stay in their cell)."""
    text = DESIGN.read_text()
    start = text.index("## One vocabulary")
    end = text.find("\n#", start + 1)
    rows = {}
    for line in text[start:end if end >= 0 else None].splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3 and cells[0] != "concept":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


TABLE = _table()


def _row(concept: str) -> tuple[str, str]:
    assert concept in TABLE, f"docs/design.md's vocabulary table has no row {concept!r} (rows: {sorted(TABLE)})"
    return TABLE[concept]


def _resolve(name: str):
    """The public object a table name means: ``hsr_attention``, ``CodeKVCache.run``..."""
    head, *rest = name.split(".")
    for ns in NAMESPACES:
        if ns.endswith("transformers") and not HAS_TRANSFORMERS:
            continue
        mod = importlib.import_module(ns)
        if head in getattr(mod, "__all__", ()):
            obj = getattr(mod, head)
            for part in rest:
                assert hasattr(obj, part), f"the table names {name}, but {head} has no {part!r}"
                obj = getattr(obj, part)
            return obj
    raise AssertionError(f"the table names {name!r}, which no public namespace exports ({NAMESPACES})")


def _ticked(text: str) -> list[str]:
    """The backticked names (identifiers, dotted) in a cell, in order."""
    return re.findall(r"`([A-Za-z_][\w.]*)`", text)


def _classes(text: str) -> list[type]:
    """The backticked names of a cell that are public classes."""
    out = []
    for name in _ticked(text):
        if name[:1].isupper() and "." not in name:
            try:
                obj = _resolve(name)
            except AssertionError:
                continue
            if inspect.isclass(obj):
                out.append(obj)
    return out


def _small_instance(cls):
    """A tiny instance of an index class (attributes set in ``__init__`` count), built from
    CPU keys; the class itself where that cannot be built here (a GPU-only class)."""
    import numpy as np

    keys = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    try:
        return cls(keys)
    except Exception:
        return cls


def _param(fn, name: str) -> inspect.Parameter:
    sig = inspect.signature(fn)
    assert name in sig.parameters, f"{fn.__qualname__}{sig} has no parameter {name!r}"
    return sig.parameters[name]


# ----------------------------------------------------------------------------- searching


def test_range_search_on_every_index_the_row_names():
    name, notes = _row("all keys with `score >= τ`, per query")
    assert "range_search(Q, tau)" in name and "RangeResult(lims, D, I)" in name
    classes = _classes(notes)
    assert {c.__name__ for c in classes} >= {"HSRIndex", "GPUCodeIndex", "GPUBlockIndex"}, notes
    for cls in classes:
        if cls.__name__ == "RangeResult":
            continue
        assert callable(getattr(cls, "range_search", None)), f"{cls.__name__} has no range_search"
        params = list(inspect.signature(cls.range_search).parameters)[1:3]
        assert len(params) == 2, f"{cls.__name__}.range_search takes (queries, tau): {params}"
    from hsr import RangeResult
    assert RangeResult._fields == ("lims", "D", "I")
    assert callable(RangeResult.to_csr)


def test_search_and_topk_on_the_indexes_the_row_names():
    name, notes = _row("the k best keys")
    assert "search(Q, k)" in name and "topk(Q, k)" in name and "SearchResult(D, I)" in name
    named = [c for c in _classes(notes) if c.__name__ != "SearchResult"]
    assert named, f"the row names no index: {notes}"
    for cls in named:
        if cls.__name__ == "GPUBlockIndex" and "ranges only" in notes:
            assert not hasattr(cls, "topk"), "GPUBlockIndex has topk now: update the row"
            continue
        for method in ("search", "topk"):
            assert callable(getattr(cls, method, None)), f"{cls.__name__} has no {method}"
    from hsr import SearchResult
    assert SearchResult._fields == ("D", "I")


def test_add_on_every_class_the_row_names():
    name, notes = _row("grow an index or a cache")
    assert name == "`add`"
    owners = re.findall(r"`(\w+)\.add\(", notes)
    assert owners, notes
    for owner in owners:
        assert callable(getattr(_resolve(owner), "add", None)), f"{owner} has no add"


def test_size_and_dimension_names():
    name, notes = _row("size, dimension")
    for pair in ("`len(index)` = `ntotal`", "`dim` = `d`"):
        assert pair in name, name
    classes = _classes(notes)
    assert classes, f"the row names no index: {notes}"
    for cls in classes:
        obj = _small_instance(cls)
        assert hasattr(obj, "__len__"), f"{cls.__name__} has no len()"
        for attr in ("ntotal", "dim", "d"):
            assert hasattr(obj, attr), f"{cls.__name__} has no {attr}"


def test_plan_run_return_typed_plans():
    name, notes = _row("GPU work in two steps")
    plans = re.findall(r"`(\w+Plan)`", name)
    assert plans, name
    returned = {}
    for cls in (_resolve("CodeKVCache"), _resolve("GPUBlockIndex")):
        hint = typing.get_type_hints(cls.plan)["return"]
        returned[hint.__name__] = hint
        assert "plan" in inspect.signature(cls.run).parameters, f"{cls.__name__}.run takes no plan"
    assert sorted(returned) == sorted(plans), f"plan() returns {sorted(returned)}, the row says {plans}"
    for plan in returned.values():
        assert inspect.isclass(plan) and not issubclass(plan, dict), f"{plan} must be a typed object"


# ----------------------------------------------------------------------------- attention


def _kind_defaults(notes: str) -> dict[str, str]:
    """``function -> default`` from "`f`'s default `"x"`" / "`f`'s `"x"`" in the row."""
    return dict(re.findall(r'`([\w.]+)`\'s (?:default )?`"(\w+)"`', notes))


def test_kind_defaults_match_the_row():
    name, notes = _row("kind of attention")
    assert 'kind="relu"' in name and '"softmax"' in name
    defaults = _kind_defaults(notes)
    assert "hsr_attention" in defaults, f"the row states no default for hsr_attention: {notes}"
    # "and so `AttentionSpec`'s": the spec carries hsr_attention's default
    if "`AttentionSpec`'s" in notes:
        defaults.setdefault("AttentionSpec", defaults["hsr_attention"])
    for fn_name, default in defaults.items():
        if fn_name == "register_hsr_attention" and not HAS_TRANSFORMERS:
            continue
        p = _param(_resolve(fn_name), "kind")
        assert p.default == default, f"{fn_name}'s kind defaults to {p.default!r}; the table says {default!r}"


def test_low_level_functions_take_kind_explicitly():
    _, notes = _row("kind of attention")
    m = re.search(r"\(([^()]*)\) take `kind` explicitly", notes)
    assert m, f"the row no longer lists the functions that take kind explicitly: {notes}"
    names = _ticked(m.group(1))
    assert {"selected_attention", "hsr_decode"} <= set(names), names
    for name in names:
        p = _param(_resolve(name), "kind")
        assert p.default is inspect.Parameter.empty, f"{name}'s kind has a default ({p.default!r}); the table says required"
    if "reads it from the spec" in notes:
        for cls in ("CodeKVCache", "KVIndex", "KVCacheIndex", "GPUBlockIndex"):
            attend = _resolve(cls).attend
            assert "kind" not in inspect.signature(attend).parameters, f"{cls}.attend takes kind itself"
            assert "spec" in inspect.signature(attend).parameters, f"{cls}.attend takes no spec"


def test_is_causal_only_on_the_dense_references():
    name, _ = _row("causal alignment")
    assert "`causal=True`: bottom-right" in name and "`is_causal=True`: top-left" in name
    assert "dense references only" in name
    takers = []
    for ns in NAMESPACES:
        if ns.endswith("transformers") and not HAS_TRANSFORMERS:
            continue
        mod = importlib.import_module(ns)
        for public in mod.__all__:
            obj = getattr(mod, public)
            if inspect.isfunction(obj) and "is_causal" in inspect.signature(obj).parameters:
                takers.append(public)
    assert takers and all(t.startswith("dense_") for t in takers), takers


def test_causal_is_bottom_right_and_is_causal_top_left():
    import torch

    from hsr import dense_softmax_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    # bottom-right: query 0 of 2 over 3 keys sees keys 0..1; top-left: key 0 only
    bottom = dense_softmax_attention(q, k, v, causal=True)
    top = dense_softmax_attention(q, k, v, is_causal=True)
    assert torch.allclose(bottom[..., 0, :], dense_softmax_attention(q[..., :1, :], k[..., :2, :], v[..., :2, :]))
    assert torch.allclose(top[..., 0, :], v[..., 0, :])


def test_block_size_and_leaf_size():
    name, _ = _row("block size")
    assert "`build_index(block_size=)`" in name and "`GPUBlockIndex.block_size`" in name
    _param(_resolve("build_index"), "block_size")
    assert hasattr(_resolve("GPUBlockIndex"), "block_size")
    assert "`leaf_size` for tree leaves" in name
    hsr_index = _resolve("HSRIndex")
    _param(hsr_index, "leaf_size")
    assert "block_size" not in inspect.signature(hsr_index).parameters, "HSRIndex takes block_size: a tree has leaves"


def test_statistics_names():
    name, notes = _row("statistics")
    counters = [n for n in _ticked(name) if n != "scan_fraction"]
    assert {"keys_scored", "keys_selected", "n_keys"} <= set(counters), name
    for cls_name in ("SearchStats", "AttentionInfo"):
        assert f"`{cls_name}`" in notes, notes
        cls = _resolve(cls_name)
        fields = set(getattr(cls, "_fields", ())) | set(inspect.signature(cls).parameters) | set(dir(cls))
        for counter in counters + ["scan_fraction"]:
            assert counter in fields, f"{cls_name} has no {counter}"
    if HAS_TRANSFORMERS and "`LayerStats`" in notes:
        layer = _resolve("LayerStats")
        for counter in ("keys_scored", "keys_selected", "keys_visible"):
            assert counter in set(inspect.signature(layer).parameters) | set(dir(layer)), f"LayerStats has no {counter}"


def _source_constant(module, name: str) -> int:
    """The literal a module assigns to ``name`` in its source: the shipped default (the suite's
    conftest sets the live ``DENSE_BELOW`` switches to 0, so the attribute is not it)."""
    for node in ast.parse(inspect.getsource(module)).body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]
                and isinstance(node.value, ast.Constant)):
            return node.value.value
    raise AssertionError(f"{module.__name__} assigns no literal to {name}")


def _constant_module(fn, name: str):
    """The hsr module, among ``fn``'s module and those it imports, that defines ``name``."""
    scope = fn.__globals__
    if name in scope:
        return inspect.getmodule(fn)
    for value in scope.values():
        if inspect.ismodule(value) and value.__name__.startswith("hsr") and hasattr(value, name):
            return value
    raise AssertionError(f"{fn.__qualname__}'s module sees no {name}")


def test_dense_below_defaults_match_the_row():
    name, notes = _row("short contexts")
    assert name == "`dense_below`"
    m = re.search(r"`hsr_attention` \(default (\d+)", notes)
    assert m, f"the row states no default for hsr_attention: {notes}"
    default = _param(_resolve("hsr_attention"), "dense_below").default
    if default is None:  # None stands for the module constant the row names
        from hsr.attention import core
        default = _source_constant(core, "DENSE_BELOW")
    assert default == int(m.group(1)), f"hsr_attention's dense_below is {default}; the table says {m.group(1)}"
    m = re.search(r"transformers backends \((\d+)\)", notes)
    assert m, f"the row states no default for the transformers backends: {notes}"
    if HAS_TRANSFORMERS:
        register = _resolve("register_hsr_attention")
        default = _param(register, "dense_below").default
        if default is None:  # None stands for the constant its docstring names: read its value
            found = re.search(r"dense_below : int, default ``(\w+)``", inspect.getdoc(register))
            assert found, "register_hsr_attention's docstring names no dense_below default"
            default = _source_constant(_constant_module(register, found.group(1)), found.group(1))
        assert default == int(m.group(1)), f"the transformers backends' dense_below is {default}; the table says {m.group(1)}"
