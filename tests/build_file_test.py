"""BUILD stays in step with the code: every module has a target, every import a dep.

Bazel cannot be fetched on the CI machine, so this reads BUILD (Starlark is Python
syntax) with stand-ins for the rules and checks it against the sources' imports.
"""

import ast
import glob
import os

from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOCAL_PACKAGES = ("allreduce", "resnet", "input_pipeline", "training", "tools",
                   "tests", "benchmarks")
# Import name -> the PyPI distribution `requirement()` names.
_DISTRIBUTIONS = {
    "tensorflow": "tensorflow", "tf_keras": "tf-keras", "absl": "absl-py",
    "numpy": "numpy", "official": "tf-models-official",
    "tensorflow_datasets": "tensorflow-datasets", "PIL": "pillow",
    "sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib",
}
# Files that need no target: pytest's hook file.
_NOT_BAZEL = {"tests/conftest.py"}


def _read_build():
  targets = {}

  def rule(kind):
    def define(name, srcs=(), deps=(), data=(), **unused):
      targets[name] = dict(kind=kind, srcs=list(srcs), deps=list(deps),
                           data=list(data))
    return define

  namespace = dict(
      load=lambda *args: None, package=lambda **kwargs: None,
      requirement=lambda name: "@pypi//" + name,
      glob=lambda patterns: [], py_library=rule("py_library"),
      py_binary=rule("py_binary"), py_test=rule("py_test"))
  with open(os.path.join(_REPO, "BUILD")) as f:
    exec(compile(f.read(), "BUILD", "exec"), namespace)  # pylint: disable=exec-used
  return targets


def _imports(path):
  """(local module files, third-party top-level names) that `path` imports."""
  with open(os.path.join(_REPO, path)) as f:
    tree = ast.parse(f.read())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names += [f"{node.module}.{alias.name}" for alias in node.names]
  local, external = set(), set()
  for name in names:
    top = name.split(".")[0]
    if top not in _LOCAL_PACKAGES:
      external.add(top)
      continue
    parts = name.split(".")
    # The longest prefix that is a module file; "pkg.Symbol" resolves to pkg/__init__.
    for end in range(len(parts), 0, -1):
      module = os.path.join(*parts[:end])
      if os.path.exists(os.path.join(_REPO, module + ".py")):
        local.add(module + ".py")
        break
      if os.path.exists(os.path.join(_REPO, module, "__init__.py")):
        local.add(os.path.join(module, "__init__.py"))
        break
  return local, external


class BuildFileTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.targets = _read_build()
    cls.sources = sorted(
        p for p in (glob.glob("*.py", root_dir=_REPO)
                    + glob.glob("*/*.py", root_dir=_REPO))
        if not p.startswith(".") and p not in _NOT_BAZEL)

  def _owners(self, path):
    return [name for name, t in self.targets.items() if path in t["srcs"]]

  def test_every_source_file_has_a_target(self):
    missing = [p for p in self.sources if not self._owners(p)]
    self.assertEqual(missing, [], "add these files to a target in BUILD")

  def test_every_test_file_has_a_py_test_and_main_a_py_binary(self):
    for path in self.sources:
      kinds = {self.targets[name]["kind"] for name in self._owners(path)}
      if path.endswith("_test.py"):
        self.assertIn("py_test", kinds, path)
      if path == "main.py" or path.startswith("benchmarks/"):
        self.assertIn("py_binary", kinds, path)

  def test_listed_files_exist(self):
    for name, target in self.targets.items():
      for path in target["srcs"] + target["data"]:
        if path.startswith(":"):
          self.assertIn(path[1:], self.targets, f"{name} lists unknown {path}")
          continue
        self.assertTrue(os.path.exists(os.path.join(_REPO, path)),
                        f"{name} lists {path}, which does not exist")

  def test_deps_name_existing_targets(self):
    for name, target in self.targets.items():
      for dep in target["deps"]:
        if dep.startswith(":"):
          self.assertIn(dep[1:], self.targets, f"{name} depends on unknown {dep}")

  def _closure(self, name):
    """The target and everything it depends on, transitively."""
    seen, stack = set(), [name]
    while stack:
      current = stack.pop()
      if current not in seen:
        seen.add(current)
        stack += [d[1:] for d in self.targets[current]["deps"] if d.startswith(":")]
    return seen

  def test_deps_cover_every_import(self):
    problems = []
    for name, target in self.targets.items():
      provided, external_deps = set(), set()
      for member in self._closure(name):
        provided |= set(self.targets[member]["srcs"])
        external_deps |= {d.split("//")[1] for d in self.targets[member]["deps"]
                          if d.startswith("@")}
      for path in target["srcs"]:
        local, external = _imports(path)
        for module in sorted(local - provided):
          problems.append(f"{name}: {path} imports {module}, not in its deps")
        for top in sorted(external):
          if top in _DISTRIBUTIONS and _DISTRIBUTIONS[top] not in external_deps:
            problems.append(f"{name}: {path} imports {top}; add "
                            f"requirement(\"{_DISTRIBUTIONS[top]}\")")
    self.assertEqual(problems, [])

  def test_required_distributions_are_pinned(self):
    with open(os.path.join(_REPO, "requirements.lock")) as f:
      pinned = {line.split("==")[0].lower().replace("_", "-")
                for line in f if "==" in line}
    for distribution in _DISTRIBUTIONS.values():
      self.assertIn(distribution, pinned)


if __name__ == "__main__":
  absltest.main()
