"""The README's Python blocks run, in order, in one namespace, as a user would paste them
(from a folder holding recipes/, with the real CIFAR-10): the README cannot drift from the
code."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run(tmp_path, monkeypatch, data_root, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 3
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "'top1'" in out and "['fc.weight', 'fc.bias'] []" in out
    assert (tmp_path / "runs" / "api-demo" / "resnet18.safetensors").is_file()


def test_version_and_documented_imports_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = ("import ssl_sec; from ssl_sec.evaluation import knn_classify; "
            "print(ssl_sec.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    import ssl_sec

    assert out == ssl_sec.__version__ and re.fullmatch(r"\d+\.\d+\.\d+", out)
    for name in ssl_sec.__all__:
        assert getattr(ssl_sec, name) is not None, name


def test_every_api_name_the_readme_gives_exists():
    """`ssl_sec.module.name` in the README's text resolves, and is in the module's __all__
    when the module declares one."""
    import importlib

    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"`(ssl_sec(?:\.[a-z_]+)+\.[A-Za-z_]+)\(", text))
    assert len(names) >= 5
    for dotted in sorted(names):
        module_name, _, attr = dotted.rpartition(".")
        module = importlib.import_module(module_name)
        assert hasattr(module, attr), dotted
        assert attr in getattr(module, "__all__", [attr]), dotted
