"""The package's structure, checked: no import cycle, no module reaching for another's private
names, no runtime dependency on the fuzz harnesses, and pipe messages that are frozen, picklable
dataclasses. Each check also runs on a deliberately broken copy of the package, to show it can fail.

The import analysis (``ast`` over every module, function-level imports included) is
``tools/code_shape.py``'s, which prints the same figures for any git revision.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import types
import typing
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd import messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_code_shape() -> types.ModuleType:
    path = os.path.join(ROOT, "tools", "code_shape.py")
    spec = importlib.util.spec_from_file_location("code_shape_tool", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


cs = _load_code_shape()

# Strongly connected sets of modules that are known and accepted for now. Each entry must still
# exist (a fixed cycle is taken off this list), and no other may appear. None is left: the method
# plugin base classes live in mpmultifd/methods/base.py, which the package re-exports.
KNOWN_CYCLES: list[list[str]] = []


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return cs.sources_in(ROOT)


@pytest.fixture(scope="module")
def imports(sources):
    return cs.package_imports(sources)


def _broken_copy(tmp_path, edits: dict[str, str]) -> dict[str, str]:
    """The package's sources copied under ``tmp_path`` with ``edits`` ({file: text}) appended."""
    shutil.copytree(
        os.path.join(ROOT, "mpmultifd"), tmp_path / "mpmultifd", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name, text in edits.items():
        with open(tmp_path / "mpmultifd" / name, "a", encoding="utf-8") as f:
            f.write("\n\n" + textwrap.dedent(text))
    return cs.sources_in(str(tmp_path))


# ---------------------------------------------------------------------------- (a) import cycles


def test_the_import_graph_has_no_cycle(sources, imports):
    graph = cs.import_graph(imports)
    assert set(graph) == {cs.module_name(p) for p in sources}
    found = cs.strongly_connected(graph)
    new = [scc for scc in found if scc not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" -> ".join(c) for c in cs.cycles(graph) if sorted(set(c)) in new)
    fixed = [scc for scc in KNOWN_CYCLES if scc not in found]
    assert not fixed, f"these cycles are gone: take them off KNOWN_CYCLES: {fixed}"


def test_the_graph_holds_function_level_and_relative_imports(imports):
    """Guards the analysis itself: the graph must see imports inside functions and resolve
    relative imports at every level, or the no-cycle test would pass vacuously."""
    graph = cs.import_graph(imports)
    # methods/__init__.py imports its built-ins inside _builtins()
    assert "mpmultifd.methods.compress" in graph["mpmultifd.methods"]
    # `from ..wire import ...` two levels up, `from .base import Method` one level up
    assert {"mpmultifd.wire", "mpmultifd.methods.base"} <= graph["mpmultifd.methods.compress"]
    assert "mpmultifd.errors" in graph["mpmultifd.source"]
    assert sum(len(v) for v in graph.values()) > 2 * len(graph)


def test_a_function_level_cycle_in_a_broken_copy_is_found(tmp_path):
    broken = _broken_copy(tmp_path, {"errors.py": "def _late():\n    from . import source\n    return source\n"})
    found = cs.strongly_connected(cs.import_graph(cs.package_imports(broken)))
    new = [scc for scc in found if scc not in KNOWN_CYCLES]
    assert any({"mpmultifd.errors", "mpmultifd.source"} <= set(scc) for scc in new), found
    cycle = next(c for c in cs.cycles(cs.import_graph(cs.package_imports(broken))) if "mpmultifd.errors" in c)
    assert cycle[0] == cycle[-1] and len(cycle) >= 3


def test_cycles_on_small_graphs():
    assert cs.strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cs.strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cs.cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"], ["c", "d", "c"]]


# ---------------------------------------------------------------------------- (b) private names


def test_no_module_imports_another_modules_private_name(sources, imports):
    assert [str(i) for i in cs.private_imports(imports)] == []
    assert cs.private_attribute_uses(sources) == []


def test_private_modules_themselves_may_be_imported(imports):
    """``_mp`` and ``_shm`` are the package's own private modules: imported as modules or for
    their public names, which must not count as private imports."""
    used = {i.target for i in imports if i.target in ("mpmultifd._mp", "mpmultifd._shm")}
    assert used == {"mpmultifd._mp", "mpmultifd._shm"}
    assert not [i for i in cs.private_imports(imports) if i.target in used]


def test_private_imports_in_a_broken_copy_are_found(tmp_path):
    broken = _broken_copy(
        tmp_path,
        {
            "transport.py": "from .wire import _x as y  # noqa\n",
            "ram.py": "def _peek():\n    from . import wire\n    return wire._private\n",
            # allowed: a private module as a module, and a public name of one
            "stats.py": "from . import _shm\nfrom ._mp import context_for\n",
        },
    )
    found = [str(i) for i in cs.private_imports(cs.package_imports(broken))]
    assert len(found) == 1 and found[0].startswith("mpmultifd.transport:") and "import _x" in found[0], found
    uses = cs.private_attribute_uses(broken)
    assert len(uses) == 1 and uses[0].startswith("mpmultifd.ram:") and uses[0].endswith("wire._private"), uses


# ---------------------------------------------------------------------------- (c) fuzz harnesses


def test_the_package_never_imports_the_fuzz_harnesses(imports):
    assert [str(i) for i in cs.foreign_imports(imports)] == []


def test_importing_every_module_loads_no_fuzz_harness():
    """Every module of the package imported in a fresh interpreter that *could* import fuzz/
    (the repository root on the path): none of fuzz, tests or tools is loaded."""
    code = textwrap.dedent(
        """
        import importlib, importlib.util, pkgutil, sys
        import mpmultifd
        names = [m.name for m in pkgutil.walk_packages(mpmultifd.__path__, "mpmultifd.")]
        for name in names:
            if name.endswith(".__main__"):  # runs the CLI
                continue
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:  # an optional dependency (prometheus_client) not installed
                if e.name.split(".")[0] in ("mpmultifd", "fuzz", "tests", "tools"):
                    raise
        loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("fuzz", "tests", "tools"))
        assert importlib.util.find_spec("fuzz.harness") is not None  # importable: the check is not vacuous
        print(len(names), loaded)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, loaded = out.stdout.split(" ", 1)
    assert int(count) >= 30
    assert loaded.strip() == "[]"


def test_a_fuzz_import_in_a_broken_copy_is_found(tmp_path):
    broken = _broken_copy(tmp_path, {"wire.py": "def _fuzz():\n    import fuzz.harness\n    return fuzz\n"})
    found = [str(i) for i in cs.foreign_imports(cs.package_imports(broken))]
    assert len(found) == 1 and found[0].startswith("mpmultifd.wire:") and "fuzz.harness" in found[0], found


# ---------------------------------------------------------------------------- (d) worker messages


def _sample_callable() -> None:
    """A picklable target for a ``Job`` message."""


def _kind(hint: object, where: str) -> tuple[object, st.SearchStrategy[object]]:
    """A sample value and a strategy for a message field's type; an unknown type fails the test,
    naming the field."""
    simple: dict[object, tuple[object, st.SearchStrategy[object]]] = {
        int: (7, st.integers()),
        float: (0.25, st.floats(allow_nan=False)),
        str: ("x", st.text(max_size=40)),
        bool: (True, st.booleans()),
        typing.Any: (
            ("spec", 1),
            st.one_of(st.none(), st.integers(), st.text(max_size=10), st.tuples(st.integers(), st.text(max_size=5))),
        ),
    }
    if hint in simple:
        return simple[hint]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Callable:
        return _sample_callable, st.sampled_from([_sample_callable, len, os.getpid])
    if origin is tuple:
        return (1, "a"), st.lists(st.integers(), max_size=4).map(tuple)
    if origin in (typing.Union, types.UnionType):
        kinds = [(None, st.none()) if a is type(None) else _kind(a, where) for a in args]
        return next(k[0] for k in kinds if k[0] is not None), st.one_of(*[k[1] for k in kinds])
    raise AssertionError(f"{where}: no strategy for the type {hint!r}; add one to this test")


def _fields(cls: type) -> dict[str, tuple[object, st.SearchStrategy[object]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name], f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)}


def _message_classes(module: types.ModuleType) -> list[type]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]


def _builds(cls: type) -> st.SearchStrategy[object]:
    return st.builds(cls, **{name: kind[1] for name, kind in _fields(cls).items()})


def message_problems(module: types.ModuleType) -> list[str]:
    """What is wrong with the message classes of ``module``: not a dataclass, not frozen, not
    picklable (a sample of each, built from its field types, must survive a pickle round trip)."""
    problems = []
    for cls in _message_classes(module):
        name = cls.__name__
        if not dataclasses.is_dataclass(cls):
            problems.append(f"{name}: not a dataclass")
            continue
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            problems.append(f"{name}: not frozen")
            continue
        sample = cls(**{name: kind[0] for name, kind in _fields(cls).items()})
        attr = next((f.name for f in dataclasses.fields(cls)), "extra")
        try:
            setattr(sample, attr, 1)
            problems.append(f"{name}: an attribute could be set")
        except dataclasses.FrozenInstanceError:
            pass
        try:
            again = pickle.loads(pickle.dumps(sample))
        except Exception as e:  # noqa: BLE001 - any failure to pickle is the finding
            problems.append(f"{name}: not picklable ({type(e).__name__}: {e})")
            continue
        if again != sample or type(again) is not cls:
            problems.append(f"{name}: changed by a pickle round trip")
    return problems


def test_every_message_is_a_frozen_picklable_dataclass():
    classes = _message_classes(messages)
    assert len(classes) >= 13
    assert message_problems(messages) == []
    # the union the coordinators match on holds message classes only, and every class is exported
    assert set(typing.get_args(messages.WorkerMessage)) <= set(classes)
    assert {c.__name__ for c in classes} <= set(messages.__all__)


@given(st.sampled_from(_message_classes(messages)).flatmap(_builds))
def test_messages_survive_a_pickle_round_trip(message):
    again = pickle.loads(pickle.dumps(message))
    assert again == message and type(again) is type(message)


def test_broken_messages_are_found(monkeypatch):
    module = types.ModuleType("broken_messages")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(
        textwrap.dedent(
            """
            from __future__ import annotations
            from dataclasses import dataclass

            @dataclass(frozen=True)
            class Fine:
                round: int

            @dataclass
            class Loose:
                round: int

            class Plain:
                pass

            @dataclass(frozen=True)
            class Hidden:
                round: int

            Renamed = Hidden
            del Hidden
            """
        ),
        module.__dict__,
    )
    problems = message_problems(module)
    assert sorted(p.split(":")[0] for p in problems) == ["Hidden", "Loose", "Plain"], problems
    assert any("Loose: not frozen" == p for p in problems)
    assert any("Plain: not a dataclass" == p for p in problems)
    assert any(p.startswith("Hidden: not picklable") for p in problems)
