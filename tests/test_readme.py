"""The README's quickstart block runs as written (torch backend)."""
import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def test_quickstart_block_runs(monkeypatch):
    text = open(README).read()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # "auto" on CPU = the torch reference
    scope = {}
    exec(compile(code, "README.md:quickstart", "exec"), scope)
    assert scope["res"].probs.shape == (2, 8, 36)
    assert scope["keep"].shape == (2, 36) and scope["out"].shape == (2, 50, 8, 64)
