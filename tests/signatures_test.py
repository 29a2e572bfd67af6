"""No library function takes more than ten parameters.

Long signatures are how settings got threaded by hand through the input pipeline; the
knobs belong in small option dataclasses instead. Tests and benchmarks are exempt: they
are not called by other code.
"""

import ast
import os

import tensorflow as tf

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXEMPT_TOP_FOLDERS = ("tests", "benchmarks", ".venv")
MAX_PARAMETERS = 10


def _library_files():
  for folder, subfolders, files in os.walk(_REPO):
    if folder == _REPO:
      subfolders[:] = [name for name in subfolders if name not in _EXEMPT_TOP_FOLDERS]
    subfolders[:] = [name for name in subfolders if not name.startswith(".")]
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def parameter_names(function):
  """A def's parameters, *args and **kwargs included, self and cls not."""
  arguments = function.args
  names = [argument.arg for argument in
           arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
  names += [star.arg for star in (arguments.vararg, arguments.kwarg) if star]
  return [name for name in names if name not in ("self", "cls")]


def long_signatures(source, path):
  """'path:line name (n parameters)' for every def in `source` over the limit."""
  found = []
  for node in ast.walk(ast.parse(source, path)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      count = len(parameter_names(node))
      if count > MAX_PARAMETERS:
        found.append(f"{path}:{node.lineno} {node.name} ({count} parameters)")
  return found


class SignaturesTest(tf.test.TestCase):

  def test_the_check_counts_what_it_should(self):
    source = ("def wide(a, b, c, d, e, f, g, h, i, *, j, k): pass\n"
              "class C:\n"
              "  def method(self, a, b, c, d, e, f, g, h, i, j): pass\n"
              "  def starred(self, a, *args, **kwargs): pass\n")
    self.assertEqual(long_signatures(source, "x.py"), ["x.py:1 wide (11 parameters)"])

  def test_no_library_function_takes_more_than_ten_parameters(self):
    found = []
    for path in _library_files():
      with open(path, encoding="utf-8") as f:
        found += long_signatures(f.read(), os.path.relpath(path, _REPO))
    self.assertTrue(list(_library_files()), "no library files found")
    self.assertEmpty(found, "Functions with more than ten parameters; group the "
                     "settings into an options dataclass:\n" + "\n".join(found))


if __name__ == "__main__":
  tf.test.main()
