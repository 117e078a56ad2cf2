"""The README's drop-in example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_drop_in_example_runs():
    text = README.read_text()
    section = text[text.index("## Drop-in use"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["output"].shape == (8, 50, 256)
    assert namespace["h_n"].shape == namespace["c_n"].shape == (2, 8, 256)
