"""The API reference builds from the numpydoc docstrings (pdoc), as ``scripts/api_docs.sh`` does."""
import pytest

pdoc = pytest.importorskip("pdoc")


@pytest.mark.filterwarnings("ignore:hsr.integrations.realdata moved:DeprecationWarning")
def test_api_reference_builds(tmp_path):
    # pdoc imports every submodule, the deprecated shim hsr.integrations.realdata included
    # (it warns on import by design); its page is left out
    import pdoc.doc
    import pdoc.render

    pdoc.render.configure(docformat="numpy")
    # the deprecated shim hsr.integrations.realdata is left out (it moved to hsr.testing)
    modules = ["hsr", "hsr.index", "hsr.attention", "hsr.integrations", "!hsr.integrations.realdata"]
    pdoc.pdoc(*modules, output_directory=tmp_path)
    page = (tmp_path / "hsr" / "index.html").read_text()
    for name in ("range_search", "RangeResult", "topk", "ntotal"):
        assert name in page
    assert (tmp_path / "hsr" / "attention.html").exists()
