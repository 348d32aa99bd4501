"""The layering rules of docs/design.md ("Module map"), checked on the source: the serving side never imports the
conversion package, the protocol never imports llama.cpp, and the CLI loads llama.cpp only for commands that need it."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(module, at top level) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, id(node) in top))
    return out


def _modules(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_serving_side_never_imports_the_converters():
    offenders = []
    for path in _modules("chatloop"):
        for module, top_level in _imports(path):
            # Only the CLI's convert subcommand may, and only inside the command function.
            converters = module == "converters" or module.startswith("converters.")
            if converters and (path.name != "cli.py" or top_level):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, offenders


def test_protocol_is_plain_data():
    for path in _modules("chatloop/protocol"):
        for module, _ in _imports(path):
            assert not module.startswith(("llama_cpp", "chatloop.engine", "chatloop.coordinator", "chatloop.stage")), (
                f"{path.relative_to(ROOT)} imports {module}"
            )


def test_converters_have_no_import_cycle_through_convert():
    for path in _modules("converters/hf"):
        for module, _ in _imports(path):
            assert module != "converters.convert", f"{path.relative_to(ROOT)} imports converters.convert"


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_the_cli_does_not_load_llama_cpp_until_a_command_needs_it():
    loaded = _loaded_after("import chatloop.cli")
    assert "llama_cpp" not in loaded
    assert not any(m == "converters" or m.startswith("converters.") for m in loaded)


def test_config_check_runs_without_llama_cpp(tmp_path):
    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text("stages: [[http://127.0.0.1:9000]]\n")
    code = (
        "import sys\nfrom chatloop.cli import main\n"
        f"rc = main(['config', 'check', {str(cfg)!r}])\n"
        "assert rc == 0, rc\nassert 'llama_cpp' not in sys.modules, 'config check loaded llama.cpp'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
