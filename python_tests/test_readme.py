"""The README's drop-in example runs as written, and its driver commands parse."""

import re
import shlex
from pathlib import Path

from lstm_ext.lm import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def test_drop_in_example_runs():
    text = README.read_text()
    section = text[text.index("## Drop-in use"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["output"].shape == (8, 50, 256)
    assert namespace["h_n"].shape == namespace["c_n"].shape == (2, 8, 256)


def documented_driver_commands():
    """Every `lstm-ext ...` command in the fenced shell blocks of the README and the results
    notes, continuation lines joined, `&&` chains split, comments dropped."""
    commands = []
    for path in (README, README.parent / "benchmarks" / "results" / "lm-shakespeare" /
                 "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
                for part in line.split("&&"):
                    words = shlex.split(part)
                    if words and words[0] == "lstm-ext":
                        commands.append(words[1:])
    return commands


def test_documented_driver_commands_parse():
    commands = documented_driver_commands()
    assert {words[0] for words in commands} >= {"train", "eval", "generate"}
    parser = cli.build_parser()
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:
            raise AssertionError(f"README command does not parse: lstm-ext {' '.join(words)}")
