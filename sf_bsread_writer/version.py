"""The package's version, written here and nowhere else.

setup.py reads this file as text (it cannot import the package before it
is built), the conda recipe reads it with ``load_file_regex``, the package
re-exports it as ``sf_bsread_writer.__version__`` and the writer's JSON
summary carries it. Keep the assignment below as it is, on one line, the
value in double quotes: the two readers find it with a regular expression
(tests/test_packaging.py holds every place to it).
"""

__version__ = "2.0.0"
