"""The test suite, a package so that `tests.conftest` is ours: a dependency (tf2onnx) installs
a top-level `tests` folder into site-packages, which a namespace `tests` would merge with."""
