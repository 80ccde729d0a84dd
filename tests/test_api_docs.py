"""The API reference builds from the numpydoc docstrings (pdoc), as ``scripts/api_docs.sh`` does."""
import pytest

pdoc = pytest.importorskip("pdoc")


def test_api_reference_builds(tmp_path):
    import pdoc.doc
    import pdoc.render

    pdoc.render.configure(docformat="numpy")
    modules = ["hsr", "hsr.index", "hsr.attention", "hsr.integrations"]
    pdoc.pdoc(*modules, output_directory=tmp_path)
    page = (tmp_path / "hsr" / "index.html").read_text()
    for name in ("range_search", "RangeResult", "topk", "ntotal"):
        assert name in page
    assert (tmp_path / "hsr" / "attention.html").exists()
